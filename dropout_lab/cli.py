"""The command line: ``python -m dropout_lab {fit,validate,test,predict} --config configs/mlp.yaml``."""

from __future__ import annotations

import importlib
import os
import secrets
import sys
from pathlib import Path
from typing import Any, Literal

import torch
from jsonargparse import ArgumentError
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from dropout_lab.cli_text import DESCRIPTION, SUBCOMMAND_HELP, condense_error, model_help_args
from dropout_lab.data import FashionMNISTDataModule
from dropout_lab.idx import DataError
from dropout_lab.models import ClassifierModule
from dropout_lab.reliability import DivergenceError, DivergenceGuard, LastEveryEpochCheckpoint, RNGStateCheckpoint
from dropout_lab.runs import ProvenanceSaveConfig, resolve_ckpt_path
from dropout_lab.trainer import LabTrainer

__all__ = ["ConfigError", "DropoutLabCLI", "main", "read_checkpoint"]

# Programs reached through this entry point besides LightningCLI's subcommands: first argument → "module:function".
APPS = {"study": "dropout_lab.studies:main", "co2": "dropout_lab.regression_cli:main"}
# Subcommands that evaluate a trained net: without --ckpt_path they would use the initial weights
NEEDS_CHECKPOINT = ("mc", "rotated")
WARNS_WITHOUT_CHECKPOINT = ("validate", "test", "predict")


class ConfigError(ValueError):
    """A configuration value that parsed but cannot be used; the message names the key."""


class DropoutLabCLI(LightningCLI):
    """LightningCLI with the project's defaults: any ``ClassifierModule``, the FashionMNIST data, seed 0.

    Args:
        args: arguments to parse instead of ``sys.argv`` (list of strings or a dict).
        run: run the subcommand (false = only instantiate the classes).
        **kwargs: passed on to :class:`~lightning.pytorch.cli.LightningCLI`.
    """

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        prog = "python -m dropout_lab" if sys.argv[0].endswith("__main__.py") else None
        strict = {"allow_abbrev": False}  # `--trainer.max_epoch 3` is a typo to report, not --trainer.max_epochs
        kwargs.setdefault(
            "parser_kwargs",
            {"description": DESCRIPTION, "exit_on_error": False, "prog": prog, **strict}
            | {name: dict(strict) for name in self.subcommands()},
        )
        super().__init__(
            model_class=ClassifierModule,
            subclass_mode_model=True,
            datamodule_class=FashionMNISTDataModule,
            trainer_class=LabTrainer,
            seed_everything_default=0,
            save_config_callback=ProvenanceSaveConfig,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            args=args,
            run=run,
            **kwargs,
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's fit/validate/test/predict, plus ``mc`` and ``rotated`` (MC dropout from a checkpoint)."""
        return {**LightningCLI.subcommands(), "mc": {"model", "datamodule"}, "rotated": {"model", "datamodule"}}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Default model ``DropoutMLP``; ``checkpoint.*`` configures the best (by ``val/acc``) and last checkpoints."""
        parser.add_lightning_class_args(LastEveryEpochCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "model": {"class_path": "dropout_lab.models.DropoutMLP"},
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-epoch{epoch:02d}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )

    def _set_seed(self) -> None:
        """``seed_everything: true`` draws a fresh random seed (Lightning 2 would use 0); the seed used is saved.

        DDP's worker processes inherit the drawn seed from the launching process (``$PL_GLOBAL_SEED``).
        """
        key = f"{self.subcommand}.seed_everything" if self.subcommand else "seed_everything"
        if self.config.get(key) is True:
            inherited = os.environ.get("PL_GLOBAL_SEED", "")
            if not inherited.isdigit() and _launched_per_process():
                raise ConfigError(
                    "seed_everything: true would draw a different seed in every process of this torchrun/SLURM "
                    "launch; give an integer seed (e.g. --seed_everything 1234)"
                )
            self.config[key] = int(inherited) if inherited.isdigit() else secrets.randbelow(2**31)
        super()._set_seed()

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        """Lightning's subcommands, with whole one-line helps (:data:`SUBCOMMAND_HELP`) in the listing."""
        super()._add_subcommands(parser, **kwargs)
        action = parser._subcommands_action  # type: ignore[attr-defined]
        for choice in action._choices_actions:
            choice.help = SUBCOMMAND_HELP.get(choice.dest, choice.help)

    def _parse_ckpt_path(self) -> None:
        """Lightning's reading of the checkpoint's hyperparameters; a file that is no checkpoint is a config error."""
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path and Path(path).is_file():
            checkpoint = read_checkpoint(path, "ckpt_path", weights_only=True)
            if "state_dict" not in checkpoint:
                raise ConfigError(f"ckpt_path: {path} is not a Lightning checkpoint (it holds no state_dict)")
        before = _model_class(self.config, subcommand)
        super()._parse_ckpt_path()
        after = _model_class(self.config, subcommand)
        if before and after and before != after:  # Lightning rebuilds the checkpoint's model: say so
            print(f"note: --ckpt_path {path} holds a {after.rsplit('.', 1)[-1]}; it is used instead of the config's "
                  f"{before.rsplit('.', 1)[-1]} (with the checkpoint's hyperparameters)", file=sys.stderr)  # fmt: skip

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="fit only: after fit, run `test` on the best checkpoint (the last one without validation); "
            "accepted and ignored by the other subcommands, so one config serves them all.",
        )
        parser.add_argument(
            "--float32_matmul_precision",
            type=Literal["highest", "high", "medium"],
            default="highest",
            help="torch.set_float32_matmul_precision before the run. `high`: float32 matmuls may use TF32 on "
            "NVIDIA GPUs since Ampere (10-bit mantissa: about 3 significant digits instead of 7; faster); `medium`: "
            "also bf16; `highest` (the default): full float32 matmuls (cuDNN convolutions follow "
            "torch.backends.cudnn.allow_tf32, on by default). Recorded in provenance.yaml.",
        )
        return parser

    def before_instantiate_classes(self) -> None:
        """Fail early on a GPU request without a GPU; without validation, keep only the last checkpoint."""
        config = self.config.get(str(self.subcommand), self.config)
        if "float32_matmul_precision" in config:  # absent from a parser built without a subcommand
            torch.set_float32_matmul_precision(config.float32_matmul_precision)
        accelerator = config.trainer.accelerator
        if isinstance(accelerator, str) and accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
            raise ConfigError(
                f"trainer.accelerator: {accelerator!r} asked for, but this machine has no usable CUDA GPU; "
                "use --trainer.accelerator auto (or cpu)"
            )
        if config.data.val_size == 0:
            config.checkpoint.monitor = None
        if "ckpt_path" in config:
            try:
                resolve_ckpt_path(config, continue_run=self.subcommand == "fit")
            except FileNotFoundError as err:
                raise ConfigError(str(err)) from None
            self._check_checkpoint_given(config.ckpt_path)

    def _check_checkpoint_given(self, ckpt_path: str | None) -> None:
        """``mc`` and ``rotated`` need ``--ckpt_path``; without one, ``test``/``validate``/``predict`` warn."""
        if ckpt_path:
            return
        if self.subcommand in NEEDS_CHECKPOINT:
            raise ConfigError(
                f"ckpt_path: {self.subcommand} needs the weights of a trained run: pass --ckpt_path "
                "<run>/checkpoints/last.ckpt (or best-….ckpt), or --ckpt_path last for the newest run of this config"
            )
        if self.subcommand in WARNS_WITHOUT_CHECKPOINT:
            message = (f"warning: no --ckpt_path: {self.subcommand} uses the model's initial (untrained) weights; "
                       "pass --ckpt_path <run>/checkpoints/last.ckpt or 'last' to evaluate a trained run")  # fmt: skip
            print(message, file=sys.stderr)

    def instantiate_classes(self) -> None:
        """Instantiate model, data and trainer; a constructor's ``ValueError`` becomes a one-line config error."""
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as err:
            raise ConfigError(str(err)) from None

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Build the Trainer, with the RNG-state and divergence callbacks always added.

        ``--trainer.enable_checkpointing false`` drops the ``checkpoint`` callback and
        ``--trainer.enable_progress_bar false`` drops a configured progress bar, instead of failing.
        """
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        extra = [self._get(self.config_init, key) for key in self._parser(self.subcommand).callback_keys]
        if config.get("enable_checkpointing") is False:
            extra = [c for c in extra if not isinstance(c, ModelCheckpoint)]
        extra += [RNGStateCheckpoint(), DivergenceGuard()]
        if config.get("enable_progress_bar") is False and config.get("callbacks"):
            config["callbacks"] = [c for c in config["callbacks"] if not isinstance(c, ProgressBar)]
        trainer = self._instantiate_trainer(config, extra)
        for callback in trainer.callbacks:  # its config.yaml header names the subcommand that re-runs it
            if isinstance(callback, ProvenanceSaveConfig):
                callback.subcommand = self.subcommand
        return trainer

    def after_fit(self) -> None:
        """Test the best checkpoint (or the last weights) when ``--test_after_fit`` is true.

        A model with ``test_in_memory_after_fit`` (``PopulationMLP``: each member its own best) is tested as it is.
        """
        if not self.config.fit.test_after_fit or self.trainer.interrupted:
            return
        callback = self.trainer.checkpoint_callback
        ckpt = None
        if isinstance(callback, ModelCheckpoint) and not getattr(self.model, "test_in_memory_after_fit", False):
            ckpt = callback.best_model_path or callback.last_model_path or None
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt)


def read_checkpoint(path: str, option: str, weights_only: bool) -> dict[str, Any]:
    """The checkpoint dict at ``path`` (on the CPU).

    Raises:
        ConfigError: ``path`` (given as ``option``) is no file ``torch.load`` reads, or holds no dict.
    """
    try:
        checkpoint = torch.load(path, weights_only=weights_only, map_location="cpu")
    except Exception as err:  # the (weights-only) unpickler raises anything on a file of another kind
        raise ConfigError(
            f"{option}: {path} is not a readable checkpoint (torch.load failed: {type(err).__name__}); "
            "pass a .ckpt file written by fit, or 'last'"
        ) from None
    if not isinstance(checkpoint, dict):
        raise ConfigError(f"{option}: {path} is not a Lightning checkpoint (it holds no state_dict)")
    return checkpoint


def _model_class(config: Any, subcommand: str | None) -> str | None:
    """The ``model.class_path`` of ``subcommand``'s part of a parsed config (None if it has none)."""
    model = (config.get(subcommand) if subcommand else config) or {}
    model = model.get("model") if hasattr(model, "get") else None
    return str(model.get("class_path")) if hasattr(model, "get") and model.get("class_path") else None


def _launched_per_process() -> bool:
    """True when an external launcher (torchrun, SLURM) started several processes of this command."""
    sizes = (os.environ.get(k, "1") for k in ("WORLD_SIZE", "SLURM_NTASKS"))
    return any(size.isdigit() and int(size) > 1 for size in sizes)


def _run_app(name: str, args: list[str]) -> None:
    """Run one of :data:`APPS` (imported only when asked for) with the remaining arguments."""
    module, function = APPS[name].split(":")
    getattr(importlib.import_module(module), function)(args)


def main(args: Any = None) -> None:
    """Run the CLI; user mistakes end with one ``error:`` line and exit code 2, divergence with exit code 3."""
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, list) and argv and argv[0] in APPS:
        _run_app(argv[0], list(argv[1:]))
        return
    if args is None:
        sys.argv[1:] = model_help_args(sys.argv[1:])
    elif isinstance(args, list):
        args = model_help_args(args)
    try:
        DropoutLabCLI(args=args)
    except (DataError, ConfigError, MisconfigurationException, ArgumentError) as err:
        print(f"error: {condense_error(str(err))}", file=sys.stderr)
        if isinstance(err, ArgumentError):
            print("(see `python -m dropout_lab <subcommand> --help` for every option)", file=sys.stderr)
        sys.exit(2)
    except DivergenceError as err:
        if sys.stdout.isatty():
            print(flush=True)  # end the progress bar's line: the error starts a line of its own
        print(f"error: {err}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    main()
