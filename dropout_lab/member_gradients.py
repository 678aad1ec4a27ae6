"""Per-member numerics of :class:`dropout_lab.population.PopulationMLP`: weight decay, clipping, divergence."""

from __future__ import annotations

import torch

__all__ = ["MemberGradients"]


class MemberGradients:
    """Each member's weight decay, and gradient clipping by each member's own norm.

    For a LightningModule whose parameters stack K members along dim 0, with ``wd`` (K,), ``_decays`` and
    ``hparams.members_per_cell`` (member ``m`` is ``c<m // members_per_cell>s<m % members_per_cell>``), and
    optionally ``_member_losses`` (K,), the last training step's loss per member.
    """

    @torch.no_grad()
    def divergence_detail(self) -> str:
        """The members whose weights, or whose last training loss, are not finite (for the divergence error).

        Read by :class:`~dropout_lab.reliability.DivergenceGuard` when it stops a fit. The loss is the last
        step's per-member losses the module kept in ``_member_losses`` (a reference, no copy and no sync per step).
        """
        rows = [~torch.isfinite(p).flatten(1).all(1) for p in self.parameters()]
        weights = torch.stack(rows).any(0).nonzero().flatten().tolist() if rows else []
        losses = getattr(self, "_member_losses", None)
        loss = (~torch.isfinite(losses)).nonzero().flatten().tolist() if losses is not None else []
        loss = [m for m in loss if m not in weights]  # a member already named for its weights is named once
        per_cell = int(self.hparams.get("members_per_cell", 1))  # without it: one member per cell
        named = [(weights, "members with non-finite weights"), (loss, "members whose last training loss is not "
                 "finite (weights still finite)")]  # fmt: skip
        parts = [f"{what}: " + ", ".join(f"c{m // per_cell}s{m % per_cell}" for m in bad) for bad, what in named if bad]
        return "; ".join(parts) or "every member's weights and last training loss are still finite"

    def _clipping(self) -> bool:
        """Whether Lightning clips gradients in this fit (``trainer.gradient_clip_val`` > 0, automatic steps)."""
        clip = self._trainer.gradient_clip_val if self._trainer is not None else None
        return self.automatic_optimization and clip is not None and clip > 0

    @torch.no_grad()
    def _add_weight_decay(self) -> None:
        """Add each member's ``wd · θ`` to its gradients, the term ``torch.optim.SGD(weight_decay=wd)`` adds."""
        if not self._decays:
            return
        for param in self.parameters():
            if param.grad is not None:
                param.grad.addcmul_(param, self.wd.view(-1, *[1] * (param.dim() - 1)))  # in float32, rounded once

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Add the members' weight decay to their gradients, once per optimizer step.

        Also with gradient accumulation or micro-batches, in one op per parameter. As an L2 term of the loss it
        cost about 50 ops a step (forward and backward), and the swap study (all wd = 0) paid them for nothing.
        When Lightning clips gradients, :meth:`configure_gradient_clipping` adds it instead, after the clipping,
        where SGD adds it.
        """
        if not self._clipping():
            self._add_weight_decay()

    @torch.no_grad()
    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip each member's gradient on its own, then add its weight decay (as a separate run clips, then SGD).

        Lightning's ``norm`` clipping would take one norm over all K stacked members, so a member with large
        gradients would shrink every other member's step. Here each member's gradient is scaled by
        ``min(1, clip / (‖g_member‖ + 1e-6))``, ``clip_grad_norm_``'s factor over that member's slices alone.
        ``value`` clipping is elementwise, so Lightning's own is already per member.
        """
        if not self._clipping():
            return  # the weight decay was added in on_before_optimizer_step
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if gradient_clip_algorithm == "value":
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        elif grads:
            squares = torch.stack([g.flatten(1).float().pow(2).sum(1) for g in grads]).sum(0)  # (K,)
            factor = (gradient_clip_val / (squares.sqrt() + 1e-6)).clamp(max=1.0)
            for g in grads:
                g.mul_(factor.view(-1, *[1] * (g.dim() - 1)).to(g.dtype))
        self._add_weight_decay()
