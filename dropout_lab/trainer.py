"""``LabTrainer``: Lightning's ``Trainer`` plus the MC-dropout subcommands ``mc`` and ``rotated``.

Both go through the Trainer's own machinery (``predict`` loads the checkpoint and picks the device) and the
module's own forward; no second loop over training data exists.
"""

from pathlib import Path
from typing import Annotated, Any

import lightning as L
import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from lightning.fabric.utilities.exceptions import MisconfigurationException

from dropout_lab.calibration import calibration_metrics, reliability_bins
from dropout_lab.plots import plot_reliability, plot_rotated, plot_summaries_vs_T
from dropout_lab.rotated import FASHION_MNIST_CLASSES, rotated_image_experiment, rotated_table
from dropout_lab.uncertainty import summaries_vs_T

__all__ = ["LabTrainer", "markdown_table"]


def markdown_table(rows: dict[str, dict[str, float]], digits: int = 4) -> str:
    """A markdown table: one row per key of ``rows``, one column per metric."""
    columns = list(next(iter(rows.values())))
    lines = ["| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.{digits}f}" for c in columns) + " |")
    return "\n".join(lines)


# int before float; Annotated, because a Union equals its reordering (Union[float, int] == Union[int, float]), so a
# parser's cache would hand back Lightning's float-first Union once a plain Trainer's arguments were added. (This
# module's annotations are evaluated at definition, no `from __future__ import annotations`: parsed from strings,
# the annotation met the same cache.)
BatchLimit = Annotated[int | float | None, "an integer is a number of batches, a float a fraction"]


class LabTrainer(L.Trainer):
    """Lightning's ``Trainer`` with two extra subcommands for MC dropout (``mc`` and ``rotated``).

    Its ``limit_*_batches`` take an integer before a float: Lightning types them ``float | int``, so the CLI's
    parser read ``--trainer.limit_val_batches 1`` (or ``1`` in a config file) as the fraction 1.0, every batch.

    Args:
        limit_train_batches: how much of the training split an epoch runs: an integer is a number of batches
            (``1`` = one batch), a float a fraction (``1.0`` = all, the default; ``0.25`` = a quarter).
        limit_val_batches: how much of the validation split a validation runs: an integer is a number of
            batches, a float a fraction (default: all).
        limit_test_batches: how much of the test split ``test`` runs: an integer is a number of batches, a
            float a fraction (default: all).
        limit_predict_batches: how much of the test split ``predict`` (and so ``mc``) runs: an integer is a
            number of batches, a float a fraction (default: all).
        **kwargs: every other argument of Lightning's ``Trainer``.
    """

    def __init__(
        self,
        *,
        limit_train_batches: BatchLimit = None,
        limit_val_batches: BatchLimit = None,
        limit_test_batches: BatchLimit = None,
        limit_predict_batches: BatchLimit = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            limit_train_batches=limit_train_batches,
            limit_val_batches=limit_val_batches,
            limit_test_batches=limit_test_batches,
            limit_predict_batches=limit_predict_batches,
            **kwargs,
        )

    def _output_dir(self, output_dir: str | None, ckpt_path: str | None) -> Path:
        if output_dir:
            path = Path(output_dir)
        elif ckpt_path:
            path = Path(ckpt_path).resolve().parent.parent
        else:
            path = Path(self.default_root_dir)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def mc(
        self,
        model: L.LightningModule,
        datamodule: L.LightningDataModule | None = None,
        ckpt_path: str | None = None,
        samples: PositiveInt = 100,
        output_dir: str | None = None,
        curve_repeats: NonNegativeInt = 0,
        share_prefix: bool = True,
    ) -> dict[str, dict[str, float]]:
        """MC-dropout predictions on the test set with uncertainty, against the deterministic net.

        Writes ``mc_predictions.pt`` (per test image: deterministic and MC predictive probabilities, predictive
        entropy, mutual information, per-class variance, target) and ``reliability.png``, and prints a table
        of accuracy, NLL, Brier score and ECE for both. The test split goes through ``predict``, so
        ``--trainer.limit_predict_batches`` (not ``limit_test_batches``) shortens it.

        Args:
            model: the LightningModule (from the config).
            datamodule: the data (from the config); the test split is used.
            ckpt_path: checkpoint whose weights to use (e.g. ``.../checkpoints/last.ckpt``).
            samples: MC passes T per image.
            output_dir: where to write the files; default: the checkpoint's run folder.
            curve_repeats: with n > 0, also draw accuracy, NLL and mean entropy against T (1 … ``samples``),
                mean ± standard error over n independent MC runs, to ``mc_vs_T.png`` and ``mc_vs_T.md``.
            share_prefix: run the layers before the first noise layer once per image, not once per pass (faster;
                checked to give the net's own passes); false = every pass through the whole net, the draws of
                versions before this option.
        """
        model.mc_samples = samples  # read by ClassifierModule.predict_step
        model.mc_share_prefix = share_prefix
        try:
            batches = self.predict(model, datamodule=datamodule, ckpt_path=ckpt_path, return_predictions=True)
        finally:
            model.mc_samples = 0
        assert batches is not None
        out = {key: torch.cat([b[key] for b in batches]).cpu() for key in batches[0]}  # type: ignore[index]
        rows = {
            "deterministic (weight scaling)": calibration_metrics(out["probs"], out["target"]),
            f"MC dropout, T={samples}": calibration_metrics(out["mc_probs"], out["target"]),
        }
        folder = self._output_dir(output_dir, ckpt_path)
        torch.save(out, folder / "mc_predictions.pt")
        figure = plot_reliability(
            reliability_bins(out["probs"], out["target"]), reliability_bins(out["mc_probs"], out["target"])
        )
        figure.savefig(folder / "reliability.png", dpi=120)
        if curve_repeats:
            self._t_curve(model, datamodule, samples, curve_repeats, rows, folder)
        print(markdown_table(rows))
        print(
            f"mean predictive entropy {out['entropy'].mean():.4f} nats, mean mutual information "
            f"{out['mutual_information'].mean():.4f} nats; wrote {folder / 'mc_predictions.pt'} and "
            f"{folder / 'reliability.png'}"
        )
        return rows

    def _t_curve(
        self,
        model: L.LightningModule,
        datamodule: L.LightningDataModule | None,
        samples: int,
        repeats: int,
        rows: dict[str, dict[str, float]],
        folder: Path,
    ) -> None:
        """Summaries against T on the test split (the weights loaded by the preceding ``predict``).

        Under the Trainer's precision, as ``predict`` ran: the net as ``predict`` cast it (``bf16-true``,
        ``64-true``…) on the Trainer's device, autocast on (``bf16-mixed``).
        """
        assert datamodule is not None
        images, labels = [], []
        for x, y in datamodule.test_dataloader():
            images.append(x)
            labels.append(y)
        x, y = torch.cat(images), torch.cat(labels)  # mc_predict casts x to the net's device and dtype
        ts = sorted({t for t in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if t <= samples} | {samples})
        model = model.to(self.strategy.root_device)  # predict's teardown left it on the CPU
        with self.precision_plugin.forward_context():
            curve = summaries_vs_T(
                model, x, y, Ts=ts, repeats=repeats, share_prefix=getattr(model, "mc_share_prefix", True)
            )
        deterministic = next(iter(rows.values()))
        plot_summaries_vs_T(curve, deterministic).savefig(folder / "mc_vs_T.png", dpi=120)
        table = {f"T={int(r['T'])}": {k: r[k] for k in r if k != "T"} for r in curve}
        (folder / "mc_vs_T.md").write_text(markdown_table(table) + "\n")
        print(markdown_table(table))

    def rotated(
        self,
        model: L.LightningModule,
        datamodule: L.LightningDataModule | None = None,
        ckpt_path: str | None = None,
        samples: PositiveInt = 1000,
        target_class: NonNegativeInt = 1,
        index: NonNegativeInt = 0,
        output_dir: str | None = None,
        share_prefix: bool = True,
    ) -> str:
        """The rotated-image experiment: one test image turned through 12 angles, T MC passes per angle.

        Saves ``rotated.png`` (scatter of the softmax inputs and outputs of the top classes per angle) and
        ``rotated.md`` (predictive entropy per angle), and prints the table.

        Args:
            model: the LightningModule (from the config).
            datamodule: the data (from the config); the image comes from the test split.
            ckpt_path: checkpoint whose weights to use.
            samples: MC passes T per rotated image.
            target_class: class of the image to rotate, 0–9 (1 = trouser).
            index: which test image of that class (0 = the first).
            output_dir: where to write the files; default: the checkpoint's run folder.
            share_prefix: run the layers before the first noise layer once per image, not once per pass (faster;
                checked to give the net's own passes); false = every pass through the whole net, the draws of
                versions before this option.
        """
        model.mc_share_prefix = share_prefix  # read by rotated_image_experiment
        if ckpt_path:
            state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
            model.load_state_dict(state["state_dict"])
        assert datamodule is not None, "the rotated experiment needs the data module"
        datamodule.setup("test")
        images, labels = datamodule.splits["test"]  # type: ignore[attr-defined]
        if target_class >= len(FASHION_MNIST_CLASSES):
            last = len(FASHION_MNIST_CLASSES) - 1
            raise MisconfigurationException(f"target_class: {target_class} is not a class; FashionMNIST has 0–{last}")
        chosen = (labels == target_class).nonzero().flatten()
        if index >= len(chosen):
            raise MisconfigurationException(
                f"index: {index} is past the {len(chosen)} test images of class {target_class} (0–{len(chosen) - 1})"
            )
        image = images[chosen[index]].to(torch.float32).div(255.0).unsqueeze(0)
        mean, std = getattr(datamodule, "mean", 0.0), getattr(datamodule, "std", 1.0)
        image = (image - mean) / std  # the loader's preprocessing
        model = self.precision_plugin.convert_module(model).to(self.strategy.root_device)  # as predict would
        with self.precision_plugin.forward_context():
            result = rotated_image_experiment(model, image, T=samples)
        folder = self._output_dir(output_dir, ckpt_path)
        plot_rotated(result).savefig(folder / "rotated.png", dpi=120)
        table = rotated_table(result, FASHION_MNIST_CLASSES)
        (folder / "rotated.md").write_text(table + "\n")
        print(table)
        print(f"wrote {folder / 'rotated.png'} and {folder / 'rotated.md'}")
        return table
