"""FedAvg with homomorphic encryption: NVFlare's CKKS FedAvg recipe (``FedAvgRecipeWithHE``).

Each site encrypts its weights (already multiplied by its case count) before they leave it, the
server adds the ciphertexts and scales by 1 / total cases without ever holding a decryption key,
and each site decrypts the next global model on arrival (TenSEAL, ``pip install 'fedseg[he]'``).
The runtime parts (contexts, decryption with a site kit, cross-site evaluation of encrypted models,
the ciphertext audit) are in ``fedseg.app.he``.

It keeps NVFlare's ScatterAndGather workflow: no round timeout or minimum of sites, no resume, no
privacy filter (it would run on ciphertext), contribution weights or groups. The recipe refuses
the simulator: HE needs kits made with NVFlare's ``HEBuilder`` (``fedseg poc --job fedavg-he``).
"""

from __future__ import annotations

from typing import Any

from fedseg.jobs.base import Algorithm, Job


class FedAvgHE(Algorithm):
    """FedAvg whose server only ever holds CKKS ciphertexts of the sites' weights."""

    name = "fedavg-he"
    description = "CKKS-encrypted aggregation: the server adds ciphertexts it cannot read"
    addons = frozenset({"wandb"})
    plain_weights = False
    # NVFlare's HE recipe needs kits made with its HEBuilder
    simulator = False

    def recipe(self, job: Job, common: dict[str, Any], round_args: dict[str, Any]) -> Any:
        """Sites are weighed by their training cases: ``HEModelEncryptor`` multiplies the weights by the
        update's ``NUM_STEPS_CURRENT_ROUND`` before encrypting and the aggregator sums it as the divisor
        (nvflare/app_opt/he/model_encryptor.py, nvflare/app_common/aggregators/dxo_aggregator.py)."""
        from fedseg.app.he import require_tenseal

        require_tenseal()
        from nvflare.app_opt.pt.recipes.fedavg_he import FedAvgRecipeWithHE
        from nvflare.client.config import ExchangeFormat

        # Workaround: the HE filters need NumPy on the wire, not torch tensors. HEModelEncryptor calls
        # np.size() on each value (a torch tensor's .size is a method, so the count breaks) and
        # HEModelDecryptor returns flat lists (nvflare/app_opt/he/model_encryptor.py, model_decryptor.py).
        # With NUMPY the client API converts torch <-> NumPy around every send/receive and restores each
        # tensor's shape from the shapes it recorded on the site's first send
        # (nvflare/client/converter_utils.py, _numpy_to_pytorch), so the site script stays unchanged.
        return FedAvgRecipeWithHE(**{**common, "server_expected_format": ExchangeFormat.NUMPY})

    def add_evaluation(self, recipe: Any, job: Job, submit_model_timeout: int, validation_timeout: int) -> None:
        """Cross-site evaluation that can send encrypted models (``fedseg.app.he.HECrossSiteEval``).

        NVFlare's ``add_cross_site_evaluation`` refuses this recipe (it has no ``framework``), as it
        should: its ``CrossSiteModelEval`` cannot copy ciphertexts. Every site evaluates the server's
        final and best global models and every site's own model, each decrypted at the evaluating
        site. The recipe already has the model locator and the results writer (``PTModel`` and
        ``BaseFedJob`` add them, nvflare/app_opt/pt/job_config/model.py, nvflare/job_config/base_fed_job.py).
        """
        from fedseg import nvflare_internals
        from fedseg.app.he import HECrossSiteEval

        if nvflare_internals.cross_site_evaluation_added(recipe):
            raise RuntimeError("cross-site evaluation was already added to this recipe")
        fed_job = nvflare_internals.fed_job(recipe)
        locator_id = fed_job.comp_ids.get("locator_id")
        if not locator_id:
            raise ValueError("the HE recipe has no model locator: cross-site evaluation needs the job's model")
        fed_job.to_server(HECrossSiteEval(model_locator_id=locator_id, submit_model_timeout=submit_model_timeout,
                                          validation_timeout=validation_timeout))
        nvflare_internals.mark_cross_site_evaluation_added(recipe)


ALGORITHM = FedAvgHE
