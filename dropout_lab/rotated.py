"""The rotated-image experiment (after Gal & Ghahramani's rotated digit): MC dropout as an image turns."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

import torch
from torch import Tensor, nn

from dropout_lab.uncertainty import mc_predict

__all__ = ["DEFAULT_ANGLES", "FASHION_MNIST_CLASSES", "RotatedResult", "rotated_image_experiment", "rotated_table"]

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
DEFAULT_ANGLES = tuple(float(a) for a in range(0, 360, 30))


class RotatedResult(TypedDict):
    """What :func:`rotated_image_experiment` returns (A angles, T passes, K top classes, C classes)."""

    angles: list[float]
    images: Tensor  # (A, 1, H, W) the rotated images, on the CPU
    classes: list[int]  # the K classes shown (highest predictive mean at any angle, best first)
    class_names: list[str]
    logits: Tensor  # (T, A, K) softmax-input samples of those classes
    probs: Tensor  # (T, A, K) softmax-output samples of those classes
    mean_probs: Tensor  # (A, C)
    predictive_entropy: Tensor  # (A,)
    mutual_information: Tensor  # (A,)


def rotated_image_experiment(
    module: nn.Module,
    image: Tensor,
    angles: Sequence[float] = DEFAULT_ANGLES,
    T: int = 1000,
    top_k: int = 3,
    fill: float | None = None,
    class_names: Sequence[str] = FASHION_MNIST_CLASSES,
) -> RotatedResult:
    """Rotate one image through ``angles`` and run T MC passes of all rotations in one vectorized call.

    As in Gal & Ghahramani's rotated-digit figure: as the image leaves the training distribution, the
    logits and probabilities of the top classes spread and the predictive entropy rises.

    Args:
        module: a network or LightningModule mapping (B, 1, H, W) images to (B, C) logits.
        image: one image (1, H, W) or (H, W), float, preprocessed as the net was trained.
        angles: rotation angles in degrees, counter-clockwise (default 0, 30, ..., 330).
        T: MC passes per rotated image.
        top_k: number of classes whose samples are kept.
        fill: value of the pixels uncovered by the rotation; None = the image's minimum (its background).
        class_names: names of the C classes (indices are used for classes past its end).
    """
    from torchvision.transforms.functional import InterpolationMode, rotate

    image = image.detach().float().cpu()
    image = image.unsqueeze(0) if image.dim() == 2 else image
    fill = float(image.min()) if fill is None else float(fill)
    images = torch.stack(
        [rotate(image, float(a), interpolation=InterpolationMode.BILINEAR, fill=[fill]) for a in angles]
    )
    share = getattr(module, "mc_share_prefix", True)
    result = mc_predict(module, images, T, return_samples=True, share_prefix=share)
    k = min(top_k, result.mean_probs.shape[-1])
    classes = result.mean_probs.max(dim=0).values.topk(k).indices
    assert result.logits is not None and result.probs is not None
    return RotatedResult(
        angles=[float(a) for a in angles],
        images=images,
        classes=classes.tolist(),
        class_names=[class_names[c] if c < len(class_names) else str(c) for c in classes.tolist()],
        logits=result.logits[..., classes].float().cpu(),  # float32 for plots also from a bf16 or fp64 net
        probs=result.probs[..., classes].float().cpu(),
        mean_probs=result.mean_probs.cpu(),
        predictive_entropy=result.predictive_entropy.cpu(),
        mutual_information=result.mutual_information.cpu(),
    )


def rotated_table(result: RotatedResult, class_names: Sequence[str] = FASHION_MNIST_CLASSES) -> str:
    """A markdown table: per angle, the predicted class, its probability, predictive entropy and MI (nats).

    Args:
        result: the output of :func:`rotated_image_experiment`.
        class_names: names of the classes (indices are used for classes past its end).
    """
    lines = [
        "| angle (°) | prediction | p(prediction) | predictive entropy | mutual information |",
        "|---:|---|---:|---:|---:|",
    ]
    confidence, predicted = result["mean_probs"].max(dim=-1)
    for i, angle in enumerate(result["angles"]):
        c = int(predicted[i])
        name = class_names[c] if c < len(class_names) else str(c)
        lines.append(
            f"| {angle:g} | {name} | {confidence[i]:.3f} | {result['predictive_entropy'][i]:.3f} "
            f"| {result['mutual_information'][i]:.3f} |"
        )
    return "\n".join(lines) + "\n"
