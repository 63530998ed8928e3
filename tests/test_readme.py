"""Every fenced code block in README.md runs as written.

The rules, in README order:
- ```python blocks run in this process, each in a fresh namespace, in a temporary working
  folder (``REPSIM_CACHE`` and ``REPSIM_FIGURES`` inside it) with the committed checkpoints.
  A line whose comment starts with a shape of numbers (``m = ...  # (2, 2) float64``) must
  give a value of that shape (and dtype, when one follows).
  A block right after ``<!-- readme-test: continue -->`` runs in the namespace of the python
  block before it; every other block must be self-contained.
- ```bash / ```sh blocks run with ``bash -e``, each in its own such folder, with ``repsim``
  (this checkout's ``python -m repsim``) and the venv's ``torchrun`` on PATH; they share one
  ``REPSIM_CACHE``, so a block may reuse a store an earlier one wrote (the same store it
  would extract itself: stores are content-addressed).
- ```toml blocks are figure specs: they must load with ``repsim figures``' own loader.
- A block right after ``<!-- readme-test: skip (why) -->`` is not run, because it needs what
  a test has not (the network, a GPU, the full CIFAR-10, ``make``'s venv, hours): the reason
  is part of the comment, visible to anyone editing the README.
- In every shell block, run or not, each ``repsim ...`` line must parse with repsim's own
  parser and each ``torchrun ...`` line with torchrun's, so a typo or a removed flag fails.
- A block of any other language fails: nothing goes unchecked silently.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from repsim.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
SHELLS = ("bash", "sh", "shell")
_FENCE = re.compile(r"^(\s*)```(\w*)\s*$")
_RULE = re.compile(r"^\s*<!--\s*readme-test:\s*(skip|continue)\b(.*?)-->\s*$")


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    rule: str  # "", "skip" or "continue"
    why: str


def readme_blocks(text: str) -> list[Block]:
    """The fenced blocks of ``text``, dedented, each with the rule on the line before it."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, start = len(m.group(1)), i
        i += 1
        while not re.match(r"^\s*```\s*$", lines[i]):
            i += 1
        rule = _RULE.match(lines[start - 1]) if start else None
        code = "\n".join(s[indent:] for s in lines[start + 1:i]) + "\n"
        blocks.append(Block(start + 1, m.group(2), code, rule.group(1) if rule else "",
                            rule.group(2).strip(" ()") if rule else ""))
        i += 1
    return blocks


BLOCKS = readme_blocks((ROOT / "README.md").read_text())


def _params(keep):
    return [pytest.param(b, id=f"README.md:{b.line}") for b in BLOCKS if keep(b)]


def command_lines(code: str) -> list[list[str]]:
    """Each command of a shell block as argv: continuation lines joined, comments dropped."""
    return [argv for line in code.replace("\\\n", " ").splitlines()
            if (argv := shlex.split(line, comments=True))]


def test_readme_has_only_checked_blocks():
    assert len(BLOCKS) >= 10  # the extractor found the README's blocks
    unknown = [(b.line, b.lang) for b in BLOCKS if b.lang not in ("python", "toml", *SHELLS)]
    assert not unknown, f"blocks of a language this test does not check: {unknown}"
    skipped = [b.line for b in BLOCKS if b.rule == "skip" and not b.why]
    assert not skipped, f"skipped blocks must say why: README.md lines {skipped}"


def _parse(argv: list[str]) -> None:
    """Parse ``argv`` as its command would; argparse's exit becomes a test failure."""
    if argv[0] == "torchrun":
        from torch.distributed.run import get_args_parser

        ns = get_args_parser().parse_args(argv[1:])
        if ns.module and ns.training_script == "repsim":
            _parse(["repsim", *ns.training_script_args])
    elif argv[0] == "repsim":
        build_parser().parse_args(argv[1:])


@pytest.mark.parametrize("block", _params(lambda b: b.lang in SHELLS))
def test_command_lines_parse(block, capsys):
    for argv in command_lines(block.code):
        try:
            _parse(argv)
        except SystemExit as e:
            if e.code:  # --help and --version exit 0
                pytest.fail(f"README.md:{block.line}: {shlex.join(argv)!r} does not parse: "
                            f"{capsys.readouterr().err.strip()}")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh working folder with private cache and figures, and the committed checkpoints."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REPSIM_FIGURES", str(tmp_path / "figures"))
    monkeypatch.setenv("REPSIM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("REPSIM_CHECKPOINTS", raising=False)
    return tmp_path


def _python_runs() -> list[list[Block]]:
    """The python blocks, grouped: a block and the ``continue`` blocks after it."""
    runs: list[list[Block]] = []
    for b in BLOCKS:
        if b.lang == "python" and b.rule != "skip":
            if b.rule == "continue" and runs:
                runs[-1].append(b)
            else:
                runs.append([b])
    return runs


_SHAPE = re.compile(r"#\s*\((\d+(?:,\s*\d+)*),?\)(?:\s+(\w+))?")


def with_shape_checks(code: str) -> str:
    """``code`` with an assertion after each one-line statement whose comment quotes a shape
    of numbers: the assigned name (or the expression) has that shape, and that dtype when a
    word follows that names one. A tuple of several values is left alone."""
    out = []
    for line in code.splitlines():
        out.append(line)
        m = _SHAPE.search(line)
        try:
            (stmt,) = ast.parse(line[:m.start()]).body if m else ((),)
        except SyntaxError:  # a continuation line
            continue
        if isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Name):
            value = stmt.targets[0].id
        elif isinstance(stmt, ast.Expr) and not isinstance(stmt.value, ast.Tuple):
            value = ast.unparse(stmt.value)
        else:
            continue
        shape = tuple(int(d) for d in m.group(1).split(","))
        got = value if value.endswith(".shape") else f"__np.shape({value})"
        check = f"assert {got} == {shape!r}, ({value!r}, {got})"
        if m.group(2) in ("float64", "float32", "uint8"):
            check += f"; assert str({value}.dtype).endswith({m.group(2)!r}), {value!r}"
        out.append(line[:len(line) - len(line.lstrip())] + check)
    return "\n".join(out) + "\n"


def test_shape_checks_follow_the_comment():
    code = with_shape_checks("import numpy as np\nm = np.zeros((2, 3))  # (2, 3) float64\n"
                             "m[0]  # (3,)\nm.shape  # (2, 3)\nm.shape, m  # (2, 3): both\n")
    ns = {"__np": __import__("numpy")}
    exec(code, ns)
    assert code.count("assert") == 4  # three shapes, one dtype; the tuple is left alone
    with pytest.raises(AssertionError):
        exec(with_shape_checks("import numpy as np\nm = np.zeros(2)  # (2, 2)\n"), ns)


@pytest.mark.parametrize("run", [pytest.param(r, id=f"README.md:{r[0].line}")
                                 for r in _python_runs()])
def test_python_blocks_run(run, workdir, monkeypatch):
    import numpy as np

    from repsim.figures import runner

    monkeypatch.setattr(runner, "KINDS", dict(runner.KINDS))  # a block may register a kind
    ns: dict = {"__name__": "__readme__", "__np": np}
    for b in run:
        exec(compile(with_shape_checks(b.code), f"README.md:{b.line}", "exec"), ns)
    assert Path(os.environ["REPSIM_CACHE"]).parent == workdir  # a user's cache is left alone


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One REPSIM_CACHE for all shell blocks (see the module docstring)."""
    return tmp_path_factory.mktemp("readme-cache")


@pytest.mark.slow  # about a minute of CPU: every command is a fresh process importing torch
@pytest.mark.parametrize("block", _params(lambda b: b.lang in SHELLS and b.rule != "skip"))
def test_shell_blocks_run(block, workdir, shared_cache):
    bin_dir = workdir / "bin"
    bin_dir.mkdir()
    (bin_dir / "repsim").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m repsim "$@"\n')
    (bin_dir / "repsim").chmod(0o755)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "REPSIM_CACHE": str(shared_cache),
           "PATH": f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}"
                   f"{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block.code], cwd=workdir,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"README.md:{block.line} failed:\n{done.stderr[-3000:]}"


@pytest.mark.parametrize("block", _params(lambda b: b.lang == "toml" and b.rule != "skip"))
def test_toml_blocks_are_valid_specs(block, workdir):
    (workdir / "analyses").mkdir()
    (workdir / "analyses" / "example.toml").write_text(block.code)
    from repsim.figures.runner import load_specs

    assert list(load_specs(workdir / "analyses")) == ["example"]
