"""Dropout's mask kernel on the CPU: PyTorch's ``F.dropout`` vs uniform masks (``UniformDropoutMasks``), side by side.

Three measurements, the kernels interleaved in one process, medians of ``--rounds`` rounds:

1. one dropout forward + backward (p = 0.5) on a (256, 256) batch of activations, and a forward on
   (16 384, 256) (an MC chunk); also the uniform-mask kernel as it was before its mask was kept scaled
   ("boolean mask": ``x * (u > p) * (1 / (1 - p))`` forward, two multiplications backward), and the population's
   ``MemberDropout`` on (24, 256, 256) (the swap study's 24 members) both ways;
2. one training step of the d2l MLP (784-256-256-10, dropout 0.5/0.5, batch 256, SGD): PyTorch's kernel,
   uniform masks, and no dropout (p = 0) for what dropout costs at all;
3. ``mc_predict`` over ``--mc-images`` random images × T = ``--mc-passes`` with each kernel.

Usage:
    python benchmarks/dropout_kernel.py [--rounds 5] [--device auto] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.compile_step import make_step  # noqa: E402
from benchmarks.speed import add_device_args, chosen_device, device_name, interleaved_times  # noqa: E402
from dropout_lab.dropout import Dropout, uniform_like  # noqa: E402
from dropout_lab.models import DropoutMLP  # noqa: E402
from dropout_lab.stacked import MemberDropout  # noqa: E402
from dropout_lab.uncertainty import mc_predict  # noqa: E402


def set_uniform(module: torch.nn.Module, uniform: bool) -> torch.nn.Module:
    """What the ``UniformDropoutMasks`` callback does to every ``Dropout`` layer."""
    for m in module.modules():
        if isinstance(m, Dropout):
            m.uniform_masks = uniform
    return module


def layer_paths(device: torch.device) -> dict[str, Callable[[], object]]:
    """(1): the layer alone, each kernel."""
    small = torch.randn(256, 256, device=device, requires_grad=True)
    chunk = torch.randn(16_384, 256, device=device)
    paths: dict[str, Callable[[], object]] = {}
    for uniform in (False, True):
        layer = set_uniform(Dropout(0.5), uniform)
        name = "uniform masks" if uniform else "F.dropout"

        def train(layer: Dropout = layer) -> object:
            layer(small).sum().backward()
            return small.grad

        def mc(layer: Dropout = layer) -> object:
            with torch.no_grad():
                return layer(chunk)

        paths[f"layer fwd+bwd (256, 256), {name}"] = train
        paths[f"layer fwd (16384, 256), {name}"] = mc

    def boolean(x: Tensor, p: float) -> Tensor:  # the uniform-mask kernel before its mask was kept scaled
        return x * (uniform_like(x) > p) * (1.0 / (1.0 - p))

    def member_boolean(x: Tensor, p: Tensor) -> Tensor:  # MemberDropout before its mask was kept scaled
        return x * (uniform_like(x) >= p) / (1.0 - p)

    paths["layer fwd+bwd (256, 256), boolean mask"] = lambda: boolean(small, 0.5).sum().backward()
    members = torch.randn(24, 256, 256, device=device, requires_grad=True)
    layer = MemberDropout([0.5, 0.3, 0.5, 0.1, 0.5, 0.1, 0.9, 0.0] * 3).to(device).train()
    probs = layer.probs.view(-1, 1, 1)
    paths["MemberDropout fwd+bwd (24, 256, 256), uniform masks"] = lambda: layer(members).sum().backward()
    paths["MemberDropout fwd+bwd (24, 256, 256), boolean mask"] = lambda: (
        member_boolean(members, probs).sum().backward()
    )
    return paths


def step_paths(device: torch.device) -> dict[str, Callable[[], object]]:
    """(2): one training step of the d2l MLP (``compile_step.make_step``) with each kernel, and without dropout."""
    kernels = (("F.dropout", 0.5, False), ("uniform masks", 0.5, True), ("no dropout", 0.0, False))
    return {f"MLP training step, {name}": make_step(p, None, device, uniform) for name, p, uniform in kernels}


def mc_paths(device: torch.device, images: int, passes: int) -> dict[str, Callable[[], object]]:
    """(3): ``mc_predict`` with each kernel."""
    torch.manual_seed(0)
    model = DropoutMLP().to(device)
    x = torch.rand(images, 1, 28, 28, device=device)
    paths: dict[str, Callable[[], object]] = {}
    for uniform in (False, True):
        name = "uniform masks" if uniform else "F.dropout"
        paths[f"mc_predict {images} images x T={passes}, {name}"] = lambda u=uniform: mc_predict(
            set_uniform(model, u), x, passes
        )
    return paths


def main() -> None:
    """Time every path interleaved and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported")
    parser.add_argument("--repeats", type=int, default=20, help="calls of each layer/step path per round")
    parser.add_argument("--mc-images", type=int, default=2000, help="inputs of the mc_predict case")
    parser.add_argument("--mc-passes", type=int, default=100, help="passes of the mc_predict case")
    add_device_args(parser)
    args = parser.parse_args()
    device = chosen_device(args)

    groups = [
        (layer_paths(device), args.repeats),
        (step_paths(device), args.repeats),
        (mc_paths(device, args.mc_images, args.mc_passes), 1),
    ]
    runs = {name: (run, repeats) for paths, repeats in groups for name, run in paths.items()}
    times = {name: [t * 1e3 for t in ts] for name, ts in interleaved_times(runs, args.rounds, True).items()}

    print(f"\ndevice: {device_name(device)}; torch {torch.__version__}; median of {args.rounds} interleaved rounds\n")
    print("| path | ms | × uniform masks |")
    print("|---|---:|---:|")
    for name, values in times.items():
        base = name
        for other in ("F.dropout", "no dropout", "boolean mask"):
            base = base.replace(other, "uniform masks")
        ratio = statistics.median(values) / statistics.median(times[base])
        print(f"| {name} | {statistics.median(values):.3f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
