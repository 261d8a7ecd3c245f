"""The HE test's audit on the server: how each result a site sent arrived, encrypted or in plain.

A test instrument, not part of fedseg: the HE POC test (``test_he.py``) adds it to the job it
exports and lets its deployment import it (``PYTHONPATH``, the job's app packages, the server's
class allow list), so the job still carries no code.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from nvflare.apis.dxo import MetaKey, from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from fedseg.app.he import require_tenseal

#: what CiphertextAudit writes into the server's <run dir>/metrics/
AUDIT_FILE = "he_payloads.jsonl"


class CiphertextAudit(Filter):
    """Server input filter: how each result a site sent arrived, encrypted or in plain.

    Passes every result on unchanged and appends one JSON line per result to
    ``<run dir>/metrics/he_payloads.jsonl``: site, task, the names of the values that arrived as
    CKKS ciphertexts and of those in plain, and the ciphertexts' serialized bytes. It shows that
    the server never received a readable weight (only the scalar metrics and the case count are
    plain: they travel in the result's meta).
    """

    def __init__(self, file_name: str = AUDIT_FILE) -> None:
        super().__init__()
        self.file_name = file_name

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        record: dict[str, Any] = {
            "time": time.time(),
            "site": shareable.get_peer_prop(ReservedKey.IDENTITY_NAME, ""),
            "task": shareable.get_header(ReservedKey.TASK_NAME, ""),
        }
        try:
            dxo = from_shareable(shareable)
        except Exception:  # not a DXO (e.g. an error reply): nothing to audit
            record.update(kind="none", encrypted=[], plain=[], ciphertext_bytes=0)
        else:
            record.update(kind=str(dxo.data_kind), **_count_ciphertexts(dxo.data or {}),
                          algorithm=dxo.get_meta_prop(MetaKey.PROCESSED_ALGORITHM))
        run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
        os.makedirs(os.path.join(run_dir, "metrics"), exist_ok=True)
        with open(os.path.join(run_dir, "metrics", self.file_name), "a") as f:
            f.write(json.dumps(record) + "\n")
        return shareable


def _count_ciphertexts(params: dict[str, Any]) -> dict[str, Any]:
    """Names of the encrypted and of the plain values of a DXO, and the ciphertexts' bytes."""
    ts = require_tenseal()
    encrypted, plain, size = [], [], 0
    for key, value in params.items():
        if isinstance(value, ts.CKKSVector):
            encrypted.append(key)
            size += len(value.serialize())
        else:
            plain.append(key)
    return {"encrypted": sorted(encrypted), "plain": sorted(plain), "ciphertext_bytes": size}


def add_ciphertext_audit(recipe: Any, tasks: tuple[str, ...] = ("train", "submit_model")) -> None:
    """Register ``CiphertextAudit`` on the server for every task whose results carry weights.

    One registration per task: NVFlare matches filters by exact task name
    (nvflare/apis/utils/task_utils.py).
    """
    for task in tasks:
        recipe.add_server_input_filter(CiphertextAudit(), tasks=[task])
