"""What runs on the server and the sites of a ``fedavg-he`` job (``fedseg.jobs.fedavg_he``): TenSEAL
contexts, decryption of the stored global models with a site kit and cross-site evaluation of
encrypted models. (The audit that only ciphertext reaches the server is the HE test's own,
``tests/he_audit.py``.)

``FedAvgRecipeWithHE`` (nvflare/app_opt/pt/recipes/fedavg_he.py) runs ScatterAndGather with
TenSEAL CKKS filters: each site encrypts its weights (already multiplied by its case count) before
they leave it, the server adds the ciphertexts and scales by 1 / total cases without ever holding
a decryption key, and each site decrypts the next global model on arrival. The server's global
model files hold ciphertexts too: only a site kit (``client_context.tenseal``, with the secret
key) can read them.

Needs TenSEAL (``pip install 'fedseg[he]'``) and startup kits made with NVFlare's ``HEBuilder``
(``PocDeployment(..., he=True)``, ``nvflare poc prepare -he`` or ``HEBuilder`` in ``project.yml``).
The simulator cannot run it (the recipe refuses ``SimEnv``: the simulator provisions no contexts).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nvflare.apis.dxo import DXO
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.workflows.cross_site_model_eval import CrossSiteModelEval

INSTALL_HINT = "pip install 'fedseg[he]'"
#: TenSEAL context files HEBuilder writes into the kits' startup/ folders (nvflare/lighter/impl/he.py)
SERVER_CONTEXT = "server_context.tenseal"
CLIENT_CONTEXT = "client_context.tenseal"


def require_tenseal() -> Any:
    """The ``tenseal`` module; ``RuntimeError`` naming the install command when it cannot be imported."""
    try:
        import tenseal
    except ImportError as err:  # not installed, or its native extension does not load
        raise RuntimeError(
            f"algorithm 'fedavg-he' needs TenSEAL, which cannot be imported ({type(err).__name__}: {err}); "
            f"install it with: {INSTALL_HINT}"
        ) from err
    return tenseal


def load_context(kit: Path) -> Any:
    """The TenSEAL context of a provisioned kit: a site's (with the secret key) or the server's."""
    ts = require_tenseal()
    startup = Path(kit) / "startup"
    for name in (CLIENT_CONTEXT, SERVER_CONTEXT):
        if (startup / name).is_file():
            return ts.context_from((startup / name).read_bytes())
    raise FileNotFoundError(f"{startup}: no TenSEAL context (was the kit provisioned with HEBuilder?)")


def decrypt_state(state: Mapping[str, Any], site_kit: Path, like: Mapping[str, Any]) -> dict[str, Any]:
    """Decrypt the CKKS values of a state dict (serialized bytes or ``CKKSVector``) with the secret
    key of a site kit (``site_kit/startup/client_context.tenseal``; the server's kit has none).

    Encrypted tensors travel and are stored flattened: each value is shaped and typed like the same
    key of ``like`` (e.g. the job's model's ``state_dict()``). Values carry CKKS noise (about 1e-7
    absolute with HEBuilder's default 2^40 scale).
    """
    import torch

    ts = require_tenseal()
    context = load_context(site_kit)
    if not context.has_secret_key():
        raise ValueError(f"{site_kit}: its TenSEAL context has no secret key (a server kit?)")
    if set(state) != set(like):
        raise ValueError(f"keys differ from the reference model's: {sorted(set(state) ^ set(like))[:5]}")
    plain: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, ts.CKKSVector):
            value = value.serialize()  # bound to the context it arrived with (public): rebind to ours
        if isinstance(value, bytes):
            value = ts.ckks_vector_from(context, value).decrypt()
        plain[key] = torch.as_tensor(value, dtype=torch.float64).reshape(like[key].shape).to(like[key].dtype)
    return plain


def decrypt_global_model(pt_file: Path, site_kit: Path, like: Mapping[str, Any]) -> dict[str, Any]:
    """The plain state dict of a ``fedavg-he`` global model file (``app_server/FL_global_model.pt``
    or ``best_FL_global_model.pt``), decrypted with a site kit's key (see ``decrypt_state``)."""
    import torch

    from fedseg.lightning_modules.safe_load import load_checkpoint

    saved = load_checkpoint(pt_file)  # the ciphertexts are stored as serialized bytes
    return decrypt_state(saved.get("model", saved), site_kit, like)


class HECrossSiteEval(CrossSiteModelEval):
    """NVFlare's cross-site evaluation, able to send encrypted models to the sites.

    Workaround: the models it evaluates (the server's global models and the sites' submitted
    ones) are CKKS ciphertexts; read back from its files they are ``CKKSVector`` objects bound to
    the server's public context, and the broadcast of a validate task deep-copies its data, which
    TenSEAL refuses without a secret key ("the current context is public ... Cannot proceed",
    nvflare/apis/impl/wf_comm_server.py). So the ciphertexts leave as serialized bytes, which
    the site's ``HEModelDecryptor`` deserializes with its own context before decrypting
    (nvflare/app_opt/he/model_decryptor.py). NVFlare's own ``HECrossSiteModelEval``
    (nvflare/app_opt/he/cross_site_model_eval.py) does this in ``_save_validation_content``,
    which the 2.9 base class no longer calls (it saves with ``_save_dxo_content``), so it fails
    the same way.
    """

    def _load_validation_content(self, name: str, load_dir: str, fl_ctx: FLContext) -> DXO | None:
        from nvflare.app_opt.he.homomorphic_encrypt import serialize_nested_dict

        dxo = super()._load_validation_content(name, load_dir, fl_ctx)
        if dxo is not None and isinstance(dxo.data, dict):
            serialize_nested_dict(dxo.data)
        return dxo
