"""The methods ``fedseg compare`` knows, by name: centralized, local-only, and the federated ones.

The federated methods are derived from the algorithms' declarations (``fedseg.jobs.base.algorithms()``):
every algorithm that runs in the simulator, followed by the variants it declares
(``Algorithm.compare_variants``), then FedAvg with each add-on. Which of them are scored by each
site's personal model (``PERSONALIZED``) is the algorithm's ``personal``. This module imports no
torch, so ``fedseg compare --help`` lists them quickly.
"""

from __future__ import annotations

from typing import Any

from fedseg.config import ComparisonSettings
from fedseg.jobs.base import algorithms, personal_algorithms

#: FedAvg with an add-on: the add-ons (``fedseg.jobs.addons``) that make each method
ADDON_METHOD_JOBS: dict[str, dict[str, Any]] = {
    "contribution": {"algorithm": "fedavg", "addons": {"contribution": {}}},
    "fedavg-svt": {"algorithm": "fedavg", "addons": {"privacy": {"kind": "svt"}}},
    "fedavg-percentile": {"algorithm": "fedavg", "addons": {"privacy": {"kind": "percentile"}}},
    "fedavg-fp16": {"algorithm": "fedavg", "addons": {"quantize": "fp16"}},
    "fedavg-int8": {"algorithm": "fedavg", "addons": {"quantize": "int8"}},
    "grouped": {"algorithm": "fedavg", "addons": {"groups": {}}},
    "grouped-shared": {"algorithm": "fedavg", "addons": {"groups": {"share_encoder": True}}},
}


def _algorithm_method_jobs() -> dict[str, dict[str, Any]]:
    """Every algorithm that runs in the simulator, each followed by the variants it declares; from the
    algorithms' declarations (``fedseg.jobs``: light modules, so ``fedseg --help`` stays fast).
    HE is not among them: NVFlare's HE recipe cannot run in the simulator (POC only)."""
    methods: dict[str, dict[str, Any]] = {}
    for name, algo in algorithms().items():
        if algo.simulator:
            methods[name] = {"algorithm": name}
            for variant, options in algo.compare_variants.items():
                methods[variant] = {"algorithm": name, "options": dict(options)}
    return methods


#: every federated method: the algorithm, options and add-ons that make it (tests/test_compare.py builds each job)
FL_METHOD_JOBS: dict[str, dict[str, Any]] = {**_algorithm_method_jobs(), **ADDON_METHOD_JOBS}
FL_METHODS: tuple[str, ...] = tuple(FL_METHOD_JOBS)
#: centralized training with as many optimizer steps as each federated site takes: budget / sites epochs
CENTRALIZED_STEPS = "centralized-steps"
#: the methods scored by each site's personal model: those of a personalized algorithm
PERSONALIZED: tuple[str, ...] = tuple(m for m, spec in FL_METHOD_JOBS.items() if spec["algorithm"] in personal_algorithms())
METHODS: tuple[str, ...] = ("centralized", CENTRALIZED_STEPS, "local", *FL_METHODS)
DEFAULT_METHODS: tuple[str, ...] = ComparisonSettings().methods


def methods_help() -> str:
    """The methods, in words, for ``fedseg compare --help``."""
    federated = []
    for name, algo in algorithms().items():
        if algo.simulator:
            variants = f" (variants: {', '.join(algo.compare_variants)})" if algo.compare_variants else ""
            federated.append(f"{name}: {algo.description}{variants}")
    return ("Methods: centralized, centralized-steps (as many optimizer steps as one site), local; the federated "
            "algorithms: " + "; ".join(federated) + "; FedAvg with an add-on: " + ", ".join(ADDON_METHOD_JOBS) + ".")
