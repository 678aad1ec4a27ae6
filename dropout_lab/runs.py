"""Run folders: provenance beside the saved config, and ``--ckpt_path last`` that continues the same run folder."""

from __future__ import annotations

import platform
import sys
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.cli import SaveConfigCallback

__all__ = ["ProvenanceSaveConfig", "provenance", "resolve_ckpt_path"]


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def provenance(trainer: L.Trainer | None = None) -> dict[str, Any]:
    """Versions, determinism flags and the command line: what, besides the config, decides a run's numbers."""
    info: dict[str, Any] = {
        "dropout_lab": _version("dropout_lab"),
        "torch": str(torch.__version__),
        "lightning": _version("lightning"),
        "torchmetrics": _version("torchmetrics"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if trainer is not None:
        info |= {"accelerator": type(trainer.accelerator).__name__, "devices": trainer.num_devices,
                 "num_nodes": trainer.num_nodes, "precision": str(trainer.precision)}  # fmt: skip
    return info


class ProvenanceSaveConfig(SaveConfigCallback):
    """Saves the resolved ``config.yaml`` (with the seed actually used) and ``provenance.yaml`` in the run folder.

    ``config.yaml`` starts with a comment header naming the versions and the commands that re-run or resume
    the run from its folder alone (for a ``test``, ``mc``… run: the command that re-runs that subcommand).
    """

    subcommand: str | None = None  # the CLI's subcommand, set by DropoutLabCLI (None: fit)

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Write ``provenance.yaml`` and prefix ``config.yaml`` with the re-run / resume commands."""
        # (runs on global rank 0 only: ``trainer.log_dir`` would broadcast and hang a DDP run)
        log_dir = getattr(trainer.logger, "log_dir", None) if trainer.logger else trainer.default_root_dir
        if log_dir is None:
            return
        folder = Path(log_dir)
        info = provenance(trainer)
        (folder / "provenance.yaml").write_text(yaml.safe_dump(info, sort_keys=False))
        config_file = folder / self.config_filename
        if config_file.is_file():
            header = (
                f"# dropout_lab {info['dropout_lab']}, torch {info['torch']}, lightning {info['lightning']}, "
                f"python {info['python']}; more in provenance.yaml\n"
            )
            subcommand = self.subcommand or "fit"
            header += f"# re-run:  python -m dropout_lab {subcommand} --config {config_file}\n"
            if subcommand == "fit":
                header += (
                    f"# resume:  python -m dropout_lab fit --config {config_file} "
                    f"--ckpt_path {folder / 'checkpoints' / 'last.ckpt'}\n"
                )
            else:  # test, mc…: the weights came from its ckpt_path (in this file), not from a fit in this folder
                header += f"# (a `{subcommand}` run of the checkpoint in ckpt_path; no training happened here)\n"
            config_file.write_text(header + config_file.read_text())


def _logger_args(config: Any) -> Any | None:
    """The ``init_args`` of the first configured logger that writes versioned run folders, if any."""
    loggers = config.trainer.get("logger")
    if not isinstance(loggers, list):
        loggers = [loggers]
    for logger in loggers:
        init_args = getattr(logger, "init_args", None)
        if init_args is not None and "save_dir" in init_args and "version" in init_args:
            return init_args
    return None


def resolve_ckpt_path(config: Any, continue_run: bool = True) -> None:
    """Resolve ``ckpt_path: last`` to the newest run's ``last.ckpt``; log a resumed run into its own folder.

    ``last`` is looked up as ``<save_dir>/<name>/version_*/checkpoints/last.ckpt`` of the configured logger
    (the newest file wins). With ``continue_run`` (``fit``: resuming), when the checkpoint lies in such a run
    folder and the logger's version is not set, the version is set to that folder's, so the resumed run continues
    the same TensorBoard run. ``test``/``validate``/``predict`` log to a new folder and leave the run's own
    ``config.yaml`` alone.

    Raises:
        FileNotFoundError: ``last`` was asked for and no run of this config has a ``last.ckpt``.
    """
    ckpt = config.get("ckpt_path")
    logger = _logger_args(config)
    if not ckpt:
        return
    if logger is None:
        if ckpt == "last":
            raise FileNotFoundError("ckpt_path: 'last' needs a logger with run folders; pass the checkpoint's path")
        return
    run_root = Path(logger.save_dir) / (logger.get("name") or "lightning_logs")
    if ckpt == "last":
        found = sorted(run_root.glob("version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise FileNotFoundError(
                f"ckpt_path: 'last' asked for, but no {run_root}/version_*/checkpoints/last.ckpt exists; "
                "pass the checkpoint's path, or fit without --ckpt_path"
            )
        ckpt = config.ckpt_path = str(found[-1])
    path = Path(ckpt)
    if ckpt not in ("best", "hpc", "registry") and not path.is_file():
        raise FileNotFoundError(f"ckpt_path: no checkpoint file at {ckpt}; pass an existing .ckpt file or 'last'")
    if path.is_file():
        config.ckpt_path = str(path.resolve())  # the saved config.yaml re-runs from any folder
    if continue_run and path.parent.name == "checkpoints" and path.parent.parent.parent.resolve() == run_root.resolve():
        folder = path.parent.parent.name
        if logger.get("version") is None and folder.startswith("version_"):
            logger.version = int(folder.removeprefix("version_")) if folder[8:].isdigit() else folder
