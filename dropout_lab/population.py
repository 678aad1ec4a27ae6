"""A population of dropout MLPs trained as one LightningModule: stacked weights, batched matmuls.

A study's cells × seeds of one architecture become the members of one :class:`PopulationMLP`. Every member has
its own initialization, its own per-layer dropout probabilities, its own weight decay and its own dropout masks;
all members see the same batches, or, with ``data.shuffle_seeds``, member ``c<cell>s<j>`` sees the training order
of seed j (what a separate run of that seed sees). The loss is the sum of the members' mean losses, so each
member's gradient is exactly the gradient it would get alone (``tests/test_population.py`` trains K independent
``DropoutMLP`` s and the population side by side and compares every weight). One optimizer step updates all K
members: K times the math per launch, which is what a launch-bound GPU needs, and one process instead of K on the
CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from jsonargparse.typing import NonNegativeFloat, PositiveInt
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn

from dropout_lab.classifier import ClassifierModule
from dropout_lab.member_gradients import MemberGradients
from dropout_lab.nets import NUM_CLASSES, NUM_INPUTS
from dropout_lab.population_report import CellReport
from dropout_lab.stacked import MemberDropout, StackedLinear, member_generators
from dropout_lab.types import Probability

__all__ = ["MemberDropout", "PopulationMLP", "StackedLinear"]


def _best(name: str) -> str:
    """Buffer name of a parameter's best-validation copy."""
    return "best_" + name.replace(".", "_")


class PopulationMLP(CellReport, MemberGradients, ClassifierModule):
    """``cells × members_per_cell`` dropout MLPs (the d2l architecture) trained together as one module.

    Logs the population means ``train/loss``, ``train/acc``, ``val/acc``, ``test/acc`` and, per member,
    ``train/acc/<member>``, ``val/acc/<member>``, ``val/loss/<member>``, ``test/acc/<member>`` and
    ``test/loss/<member>``, with member names ``c<cell>s<j>`` (member j of cell c). After a test it prints
    each cell's mean ± std test accuracy and writes that table to ``<log_dir>/test_cells.md``. A ``ClassifierModule``
    for the CLI's sake, with its own steps (``mc`` and ``predict`` are not supported).

    Args:
        hidden_sizes: width of each hidden layer (shared by all members).
        dropouts: per cell, the dropout probability after each hidden layer (e.g. ``[[0.5, 0.5], [0.1, 0.5]]``).
        weight_decays: per cell, the L2 weight decay (added to the gradients as ``wd · θ``, exactly as
            ``torch.optim.SGD(weight_decay=wd)`` does); one value applies to every cell.
        members_per_cell: members (seeds) per cell.
        init_seed: member ``m`` (cells first, then seeds) is initialized from seed ``init_seed + m``: a member of
            seed s starts from the weights a ``DropoutMLP`` of these sizes has when built after
            ``torch.manual_seed(s)``, which is how a run with ``seed_everything: s`` starts.
        init_seeds: instead of ``init_seed``, one seed per member of a cell (``members_per_cell`` of them): member
            ``c<cell>s<j>`` of every cell is initialized from ``init_seeds[j]``, as a study's run of seed
            ``init_seeds[j]`` starts every cell from the same weights (``study --population`` passes its seeds).
        test_weights: ``best``: each member is tested with its own weights of its best ``val/acc/<member>``
            epoch (kept in the module's state, so also in every checkpoint), as a separate run would test its
            best checkpoint; ``current``: the weights as they are.
        optimizer: optimizer factory over the stacked parameters; null = SGD with lr 0.1. SGD's weight decay
            belongs in ``weight_decays``; another optimizer's own ``weight_decay`` (Adam's, AdamW's) acts on
            every element alike, so each member decays as a separate run with it would.
        micro_batch_size: split each training batch into micro-batches of this many images, one optimizer step
            each, in one Lightning step; with data.batch_size = K × micro_batch_size the updates equal those of
            batch micro_batch_size at 1/K of Lightning's per-step cost (speed option; null = off).
    """

    logits_batch_dim = 1  # logits are (K, B, 10)

    def __init__(
        self,
        hidden_sizes: Sequence[PositiveInt] = (256, 256),
        dropouts: Sequence[Sequence[Probability]] = ((0.5, 0.5),),
        weight_decays: Sequence[NonNegativeFloat] = (0.0,),
        members_per_cell: PositiveInt = 3,
        init_seed: int = 0,
        init_seeds: Sequence[int] | None = None,
        test_weights: Literal["best", "current"] = "best",
        optimizer: OptimizerCallable | None = None,
        micro_batch_size: PositiveInt | None = None,
    ) -> None:
        super().__init__(optimizer, micro_batch_size=micro_batch_size)
        cells = len(dropouts)
        if any(len(p) != len(hidden_sizes) for p in dropouts):
            raise ValueError(f"model.dropouts: every cell needs {len(hidden_sizes)} probabilities, got {dropouts}")
        if len(weight_decays) not in (1, cells):
            raise ValueError(f"model.weight_decays: give 1 value or one per cell ({cells}), got {weight_decays}")
        if init_seeds is not None and len(init_seeds) != members_per_cell:
            raise ValueError(
                f"model.init_seeds: give one seed per member of a cell ({members_per_cell}), got {list(init_seeds)}"
            )
        self.save_hyperparameters(ignore=["optimizer"])
        self.k = cells * members_per_cell
        self.names = [f"c{c}s{s}" for c in range(cells) for s in range(members_per_cell)]
        member_p = [dropouts[m // members_per_cell] for m in range(self.k)]
        self.cell_wds = [float(w) for w in weight_decays] * (cells if len(weight_decays) == 1 else 1)
        wds = self.cell_wds
        self.register_buffer(
            "wd",
            torch.tensor([wds[m // members_per_cell] for m in range(self.k)], dtype=torch.float32),
            persistent=False,
        )
        self._decays = any(w > 0 for w in wds)  # known on the host: no step asks the device
        order = torch.arange(self.k) % members_per_cell  # member c<cell>s<j> trains on stacked order j
        self.register_buffer("member_order", order, persistent=False)
        if init_seeds is None:
            member_seeds = [init_seed + m for m in range(self.k)]
        else:
            member_seeds = [int(init_seeds[m % members_per_cell]) for m in range(self.k)]
        generators = member_generators(member_seeds)  # each consumed layer by layer, as nn.Linear draws
        layers: list[nn.Module] = []
        width = NUM_INPUTS
        for i, size in enumerate(hidden_sizes):
            layers += [StackedLinear(width, size, generators), nn.ReLU(), MemberDropout([p[i] for p in member_p])]
            width = size
        layers.append(StackedLinear(width, NUM_CLASSES, generators))
        self.net = nn.Sequential(*layers)
        self.loss_fn = nn.CrossEntropyLoss(reduction="none")
        self._sums: dict[str, Tensor] = {}
        self._seen: dict[str, int] = {}  # images counted per stage since its last epoch end
        self.test_weights = test_weights
        self.register_buffer("best_val_acc", torch.full((self.k,), -1.0, dtype=torch.float32))
        for name, param in self.named_parameters():
            self.register_buffer(_best(name), param.detach().clone())
        self._backup: list[Tensor] = []
        self._member_losses: Tensor | None = None  # the last training step's (K,) losses, set by train_loss

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> PopulationMLP:
        """``.to()``, ``.half()``, ``.cuda()``…: ``wd`` and ``best_val_acc`` follow the device, never a dtype cast.

        Under ``Trainer(precision="bf16-true")`` a bf16 ``best_val_acc`` (spacing 0.0039 near 0.85) would let a
        worse epoch count as an improvement, and a bf16 weight decay 0.001 would be 0.000999451.
        """
        kept = {name: self.get_buffer(name) for name in ("wd", "best_val_acc")}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self.get_buffer(name)
            if new.dtype != old.dtype:
                setattr(self, name, old.to(new.device))
        return self

    def _orders(self, stacked: int) -> Tensor:
        """Member → index of its training order in a stacked batch of ``stacked`` orders (its seed index j)."""
        per_cell = self.hparams.members_per_cell
        if stacked != per_cell:
            raise ValueError(
                f"PopulationMLP: a batch of {stacked} stacked training orders (data.shuffle_seeds) needs one per "
                f"member of a cell (members_per_cell = {per_cell})"
            )
        return self.member_order

    def forward(self, x: Tensor) -> Tensor:
        """Images (B, 1, 28, 28) → logits (K, B, 10), one slice per member; or stacked orders (B, S, 1, 28, 28).

        With S stacked training orders (``data.shuffle_seeds``), member ``c<cell>s<j>`` gets order j's images.
        """
        dtype = self.net[0].weight.dtype
        if x.dim() == 5:
            flat = x.reshape(x.shape[0], x.shape[1], -1).transpose(0, 1).to(dtype)  # (S, B, 784)
            return self.net(flat.index_select(0, self._orders(x.shape[1])))
        flat = x.reshape(x.shape[0], -1).to(dtype)
        return self.net(flat.unsqueeze(0).expand(self.k, -1, -1))

    def member_targets(self, y: Tensor) -> Tensor:
        """Labels (K, B) per member, from shared labels (B,) or stacked orders' labels (B, S)."""
        if y.dim() == 2:
            return y.t().index_select(0, self._orders(y.shape[1]))
        return y.unsqueeze(0).expand(self.k, -1)

    def member_losses(self, logits: Tensor, y: Tensor) -> Tensor:
        """(K,) mean cross-entropy of each member; ``y``: labels (B,), or (B, S) for stacked orders."""
        k, b, c = logits.shape
        return self.loss_fn(logits.reshape(k * b, c), self.member_targets(y).reshape(k * b)).view(k, b).mean(dim=1)

    def _count(self, stage: str, logits: Tensor, y: Tensor, losses: Tensor | None = None) -> None:
        """Accumulate per-member correct counts (and loss sums) on the device: no host sync per step."""
        correct = (logits.argmax(dim=-1) == self.member_targets(y)).sum(dim=1).to(torch.float64)
        n = y.shape[0]  # images per member (the batch is first in both layouts)
        self._seen[stage] = self._seen.get(stage, 0) + n  # counted on the host: no host-to-device copy
        parts = {"correct": correct} | ({} if losses is None else {"loss": losses.detach().double() * n})
        for key, value in parts.items():
            name = f"{stage}/{key}"
            self._sums[name] = self._sums[name] + value if name in self._sums else value.clone()

    def _log_epoch(self, stage: str) -> None:
        if stage not in self._seen:
            return
        n = self._seen.pop(stage)
        acc = self._sums.pop(f"{stage}/correct") / n
        if stage == "val" and self.trainer.state.fn == TrainerFn.FITTING and not self.trainer.sanity_checking:
            self._keep_best(acc.float())
        self.log(f"{stage}/acc", acc.mean().float())
        for name, value in zip(self.names, acc.float(), strict=True):
            self.log(f"{stage}/acc/{name}", value)
        if f"{stage}/loss" in self._sums:
            losses = self._sums.pop(f"{stage}/loss") / n
            self.log(f"{stage}/loss", losses.mean().float())
            for name, value in zip(self.names, losses.float(), strict=True):
                self.log(f"{stage}/loss/{name}", value)
        if stage == "test":
            self._report_cells(acc)

    @torch.no_grad()
    def _keep_best(self, acc: Tensor) -> None:
        """Copy the weights of every member whose validation accuracy improved into its ``best_*`` buffers."""
        improved = acc > self.best_val_acc
        self.best_val_acc.copy_(torch.where(improved, acc, self.best_val_acc))
        for name, param in self.named_parameters():
            best = self.get_buffer(_best(name))
            best.copy_(torch.where(improved.view(-1, *[1] * (param.dim() - 1)), param, best))

    @property
    def test_in_memory_after_fit(self) -> bool:  # type: ignore[override]
        """With ``test_weights: best``, ``fit``'s test uses this module (its members' best weights are in it).

        Not the best checkpoint of a ``checkpoint.monitor`` such as the CLI's default ``val/acc`` (the members'
        mean): its copies of the members' best weights stop at that epoch.
        """
        return self.test_weights == "best"

    def on_test_epoch_start(self) -> None:
        """With ``test_weights: best``, swap in each member's best-validation weights (restored after the test)."""
        if self.test_weights != "best" or not bool((self.best_val_acc >= 0).all()):
            return
        with torch.no_grad():
            for name, param in self.named_parameters():
                self._backup.append(param.detach().clone())
                param.copy_(self.get_buffer(_best(name)))

    def on_test_end(self) -> None:
        """Put the current weights back after a test with the best ones."""
        with torch.no_grad():
            for param, saved in zip(self.parameters(), self._backup, strict=False):
                param.copy_(saved)
        self._backup = []

    def train_loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Sum of the members' mean losses (each member gets exactly its own gradient); logged: their mean.

        The base class's ``training_step`` (and its micro-batch loop) calls this. Weight decay is not a loss term
        here: :meth:`on_before_optimizer_step` adds it to the gradients.
        """
        logits = self(x)
        losses = self.member_losses(logits, y)
        self._count_train(logits.detach(), y)
        self._member_losses = losses.detach()  # kept for divergence_detail: which member's loss broke
        return losses.sum(), losses.detach().mean()

    def count_train(self, logits: Tensor, y: Tensor) -> None:
        """Add a batch's logits (K, B, 10) and labels to each member's training accuracy."""
        self._count("train", logits, y)

    def on_train_epoch_end(self) -> None:
        """Log the population's mean training accuracy and ``train/acc/<member>`` (dropout on)."""
        self._log_epoch("train")

    def _eval_step(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        """Accumulate each member's accuracy and loss (the base class's validation/test steps call this)."""
        x, y = batch
        logits = self(x)
        self._count(stage, logits, y, self.member_losses(logits, y))

    def on_validation_epoch_end(self) -> None:
        """Log ``val/acc`` and ``val/loss`` (population means), ``val/acc/<member>`` and ``val/loss/<member>``."""
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        """Log ``test/acc`` and ``test/loss`` (population means), ``test/acc/<member>`` and ``test/loss/<member>``."""
        self._log_epoch("test")

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Each member's class probabilities (K, B, 10) and the targets."""
        x, y = batch
        return {"probs": self(x).softmax(dim=-1), "target": y}
