"""One check on the real FashionMNIST from Debian's ``dataset-fashion-mnist``: 1 epoch of configs/mlp.yaml on the CPU.

Skipped where the data is not installed, except under CI (``$CI`` set), which installs it: there a missing
set fails, so a broken install cannot hide behind a skip.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dropout_lab import idx
from dropout_lab.idx import find_or_install, load_arrays

REPO = Path(__file__).resolve().parents[1]
MIN_TEST_ACC = 0.70


def require_real_data(directory: Path) -> None:
    missing = [name + ".gz" for name in idx.FILES.values() if not (directory / (name + ".gz")).is_file()]
    if not missing:
        return
    message = f"real FashionMNIST not installed: {', '.join(missing)} missing in {directory}"
    if os.environ.get("CI"):
        pytest.fail(f"{message}; CI installs it (apt-get install dataset-fashion-mnist), so this is an error")
    pytest.skip(f"{message} (apt-get install dataset-fashion-mnist)")


def test_mlp_one_epoch_on_real_data(real_data: Path, tmp_path: Path) -> None:
    require_real_data(real_data)
    data_dir = tmp_path / "data"

    # in process: Debian's gzip files are found, checked and unpacked into data_dir
    arrays = load_arrays(find_or_install(data_dir))
    assert arrays.train_images.shape == (60000, 28, 28) and arrays.test_images.shape == (10000, 28, 28)
    assert torch.bincount(arrays.train_labels.long(), minlength=10).tolist() == [6000] * 10
    assert torch.bincount(arrays.test_labels.long(), minlength=10).tolist() == [1000] * 10

    # through the CLI: one epoch of the headline config, then test the best checkpoint
    env = {k: v for k, v in os.environ.items() if k not in ("PL_GLOBAL_SEED", idx.ENV_DIR)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    args = [
        *("fit", "--config", str(REPO / "configs" / "mlp.yaml")),
        *("--trainer.max_epochs", "1", "--trainer.accelerator", "cpu"),
        *("--data.data_dir", str(data_dir)),
        *("--trainer.logger.init_args.save_dir", str(tmp_path / "logs")),
        *("--trainer.default_root_dir", str(tmp_path)),
        *("--trainer.enable_progress_bar", "false"),
    ]
    result = subprocess.run(
        [sys.executable, "-m", "dropout_lab", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"

    printed = re.search(r"test/acc\s+([0-9.]+)", result.stdout)
    assert printed, result.stdout
    logged = []
    for path in sorted((tmp_path / "logs").glob("*/version_0/events.out.tfevents.*")):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        if "test/acc" in acc.Tags()["scalars"]:
            logged += [e.value for e in acc.Scalars("test/acc")]
    assert len(logged) == 1 and logged[0] == pytest.approx(float(printed.group(1)), abs=1e-6)
    assert logged[0] >= MIN_TEST_ACC, f"test accuracy {logged[0]:.4f} after 1 epoch"
