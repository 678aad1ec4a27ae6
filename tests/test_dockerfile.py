"""Static checks of the Dockerfile: non-root user, entrypoint, CMD, and that everything it copies is in the context.

No container engine needed; `make docker-smoke` builds and runs the image for real.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    result, buffer = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):  # comment lines inside a continued instruction
            continue
        if stripped.endswith("\\"):
            buffer += stripped[:-1] + " "
            continue
        buffer += stripped
        keyword, _, args = buffer.partition(" ")
        result.append((keyword.upper(), args.strip()))
        buffer = ""
    assert not buffer, "the Dockerfile ends inside a continued line"
    return result


def arg_defaults(instrs: list[tuple[str, str]]) -> dict[str, str]:
    """The default of every `ARG NAME=value`, quotes removed."""
    defaults = {}
    for keyword, args in instrs:
        if keyword == "ARG" and "=" in args:
            name, _, value = args.partition("=")
            defaults[name.strip()] = shlex.split(value)[0] if value else ""
    return defaults


def expand(value: str, variables: dict[str, str]) -> str:
    """Expand ``$NAME`` and ``${NAME}`` with the ARG defaults."""
    return re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m.group(1), m.group(0)), value)


def exec_form(args: str) -> list[str]:
    """The JSON (exec) form of ENTRYPOINT/CMD/VOLUME, or a failure when the shell form is used."""
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        pytest.fail(f"{args!r} is not in exec form (a JSON list)")
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


def dockerignore_patterns() -> list[tuple[bool, str]]:
    """(negated, pattern) for each line of .dockerignore."""
    path = ROOT / ".dockerignore"
    patterns = []
    for line in path.read_text().splitlines() if path.exists() else []:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        patterns.append((negated, line.lstrip("!").strip("/")))
    return patterns


def pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex: ``**`` any folders, ``*`` and ``?`` within one path element."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def ignored(relpath: str, patterns: list[tuple[bool, str]]) -> bool:
    """Whether Docker leaves ``relpath`` out of the build context: it or a folder above it matches; last match wins."""
    parts = relpath.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for negated, pattern in patterns:
        regex = pattern_regex(pattern)
        if any(regex.fullmatch(candidate) for candidate in candidates):
            result = not negated
    return result


@pytest.fixture(scope="module")
def instrs() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


def test_base_image_is_an_argument_with_a_default(instrs):
    defaults = arg_defaults(instrs)
    assert defaults.get("BASE_IMAGE"), "ARG BASE_IMAGE needs a default (the CUDA image for GPU nodes)"
    froms = [args for keyword, args in instrs if keyword == "FROM"]
    assert froms and froms[0].split()[0] in ("${BASE_IMAGE}", "$BASE_IMAGE")


def test_torch_pins_match_the_makefile(instrs):
    pins = re.search(r"^TORCH_PINS\s*:=\s*(.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert pins is not None
    assert arg_defaults(instrs).get("TORCH_PINS") == pins.group(1).strip()


def test_runs_as_a_non_root_user_set_before_the_entrypoint(instrs):
    keywords = [keyword for keyword, _ in instrs]
    users = [i for i, keyword in enumerate(keywords) if keyword == "USER"]
    assert users, "the image needs a USER"
    last_user = expand(instrs[users[-1]][1], arg_defaults(instrs))
    name = last_user.split(":")[0]
    assert name not in ("root", "0", ""), f"USER {last_user} is root"
    assert users[-1] < keywords.index("ENTRYPOINT"), "USER must come before ENTRYPOINT"


def test_entrypoint_and_cmd(instrs):
    entrypoints = [args for keyword, args in instrs if keyword == "ENTRYPOINT"]
    cmds = [args for keyword, args in instrs if keyword == "CMD"]
    assert len(entrypoints) == 1 and exec_form(entrypoints[0]) == ["python", "-m", "dropout_lab"]
    assert len(cmds) == 1
    cmd = exec_form(cmds[0])
    assert cmd[0] == "fit"
    configs = [cmd[i + 1] for i, word in enumerate(cmd[:-1]) if word == "--config"]
    assert configs == ["configs/mlp.yaml"], "the CMD is the headline fit"


def test_cmd_configs_are_copied_into_the_image(instrs):
    cmd = exec_form(next(args for keyword, args in instrs if keyword == "CMD"))
    workdir = next(args for keyword, args in reversed(instrs) if keyword == "WORKDIR")
    copied = {}
    for keyword, args in instrs:
        if keyword in ("COPY", "ADD") and "--from" not in args:
            *sources, dest = [w for w in shlex.split(args) if not w.startswith("--")]
            dest = dest if dest.startswith("/") else f"{workdir.rstrip('/')}/{dest.removeprefix('./')}"
            for source in sources:
                copied[source.rstrip("/")] = dest.rstrip("/")
    for i, word in enumerate(cmd[:-1]):
        if word == "--config":
            config = cmd[i + 1]
            assert (ROOT / config).is_file(), f"the CMD names {config}, which is not in the repository"
            top = config.split("/")[0]
            assert copied.get(top) == f"{workdir.rstrip('/')}/{top}", f"{top}/ is not copied into {workdir}"


def test_every_copied_file_exists_and_is_in_the_build_context(instrs):
    patterns = dockerignore_patterns()
    sources = []
    for keyword, args in instrs:
        if keyword in ("COPY", "ADD"):
            if "--from" in args:
                continue
            *srcs, _dest = [w for w in shlex.split(args) if not w.startswith("--")]
            sources += srcs
    assert sources
    for source in sources:
        assert not re.match(r"^[a-z]+://", source), f"ADD {source}: fetch at build time in a RUN instead"
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert not ignored(source, patterns), f"COPY {source}: excluded by .dockerignore"


def test_volumes_for_logs_and_data(instrs):
    volumes = [v for keyword, args in instrs if keyword == "VOLUME" for v in exec_form(args)]
    assert "/app/lightning_logs" in volumes and "/app/data" in volumes


def test_ca_bundle_is_a_build_secret_not_a_file_in_the_image(instrs):
    text = DOCKERFILE.read_text()
    assert "--mount=type=secret,id=ca" in text
    for keyword, args in instrs:
        if keyword in ("COPY", "ADD"):
            assert not re.search(r"\.(crt|pem)\b", args), f"{keyword} {args}: certificates go in as a build secret"


def test_dockerignore_keeps_logs_data_venvs_and_git_out():
    patterns = dockerignore_patterns()
    for path in (".git", ".venv", "lightning_logs", "data", "dropout_lab/__pycache__", ".pytest_cache"):
        assert ignored(path, patterns), f"{path} goes into the build context"
    for path in ("dropout_lab/cli.py", "configs/mlp.yaml", "pyproject.toml", "README.md"):
        assert not ignored(path, patterns), f"{path} is left out of the build context"


def test_dockerignore_matcher():
    patterns = [(False, "**/__pycache__"), (False, "*.egg-info"), (False, "docs"), (True, "docs/keep.md")]
    assert ignored("a/b/__pycache__/x.pyc", patterns)
    assert ignored("__pycache__", patterns)
    assert ignored("dropout_lab.egg-info/PKG-INFO", patterns)
    assert not ignored("src/dropout_lab.egg-info", patterns)
    assert ignored("docs/other.md", patterns)
    assert not ignored("docs/keep.md", patterns)
    assert not ignored("dropout_lab/cli.py", patterns)
