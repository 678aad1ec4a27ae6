"""MC dropout: vectorized ``mc_predict`` (batch repeated T times, chunked) vs a Python loop of T forwards.

``mc_predict`` runs by default with ``share_prefix`` (the layers before the first dropout once per input);
the third path is ``share_prefix=False`` (every copy through the whole net), to show what that lever is worth.

Two cases, side by side in one process, on the d2l MLP (784-256-256-10, dropout 0.5/0.5):
(a) few inputs, many passes: 12 images x T = 1000 (the loop pays T small forwards; the vectorized path a few
large ones); (b) many inputs, fewer passes: the 10k test images x T = 100 (the loop's forwards are already
large; the vectorized path must not be slower). Random weights and random images unless ``--ckpt`` /
``--data-dir`` are given (the speed does not depend on them). Each path runs once to warm up, then
``--rounds`` interleaved timed rounds; the table shows the median.

Usage:
    python benchmarks/mc_dropout.py [--rounds 3] [--device auto] [--n-test 10000] [--ckpt model.ckpt]
        [--data-dir data] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.speed import add_device_args, chosen_device, device_name  # noqa: E402
from dropout_lab.models import DropoutMLP  # noqa: E402
from dropout_lab.uncertainty import MCResult, mc_loop_predict, mc_predict  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run: Callable[[], MCResult], device: torch.device) -> tuple[float, MCResult]:
    """Wall time of one call (synchronizing CUDA at both ends) and its result."""
    _sync(device)
    start = time.perf_counter()
    result = run()
    _sync(device)
    return time.perf_counter() - start, result


def load_inputs(data_dir: str | None, n_test: int, n_few: int) -> tuple[torch.Tensor, str]:
    """Test images scaled to [0, 1] (the default ``normalize: false``), or uniform random images."""
    if data_dir is None:
        gen = torch.Generator().manual_seed(0)
        return torch.rand(max(n_test, n_few), 1, 28, 28, generator=gen), "random images"
    from dropout_lab.idx import find_or_install, load_arrays

    arrays = load_arrays(find_or_install(data_dir))
    return arrays.test_images[:, None].float().div_(255), f"FashionMNIST test images from {data_dir}"


def max_z(a: MCResult, b: MCResult) -> float:
    """Largest |difference of the predictive means| in standard errors (both runs independent)."""
    se = ((a.variance + b.variance) / a.T).sqrt().clamp_min(1e-12)
    return float(((a.mean_probs - b.mean_probs).abs() / se).max())


def main() -> None:
    """Time both paths for both cases and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed interleaved rounds; the median is reported")
    parser.add_argument("--n-few", type=int, default=12, help="inputs of case (a)")
    parser.add_argument("--t-few", type=int, default=1000, help="passes of case (a)")
    parser.add_argument("--n-test", type=int, default=10_000, help="inputs of case (b); lower it on a slow CPU")
    parser.add_argument("--t-many", type=int, default=100, help="passes of case (b)")
    parser.add_argument("--ckpt", default=None, help="a DropoutMLP checkpoint (default: random weights)")
    parser.add_argument("--data-dir", default=None, help="FashionMNIST folder (default: random images)")
    add_device_args(parser)
    args = parser.parse_args()
    device = chosen_device(args)

    torch.manual_seed(0)
    model = DropoutMLP.load_from_checkpoint(args.ckpt, map_location=device) if args.ckpt else DropoutMLP()
    model = model.to(device)
    images, source = load_inputs(args.data_dir, args.n_test, args.n_few)
    images = images.to(device)
    cases = {
        f"(a) {args.n_few} images x T={args.t_few}": (images[: args.n_few], args.t_few),
        f"(b) {min(args.n_test, len(images))} images x T={args.t_many}": (images[: args.n_test], args.t_many),
    }
    paths: dict[str, Callable[[torch.Tensor, int], MCResult]] = {
        "vectorized": lambda x, t: mc_predict(model, x, t),
        "vectorized, no prefix sharing": lambda x, t: mc_predict(model, x, t, share_prefix=False),
        "loop": lambda x, t: mc_loop_predict(model, x, t),
    }
    times: dict[tuple[str, str], list[float]] = {(c, p): [] for c in cases for p in paths}
    results: dict[tuple[str, str], MCResult] = {}
    for r in range(args.rounds + 1):  # round 0 warms up (allocator, kernels, thread pools)
        for case, (x, t) in cases.items():
            for path, run in paths.items():
                seconds, results[case, path] = timed(lambda run=run, x=x, t=t: run(x, t), device)
                if r:
                    times[case, path].append(seconds)
                    print(f"round {r}/{args.rounds}  {case}  {path}: {seconds:.3f} s", file=sys.stderr)

    print(f"\ndevice: {device_name(device)}; torch {torch.__version__}")
    print(f"model: d2l DropoutMLP 784-256-256-10, {'checkpoint ' + args.ckpt if args.ckpt else 'random weights'}")
    print(f"inputs: {source}; median of {args.rounds} interleaved rounds after one warm-up\n")
    print(
        "| case | vectorized (s) | no prefix sharing (s) | loop (s) | loop / vectorized | no sharing / vectorized "
        "| max abs z of mean_probs vs loop |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for case in cases:
        vec, flat, loop = (statistics.median(times[case, p]) for p in paths)
        z = max_z(results[case, "vectorized"], results[case, "loop"])
        print(f"| {case} | {vec:.4f} | {flat:.4f} | {loop:.4f} | {loop / vec:.1f}x | {flat / vec:.2f}x | {z:.2f} |")
    if args.n_test < 10_000:
        print(f"\nnote: case (b) ran on {args.n_test} of the 10k test images (--n-test)")


if __name__ == "__main__":
    main()
