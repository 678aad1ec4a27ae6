"""``TopOneAccuracy`` equals torchmetrics' micro-averaged ``MulticlassAccuracy`` with fewer ops per update."""

from __future__ import annotations

import torch
from torchmetrics.classification import MulticlassAccuracy

from dropout_lab.metrics import TopOneAccuracy
from dropout_lab.op_audit import OpRecorder


def test_equals_multiclass_accuracy_bit_for_bit_with_ties() -> None:
    gen = torch.Generator().manual_seed(0)
    ours, theirs = TopOneAccuracy(), MulticlassAccuracy(10, average="micro", validate_args=False)
    for size in (256, 256, 37, 1):
        logits = torch.randint(0, 3, (size, 10), generator=gen).float()  # many tied maxima
        target = torch.randint(0, 10, (size,), generator=gen)
        ours.update(logits, target)
        theirs.update(logits, target)
        assert torch.equal(ours.compute(), theirs.compute())
    assert ours.compute().dtype == theirs.compute().dtype == torch.float32
    assert ours.total.item() == 256 + 256 + 37 + 1
    ours.reset()
    assert ours.total.item() == ours.correct.item() == 0


def test_no_update_is_zero() -> None:
    assert TopOneAccuracy().compute().item() == 0.0


def test_an_update_is_five_ops_against_fourteen() -> None:
    logits, target = torch.randn(256, 10), torch.randint(0, 10, (256,))
    counts = {}
    for name, metric in {
        "ours": TopOneAccuracy(),
        "theirs": MulticlassAccuracy(10, average="micro", validate_args=False),
    }.items():
        metric.update(logits, target)  # first update out of the count
        with OpRecorder() as counter:
            metric.update(logits, target)
        counts[name] = sum(counter.computing.values())
    assert counts["ours"] == 5, counts
    assert counts["theirs"] > counts["ours"], counts  # 14 with torchmetrics 1.9
