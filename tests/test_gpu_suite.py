"""benchmarks/gpu_suite.sh, rehearsed without a GPU: its stages expand to commands that exist and parse.

Device time is scarce, so a typo in the suite (a speed.py row label, a config path, a stage name) should fail
here, not on the GPU machine. ``DRY_RUN=1`` prints each command instead of running it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.sh"
GOALS = ["tests", "tests-compile", "fit-mlp-fast", "fit-mlp", "fit-lenet-fast", "fit-lenet", "mc",
         "population-fast", "speed-mlp-core", "step-dispatch"]  # fmt: skip


def suite(*stages: str, **env: str) -> subprocess.CompletedProcess[str]:
    env = {"SUITE_WHEELS": str(ROOT / "no-such-folder"), **env}  # never install wheels into /tmp/site here
    return subprocess.run(["bash", str(SUITE), *stages], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **env}, timeout=120)  # fmt: skip


def planned(device: str, *stages: str) -> list[tuple[str, list[str]]]:
    done = suite(*stages, DRY_RUN="1", SUITE_DEVICE=device)
    assert done.returncode == 0, done.stderr
    rows = [line.split(":", 1) for line in done.stdout.splitlines()]
    return [(name, shlex.split(command)) for name, command in rows]


def speed_module():
    spec = importlib.util.spec_from_file_location("speed_benchmark", ROOT / "benchmarks" / "speed.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_goals_run_the_issue_checks_in_order() -> None:
    assert [name for name, _ in planned("gpu", "goals")] == GOALS


@pytest.mark.parametrize("device", ["gpu", "cpu"])
def test_every_planned_command_names_what_exists(device: str) -> None:
    """Row labels of speed.py are those it builds for that device; configs and scripts exist."""
    speed = speed_module()
    target = torch.device("cuda" if device == "gpu" else "cpu")
    commands = planned(device, "all", "goals")
    assert len(commands) > len(GOALS)
    for name, argv in commands:
        if argv[0] == "cli_fit":
            assert (ROOT / argv[1]).is_file(), name
            continue
        if argv[0] == "population_study":
            continue
        script = next((a for a in argv if a.endswith(".py")), None)
        if script is not None:
            assert (ROOT / script).is_file(), name
        if script == "benchmarks/speed.py" and "--paths" in argv:
            labels = argv[argv.index("--paths") + 1 :]
            args = argparse.Namespace(workers=[4], micro=8, paths=labels)
            assert list(speed.build_paths(args, target, device)) == labels, name


def test_unknown_stage_and_device_are_refused() -> None:
    assert suite("bogus").returncode == 2
    assert suite("goals", SUITE_DEVICE="tpu").returncode == 2
    usage = suite()
    assert usage.returncode == 2 and "goals" in usage.stdout and "population-fast" in usage.stdout


def test_commands_past_the_deadline_are_skipped(tmp_path: Path) -> None:
    """With SUITE_DEADLINE_S=0 nothing runs; each command is reported as skipped, and the suite still ends 0."""
    done = suite("goals", SUITE_DEADLINE_S="0", OUT=str(tmp_path), PYTHON="false")
    assert done.returncode == 0, done.stderr
    log = (tmp_path / "suite.log").read_text()
    assert [line.split()[0] for line in log.splitlines()[-len(GOALS) :]] == GOALS
    assert log.count("skipped, the suite is past SUITE_DEADLINE_S=0 s") == len(GOALS)


def test_a_command_over_its_timeout_is_stopped_and_reported(tmp_path: Path) -> None:
    """COMMAND_TIMEOUT_S stops a command (here the pytest of stage tests, given 1 s) and the suite fails."""
    sleepy = tmp_path / "python"  # answers `-c` probes at once, sleeps on everything else
    sleepy.write_text('#!/bin/sh\n[ "$1" = -c ] && exit 0\nexec sleep 30\n')
    sleepy.chmod(0o755)
    done = suite("tests", COMMAND_TIMEOUT_S="1", OUT=str(tmp_path), PYTHON=str(sleepy))
    assert done.returncode == 1
    log = (tmp_path / "suite.log").read_text()
    assert "== tests: stopped by COMMAND_TIMEOUT_S=1" in log
    assert "failed: tests tests-compile" in log
