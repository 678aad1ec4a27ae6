"""``DirectSteps``: micro-batch optimizer steps without Lightning's dispatch make the same updates and hooks."""

from __future__ import annotations

import math
import pickle
from functools import partial

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from test_speed import fit

from dropout_lab.callbacks import ActivationVarianceMonitor
from dropout_lab.data import FashionMNISTDataModule
from dropout_lab.models import DropoutMLP, LeNet
from dropout_lab.population import PopulationMLP
from dropout_lab.steps import HOOKS, direct_steps_refusal


class HookLog(Callback):
    """Every backward / optimizer-step hook call: its name, the step, the module's ``_current_fx_name`` and a
    fingerprint of what the hook sees (the loss, or the gradients' sum)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, str | None, float]] = []

    def on_train_start(self, trainer, pl_module) -> None:
        def pre_hook(optimizer, args, kwargs) -> None:  # torch's own: Lightning calls its hook after these
            self.calls.append(("step_pre_hook", trainer.global_step, pl_module._current_fx_name, 0.0))

        trainer.optimizers[0].register_step_pre_hook(pre_hook)

    def _grads(self, module: L.LightningModule) -> float:
        return sum(float(p.grad.sum()) for p in module.parameters() if p.grad is not None)

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self.calls.append(("on_before_backward", trainer.global_step, pl_module._current_fx_name, float(loss.detach())))

    def on_after_backward(self, trainer, pl_module) -> None:
        self.calls.append(("on_after_backward", trainer.global_step, pl_module._current_fx_name,
                           self._grads(pl_module)))  # fmt: skip

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        assert isinstance(optimizer, torch.optim.SGD)  # the torch optimizer, as Lightning passes it
        pl_module.log("hooked", 1.0)  # allowed in this hook, as under Lightning's dispatch
        self.calls.append(("on_before_optimizer_step", trainer.global_step, pl_module._current_fx_name,
                           self._grads(pl_module)))  # fmt: skip


def population(direct: bool) -> PopulationMLP:
    """4 members, per-cell weight decay: the module's own ``on_before_optimizer_step`` adds it to the gradients."""
    kwargs = {"dropouts": [[0.5, 0.5], [0.1, 0.9]], "weight_decays": [0.0, 1e-3], "members_per_cell": 2}
    model = PopulationMLP(**kwargs, optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9), micro_batch_size=64)
    model.direct_steps = direct
    return model


def mlp(direct: bool) -> DropoutMLP:
    model = DropoutMLP(optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9), micro_batch_size=64)
    model.direct_steps = direct
    return model


@pytest.mark.parametrize("make", [mlp, population], ids=["DropoutMLP", "PopulationMLP"])
def test_direct_steps_match_lightning_dispatch(make, synthetic_env: None) -> None:
    """Bit-equal weights, the same step count and the same hook calls, in the same order, seeing the same values."""
    runs = []
    for direct in (True, False):
        L.seed_everything(3, verbose=False)
        model, hooks = make(direct), HookLog()
        monitor = ActivationVarianceMonitor(every_n_steps=3)  # another callback with on_before_optimizer_step
        trainer = fit(model, 256, callbacks=[hooks, monitor])
        assert (model._steps is not None) == direct  # the path under test was the one taken
        runs.append((model, trainer, hooks, monitor))
    (a, ta, ha, ma), (b, tb, hb, mb) = runs
    assert ta.global_step == tb.global_step == 2 * math.ceil(500 / 64)
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert ha.calls == hb.calls
    steps = ta.global_step
    before_backward, after_backward, before_step = HOOKS
    assert [c[0] for c in ha.calls] == [before_backward, after_backward, "step_pre_hook", before_step] * steps
    assert [c[1] for c in ha.calls[::4]] == list(range(steps))  # before each step's counter moves
    assert all(name == fx for name, _, fx, _ in ha.calls if name in HOOKS)
    assert ma.history.keys() == mb.history.keys() and ma.history
    for key in ma.history:
        assert ma.history[key] == mb.history[key], key
    assert ta.callback_metrics["train/acc"] == tb.callback_metrics["train/acc"]


def test_a_fitted_module_pickles_without_its_trainer(synthetic_env: None) -> None:
    """``torch.save(model)``, ``ddp_spawn`` and ``deepcopy`` pickle the module: the fit's DirectSteps stays out."""
    model = DropoutMLP(micro_batch_size=64)
    fit(model, 256, epochs=1)
    assert model._steps is not None
    copy = pickle.loads(pickle.dumps(model))
    assert copy._steps is None and copy._deferred is None
    for p, q in zip(model.parameters(), copy.parameters(), strict=True):
        assert torch.equal(p, q)


def test_no_hooks_dispatched_where_nothing_overrides_them(synthetic_env: None) -> None:
    """LeNet alone: nothing overrides the three hooks, so a direct step is backward + step between the counters."""
    model = LeNet(micro_batch_size=64)
    trainer = fit(model, 256, epochs=1)
    assert model._steps is not None
    assert model._steps.hooks == {name: [] for name in HOOKS}
    assert trainer.global_step == math.ceil(500 / 64)


def test_the_shortcut_is_refused_where_it_would_leave_something_out(synthetic_env: None) -> None:
    """Refused under DDP, a gradient scaler, a precision plugin of one's own and a profiler (which times each hook);
    a profiled run then takes Lightning's dispatch."""
    assert direct_steps_refusal(L.Trainer(logger=False, accelerator="cpu", devices=1)) is None
    assert direct_steps_refusal(L.Trainer(logger=False, accelerator="cpu", precision="bf16-mixed")) is None
    assert direct_steps_refusal(L.Trainer(logger=False, accelerator="cpu", precision="bf16-true")) is None
    scaled = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    assert direct_steps_refusal(L.Trainer(logger=False, accelerator="cpu", plugins=[scaled])) == (
        "a gradient scaler (16-mixed)"
    )

    class OwnPrecision(Precision):
        pass

    own = L.Trainer(logger=False, accelerator="cpu", plugins=[OwnPrecision()])
    assert direct_steps_refusal(own) == "precision plugin OwnPrecision"
    profiled = L.Trainer(logger=False, accelerator="cpu", profiler="simple")
    assert direct_steps_refusal(profiled) == "profiler SimpleProfiler"
    ddp = L.Trainer(logger=False, accelerator="cpu", devices=2, strategy="ddp_spawn")
    assert direct_steps_refusal(ddp) == "strategy DDPStrategy"
    model = DropoutMLP(micro_batch_size=64)
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, profiler="simple")  # fmt: skip
    trainer.fit(model, FashionMNISTDataModule(batch_size=256, val_size=100))
    assert model._steps is None and trainer.global_step == math.ceil(500 / 64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_direct_steps_match_lightning_dispatch_on_cuda(synthetic_env: None) -> None:
    """On CUDA too: the same step count and hook calls, and the same weights (to float rounding: cuBLAS may pick
    other kernels between runs)."""
    runs = []
    for direct in (True, False):
        L.seed_everything(3, verbose=False)
        model, hooks = mlp(direct), HookLog()
        trainer = fit(model, 256, accelerator="gpu", callbacks=[hooks])
        assert (model._steps is not None) == direct
        runs.append((model, trainer, hooks))
    (a, ta, ha), (b, tb, hb) = runs
    assert ta.global_step == tb.global_step == 2 * math.ceil(500 / 64)
    assert [c[:3] for c in ha.calls] == [c[:3] for c in hb.calls]
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
