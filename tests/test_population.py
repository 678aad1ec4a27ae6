"""PopulationMLP: K members trained as one must equal K models trained alone; per-member dropout statistics."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import synthetic_cli_args
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dropout_lab.cli import DropoutLabCLI
from dropout_lab.models import DropoutMLP
from dropout_lab.population import PopulationMLP
from dropout_lab.stacked import MemberDropout, StackedLinear

ROOT = Path(__file__).resolve().parents[1]
DROPOUTS = yaml.safe_load((ROOT / "configs" / "population_swap.yaml").read_text())["model"]["init_args"]["dropouts"]


def batches(n: int = 192, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=64, shuffle=False)


def fit(model: L.LightningModule, steps: int, accumulate: int = 1, clip: float | None = None,
        clip_algorithm: str = "norm", seed: int = 0) -> None:  # fmt: skip
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=accumulate,
                        gradient_clip_val=clip, gradient_clip_algorithm=clip_algorithm)  # fmt: skip
    trainer.fit(model, train_dataloaders=batches(seed=seed))


def linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize(
    ("accumulate", "clip", "algorithm"), [(1, None, "norm"), (2, None, "norm"), (1, 0.05, "norm"), (2, 0.05, "norm"),
                                          (1, 0.002, "value")]
)  # fmt: skip
def test_members_train_exactly_like_independent_models(accumulate: int, clip: float | None, algorithm: str) -> None:
    """No dropout (so no randomness): 2 cells (weight decay 0 and 0.05) × 2 members vs 4 DropoutMLPs.

    With ``accumulate_grad_batches`` 2 too: the weight decay is added once per optimizer step, as SGD adds it.
    With gradient clipping: each member is clipped by its own gradient (not the population's), before its
    weight decay is added, as a separate run clips and then SGD adds the decay.
    """
    wds = [0.0, 0.0, 0.05, 0.05]
    sgd = partial(torch.optim.SGD, lr=0.1, momentum=0.9)
    singles = []
    for k, wd in enumerate(wds):
        torch.manual_seed(100 + k)
        singles.append(DropoutMLP((32, 16), (0.0, 0.0), optimizer=partial(sgd, weight_decay=wd)))
    pop = PopulationMLP((32, 16), [(0.0, 0.0), (0.0, 0.0)], [0.0, 0.05], members_per_cell=2, optimizer=sgd)
    stacked = [m for m in pop.modules() if isinstance(m, StackedLinear)]
    for k, single in enumerate(singles):
        for layer, linear in zip(stacked, linears(single), strict=True):
            layer.load_linear(k, linear)
    for single in singles:
        fit(single, steps=6, accumulate=accumulate, clip=clip, clip_algorithm=algorithm)
    fit(pop, steps=6, accumulate=accumulate, clip=clip, clip_algorithm=algorithm)
    for k, single in enumerate(singles):
        for layer, linear in zip(stacked, linears(single), strict=True):
            torch.testing.assert_close(layer.weight[k].T, linear.weight, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(layer.bias[k, 0], linear.bias, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(stacked[0].weight[0], stacked[0].weight[1])  # members start (and stay) distinct


def test_member_dropout_rates_and_means() -> None:
    torch.manual_seed(0)
    ps = [0.0, 0.1, 0.5, 0.8]
    layer = MemberDropout(ps).train()
    n = 200_000
    out = layer(torch.ones(len(ps), n // 100, 100))
    for k, p in enumerate(ps):
        dropped = (out[k] == 0).float().mean().item()
        assert abs(dropped - p) <= 4 * math.sqrt(p * (1 - p) / n) + 1e-9, (p, dropped)
        sd = math.sqrt(p / (1 - p) / n)  # std of the mean of inverted-dropout outputs of ones
        assert abs(out[k].mean().item() - 1.0) <= 4 * sd + 1e-9, (p, out[k].mean().item())
    assert torch.equal(layer.eval()(torch.ones(4, 3, 5)), torch.ones(4, 3, 5))
    with pytest.raises(ValueError, match="dropouts"):
        MemberDropout([0.5, 1.0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_member_dropout_keeps_the_input_dtype_and_rounds_like_the_formula(dtype: torch.dtype) -> None:
    """Output and gradient come back in ``x``'s dtype and equal ``x · [u ≥ p] · (1 / (1 − p))`` from the same draws.

    The layer is cast to ``dtype`` as ``Trainer(precision="bf16-true" / "64-true")`` casts a module; its ``p`` and
    scale stay in the masks' dtype (float32, float64 for float64 input), never rounded to a half type. The product
    is rounded once to ``x``'s dtype, so against ``x / (1 − p)`` it is off by at most ~1 ulp.
    """
    ps = [0.0, 0.1, 0.5, 0.8]
    layer = MemberDropout(ps).train().to(dtype)
    mask_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert layer.probs.dtype == layer.scales.dtype == mask_dtype
    x = torch.randn(len(ps), 64, 32).to(dtype).requires_grad_()
    torch.manual_seed(3)
    out = layer(x)
    torch.manual_seed(3)
    u = torch.rand(x.shape, dtype=mask_dtype)
    p = torch.tensor(ps, dtype=torch.float64).view(-1, 1, 1)
    keep = (u >= p.to(mask_dtype)).to(mask_dtype) * (1.0 / (1.0 - p)).to(mask_dtype)
    assert out.dtype == dtype
    assert torch.equal(out, (x.detach() * keep).to(dtype))
    divided = torch.where(keep > 0, x.detach().double() / (1.0 - p), 0.0)
    torch.testing.assert_close(out.double(), divided, rtol=2 * torch.finfo(dtype).eps, atol=0)
    grad = torch.randn_like(out)
    out.backward(grad)
    assert x.grad.dtype == dtype
    assert torch.equal(x.grad, (grad * keep).to(dtype))


def test_masks_differ_between_members_and_steps() -> None:
    torch.manual_seed(0)
    layer = MemberDropout([0.5, 0.5]).train()
    a, b = layer(torch.ones(2, 8, 64)), layer(torch.ones(2, 8, 64))
    assert not torch.equal(a[0], a[1]) and not torch.equal(a, b)


def test_bad_cells_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"model\.dropouts"):
        PopulationMLP((32, 16), [(0.5,)])
    with pytest.raises(ValueError, match=r"model\.weight_decays"):
        PopulationMLP((32, 16), [(0.5, 0.5)] * 3, [0.0, 0.1])


def test_population_config_through_the_cli(gz_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASHION_MNIST_DIR", str(gz_dir))
    monkeypatch.chdir(tmp_path)
    args = synthetic_cli_args(ROOT / "configs" / "population_swap.yaml", tmp_path)
    cli = DropoutLabCLI(args=["fit", *args, "--trainer.max_epochs", "1", "--model.members_per_cell", "2"])
    metrics = cli.trainer.callback_metrics
    assert cli.model.k == 16
    members = [float(metrics[f"test/acc/c{c}s{s}"]) for c in range(8) for s in range(2)]
    assert float(metrics["test/acc"]) == pytest.approx(sum(members) / len(members), abs=1e-6)
    # the per-cell table after the test: mean ± std of the members' logged test/acc, one row per cell
    rows = (Path(cli.trainer.log_dir) / "test_cells.md").read_text().splitlines()[2:]
    assert len(rows) == 8
    for c, row in enumerate(rows):
        cells = [part.strip() for part in row.strip("|").split("|")]
        assert cells[:4] == [f"c{c}", "[" + ", ".join(f"{p:g}" for p in DROPOUTS[c]) + "]", "0", "2"]
        pair = [100 * members[2 * c], 100 * members[2 * c + 1]]
        mean, std = (float(v) for v in cells[4].split(" ± "))
        assert mean == pytest.approx(sum(pair) / 2, abs=0.006)
        assert std == pytest.approx(abs(pair[0] - pair[1]) / math.sqrt(2), abs=0.006)


def test_each_member_keeps_its_best_validation_weights() -> None:
    pop = PopulationMLP((8,), [(0.0,), (0.5,)], members_per_cell=1)
    first = pop.net[0].weight.detach().clone()
    pop._keep_best(torch.tensor([0.5, 0.6]))
    with torch.no_grad():
        for param in pop.parameters():
            param.add_(1.0)
    pop._keep_best(torch.tensor([0.7, 0.4]))  # member 0 improved, member 1 did not
    best = pop.get_buffer("best_net_0_weight")
    torch.testing.assert_close(best[0], first[0] + 1.0)
    torch.testing.assert_close(best[1], first[1])
    assert pop.best_val_acc.tolist() == pytest.approx([0.7, 0.6])
    current = pop.net[0].weight.detach().clone()
    pop.on_test_epoch_start()  # tests run on the best weights ...
    torch.testing.assert_close(pop.net[0].weight, best)
    pop.on_test_end()  # ... and training weights come back
    torch.testing.assert_close(pop.net[0].weight, current)
    assert "best_net_0_weight" in pop.state_dict()  # kept in checkpoints


def test_cell_table_reports_no_spread_for_a_single_member() -> None:
    one = PopulationMLP((8,), [(0.0,), (0.5,)], members_per_cell=1).cell_table(torch.tensor([0.8, 0.7]))
    assert [row.split("|")[5].strip() for row in one.splitlines()[2:]] == ["80.00 ± —", "70.00 ± —"]
    two = PopulationMLP((8,), [(0.5,)], members_per_cell=2).cell_table(torch.tensor([0.8, 0.7]))
    assert two.splitlines()[2].split("|")[5].strip() == f"75.00 ± {math.sqrt(50):.2f}"


def test_cell_table_shows_the_optimizers_own_weight_decay_also_after_a_checkpoint() -> None:
    acc = torch.tensor([0.5, 0.7])
    adamw = PopulationMLP((8,), [(0.5,)], [0.0], members_per_cell=2,
                          optimizer=partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.05))  # fmt: skip
    assert adamw.cell_table(acc).splitlines()[2].split("|")[3].strip() == "0"  # no optimizer built yet: not known
    adamw.configure_optimizers()
    assert adamw.cell_table(acc).splitlines()[2].split("|")[3].strip() == "0 + AdamW 0.05"
    checkpoint: dict = {}
    adamw.on_save_checkpoint(checkpoint)
    loaded = PopulationMLP((8,), [(0.5,)], [0.0], members_per_cell=2)  # a later `test`: no optimizer of its own
    loaded.on_load_checkpoint(checkpoint)
    assert loaded.cell_table(acc).splitlines()[2].split("|")[3].strip() == "0 + AdamW 0.05"
    sgd = PopulationMLP((8,), [(0.5,)], [0.001], members_per_cell=2)
    sgd.configure_optimizers()  # the default SGD has no weight decay of its own: only the members' column value
    assert sgd.cell_table(acc).splitlines()[2].split("|")[3].strip() == "0.001"


def test_a_half_precision_cast_keeps_weight_decay_and_best_accuracy_exact() -> None:
    """``Trainer(precision="bf16-true")`` casts the module: weights go bf16, the bookkeeping stays float32."""
    pop = PopulationMLP((8,), [(0.1,), (0.5,)], weight_decays=[1e-3], members_per_cell=1).to(torch.bfloat16)
    assert pop.net[0].weight.dtype == torch.bfloat16
    assert pop.wd.dtype == pop.best_val_acc.dtype == torch.float32
    assert pop.wd.tolist() == [torch.tensor(1e-3).item()] * 2  # float32's 0.001, not bf16's 0.000999451
    assert pop(torch.randn(4, 1, 28, 28, dtype=torch.bfloat16)).dtype == torch.bfloat16
    pop._keep_best(torch.tensor([0.8561, 0.5]))
    pop._keep_best(torch.tensor([0.8559, 0.5]))  # worse: in bf16 both would round to 0.85546875 and 0.8559 "beat" it
    assert pop.best_val_acc.tolist() == pytest.approx([0.8561, 0.5], abs=1e-7)
    assert "| 0.001 |" in pop.cell_table(torch.tensor([0.5, 0.5]))


def test_loss_sums_accumulate_in_float64() -> None:
    """An epoch's loss sum grows past 1e5; summed in bf16 (spacing 512 there) it would be off by whole percents."""
    pop = PopulationMLP((8,), [(0.5,)], members_per_cell=2)
    logits, y = torch.zeros(2, 256, 10), torch.zeros(256, dtype=torch.long)
    losses = torch.tensor([2.015625, 0.30078125], dtype=torch.bfloat16)  # exact in bf16
    for _ in range(235):  # one epoch of 60k images in batches of 256
        pop._count("val", logits, y, losses)
    assert pop._sums["val/loss"].tolist() == [235 * 256 * 2.015625, 235 * 256 * 0.30078125]


def test_fit_tests_the_members_best_weights_also_with_a_mean_val_acc_monitor(
    gz_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI's default ``checkpoint.monitor: val/acc`` (the members' mean) picks one epoch for all members;
    testing that checkpoint would undo ``test_weights: best``, so ``fit`` tests the module as it is."""
    monkeypatch.setenv("FASHION_MNIST_DIR", str(gz_dir))
    monkeypatch.chdir(tmp_path)
    args = synthetic_cli_args(ROOT / "configs" / "population_swap.yaml", tmp_path)
    options = ["--trainer.max_epochs=3", "--model.members_per_cell=1", "--checkpoint.monitor=val/acc"]
    cli = DropoutLabCLI(args=["fit", *args, *options, "--checkpoint.filename=best{epoch}"])
    assert cli.model.test_in_memory_after_fit and cli.trainer.checkpoint_callback.best_model_path
    assert cli.trainer.ckpt_path is None  # the test ran on the weights in memory, not on best*.ckpt
    tested = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("test/acc/")}
    assert len(tested) == 8
    last = cli.trainer.checkpoint_callback.last_model_path  # = the weights in memory, best_* buffers included
    again = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=last, verbose=False)[0]
    assert {k: again[k] for k in tested} == pytest.approx(tested, abs=1e-6)
    assert not PopulationMLP((8,), [(0.0,)], test_weights="current").test_in_memory_after_fit


def test_divergence_detail_names_the_members_with_non_finite_weights_or_loss() -> None:
    pop = PopulationMLP((8,), [(0.0,), (0.5,)], members_per_cell=2)
    assert pop.divergence_detail() == "every member's weights and last training loss are still finite"
    pop._member_losses = torch.tensor([0.1, 0.2, float("nan"), 0.3])  # member 2 = c1s0: its loss broke first
    assert pop.divergence_detail() == "members whose last training loss is not finite (weights still finite): c1s0"
    with torch.no_grad():
        pop.net[0].weight[1, 3, 2] = float("nan")  # member 1 = c0s1
        pop.net[-1].bias[2, 0, 5] = float("inf")  # member 2 = c1s0
    assert pop.divergence_detail() == "members with non-finite weights: c0s1, c1s0"  # c1s0 named once
    pop._member_losses = torch.tensor([0.1, 0.2, float("nan"), float("inf")])
    assert pop.divergence_detail() == (
        "members with non-finite weights: c0s1, c1s0; "
        "members whose last training loss is not finite (weights still finite): c1s1"
    )
