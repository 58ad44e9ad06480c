"""Every virtualenv the project creates installs its lock the way a fresh venv's own pip accepts.

A fresh ``python -m venv`` on Python 3.11 comes with pip 23.2, which refuses litellm's extra-qualified
``httpx[http2]`` in ``--require-hashes`` mode unless ``--no-deps`` is given (the lock pins every package,
so nothing is missing), and ``pip check`` then proves the set consistent. ``.ci/run`` runs the whole
set-up in fresh venvs; this test names the line that would break it on any machine, whatever its pip.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SET_UP_FILES = [ROOT / "Makefile", *sorted((ROOT / "scripts").glob("*.sh"))]


def _make_variables(text: str) -> dict[str, str]:
    return dict(re.findall(r"^([A-Z_]+)\s*[:?]?=\s*(.*)$", text, flags=re.MULTILINE))


def _lock_installs(path: Path) -> list[str]:
    """The lines of ``path`` that pip-install a lock file, Make variables expanded."""
    text = path.read_text()
    variables = _make_variables(text)
    lines = []
    for line in text.splitlines():
        if "install" not in line or not re.search(r"-r\s+\S*\.lock", line):
            continue
        lines.append(re.sub(r"\$\(([A-Z_]+)\)", lambda m: variables.get(m.group(1), m.group(0)), line))
    return lines


def test_the_set_up_installs_locks_in_more_than_one_place() -> None:
    assert sum(len(_lock_installs(path)) for path in SET_UP_FILES) >= 3  # .venv, .venv-oldest, the wheel check


@pytest.mark.parametrize("path", SET_UP_FILES, ids=lambda p: p.name)
def test_every_lock_install_is_hash_checked_without_resolving_dependencies_then_checked(path: Path) -> None:
    installs = _lock_installs(path)
    for line in installs:
        assert "--require-hashes" in line, f"{path.name}: {line.strip()}"
        assert "--no-deps" in line, f"{path.name}: a fresh venv's pip refuses this without --no-deps: {line.strip()}"
    if installs:
        assert re.search(r"pip\S*\s+check\b", path.read_text()), f"{path.name} installs a lock but never runs pip check"


def test_ci_builds_in_fresh_virtualenvs_and_prints_their_pip() -> None:
    ci = (ROOT / ".ci" / "run").read_text()

    assert "-m venv" in ci and 'pip" --version' in ci
    assert re.search(r"make test VENV=\S+ OLD_VENV=\S+", ci)
    assert "--upgrade-deps" not in ci and "install --upgrade pip" not in ci
