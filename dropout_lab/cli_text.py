"""The command line's texts: the program description, the subcommands' help lines, and one-line errors."""

from __future__ import annotations

import re

__all__ = ["DESCRIPTION", "SUBCOMMAND_HELP", "condense_error", "model_help_args"]

DESCRIPTION = (
    "Train and study dropout-regularized networks on FashionMNIST. "
    "Pick a model with --model (class path, e.g. dropout_lab.models.DropoutMLP) or a config file; "
    "`fit` trains, then tests the best checkpoint (--test_after_fit false to skip). "
    "Logs go to TensorBoard: tensorboard --logdir lightning_logs. "
    "Two more programs share this entry point: `study` (multi-seed grids of fit runs; `study --help`) "
    "and `co2` (MC-dropout regression on the Mauna Loa CO2 series; `co2 --help`)."
)

# The subcommands' one-line help in `--help` (Lightning's docstrings break off at their first line)
SUBCOMMAND_HELP = {
    "fit": "Train (resume with --ckpt_path), then test the best checkpoint (--test_after_fit false to skip).",
    "validate": "One evaluation epoch over the validation split, with the weights of --ckpt_path.",
    "test": "One evaluation epoch over the test split, with the weights of --ckpt_path.",
    "predict": "The class probabilities of the test split, with the weights of --ckpt_path (returned to Python "
    "callers; the command line prints nothing).",
}

_NOISE = (
    "Does not validate against",
    "Subtypes:",
    "Errors:",
    "Given value",
    "Problem with given class_path",
    "Expected a <class 'NoneType'>",
)


def condense_error(message: str) -> str:
    """One line from a (possibly nested, multi-line) parser or constructor error: the full key and the reason."""
    keys: list[str] = []
    for raw in message.strip().splitlines():
        line = raw.strip().removeprefix("- ").strip()
        if not line or line.startswith(_NOISE):
            continue
        found = re.match(r'Parser key "([^"]+)":\s*(.*)', line)
        if found:
            keys.append(found.group(1))
            line = found.group(2)
            if not line:
                continue
        key = ".".join(keys)
        return f"{key}: {line}" if key and not line.startswith(key) else line
    return message.strip().splitlines()[0] if message.strip() else "invalid arguments"


def model_help_args(args: list[str]) -> list[str]:
    """``fit --model NAME --help`` → ``fit --model.help NAME``, which documents the model's own arguments."""
    if not {"-h", "--help"} & set(args) or "--model" not in args:
        return args
    i = args.index("--model")
    if i + 1 >= len(args) or args[i + 1].startswith("-") or args[i + 1].endswith((".yaml", ".yml", ".json")):
        return args
    rest = [a for j, a in enumerate(args) if j not in (i, i + 1) and a not in ("-h", "--help")]
    return [*rest, "--model.help", args[i + 1]]
