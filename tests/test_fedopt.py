"""FedOpt: NVFlare's server-optimizer controller with fedseg's resilient round.

Its simulator run (a failing site, a stop below the minimum, resume with the momentum) is the
resilience test's study (``test_resilience.py``)."""

from __future__ import annotations

import pytest
import torch
from nvflare.app_common.abstract.fl_model import FLModel

from fedseg.app.resilient_fedopt import ResilientFedOpt


def _controller(app_dir, **kwargs) -> ResilientFedOpt:
    controller = ResilientFedOpt(source_model="model", num_clients=2, num_rounds=2, round_timeout=10, min_sites=1,
                                 **kwargs)
    controller.torch_model = torch.nn.Linear(3, 2)  # FedOpt.run builds these from the component and arguments
    controller.optimizer = torch.optim.SGD(controller.torch_model.parameters(), lr=1.0, momentum=0.6)
    controller.lr_scheduler = None
    controller.info = lambda *_: None  # NVFlare's logger needs a running job
    controller.get_app_dir = lambda: str(app_dir)  # the server app's folder of a running job
    return controller


def test_the_server_optimizer_steps_from_the_global_model_with_momentum_and_a_resume_keeps_it(tmp_path):
    """SGD(lr 1, momentum 0.6) on the averaged diff d: round 1 gives w0 + d1, round 2 w1 + d2 + 0.6 d1.
    The optimizer's own model starts elsewhere (a fresh build): it is synced to the global model.
    A study resumed after round 1 restores the momentum saved beside the checkpoint: round 2 is the same."""
    from fedseg.app.resilient_fedopt import OPTIMIZER_STATE_FILE, read_optimizer_state

    controller = _controller(tmp_path)

    w0 = {"weight": torch.full((2, 3), 0.5), "bias": torch.zeros(2)}
    d1 = {"weight": torch.full((2, 3), 0.1), "bias": torch.full((2,), -0.2)}
    d2 = {"weight": torch.full((2, 3), -0.05), "bias": torch.full((2,), 0.1)}
    controller.current_round = 0
    w1 = controller.update_model(FLModel(params=dict(w0)), FLModel(params=d1)).params
    assert all(isinstance(v, torch.Tensor) for v in w1.values())
    for k in w0:
        assert torch.allclose(w1[k], w0[k] + d1[k], atol=1e-6)
    saved = read_optimizer_state(tmp_path / OPTIMIZER_STATE_FILE)
    assert saved["round"] == 0 and saved["state"]["state"]  # the momentum buffers, written after the step
    (tmp_path / "custom").mkdir()
    (tmp_path / "custom" / OPTIMIZER_STATE_FILE).write_bytes((tmp_path / OPTIMIZER_STATE_FILE).read_bytes())

    controller.current_round = 1
    w2 = controller.update_model(FLModel(params=dict(w1)), FLModel(params=d2)).params
    for k in w0:
        assert torch.allclose(w2[k], w1[k] + d2[k] + 0.6 * d1[k], atol=1e-6)

    # a new job resuming after round 1 (a fresh controller, the round-1 model as its initial model)
    resumed = _controller(tmp_path, optimizer_state=OPTIMIZER_STATE_FILE)
    resumed.model = FLModel(params=dict(w1))
    resumed._initial_model()  # noqa: SLF001 - what its run() calls first
    resumed.current_round = 1
    again = resumed.update_model(FLModel(params=dict(w1)), FLModel(params=d2)).params
    assert all(torch.allclose(again[k], w2[k], atol=1e-6) for k in w0)


def test_a_fedopt_study_resumes_only_with_its_optimizer_state(tmp_path):
    from conftest import tiny_job
    from fedseg.jobs.addons import Addons
    from fedseg.jobs.base import export

    torch.save({"model": {"w": torch.ones(1)}, "meta_props": {"current_round": 1}}, tmp_path / "FL_global_model.pt")
    with pytest.raises(ValueError, match="fedopt_optimizer.pt: not found.*momentum would restart from zero"):
        export(tiny_job("fedopt", rounds=4, addons=Addons(resume_from=str(tmp_path))), tmp_path / "out")
    torch.save({"round": 0, "state": {}}, tmp_path / "fedopt_optimizer.pt")  # round 1, the checkpoint round 2
    with pytest.raises(ValueError, match="is from round 1, the checkpoint .* from round 2"):
        export(tiny_job("fedopt", rounds=4, addons=Addons(resume_from=str(tmp_path))), tmp_path / "out")
