"""Files the package ships: the example policy and the ``simulate`` scenarios.

The repository's ``policies/`` directory is their single source. A wheel carries it as
``llm_resilience/_policies/`` (``[tool.setuptools.package-dir]`` in pyproject.toml), so
an installed package finds it next to this module; a source checkout (editable install,
tests) finds it one level up.
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent
_INSTALLED = _HERE / "_policies"
_CHECKOUT = _HERE.parent / "policies"


def policies_dir() -> Path:
    """The directory holding ``example.yaml``, ``policy.schema.json`` and ``scenarios/``."""
    return _INSTALLED if (_INSTALLED / "example.yaml").is_file() else _CHECKOUT


def example_policy() -> Path:
    """The documented example policy (``policies/example.yaml``)."""
    return policies_dir() / "example.yaml"


def scenarios_dir() -> Path:
    """The scenarios ``llm-resilience simulate`` ships (``policies/scenarios/``)."""
    return policies_dir() / "scenarios"


def scenario_names() -> list[str]:
    """Names of the shipped scenarios, usable as ``--scenario NAME``."""
    return sorted(p.stem for p in scenarios_dir().glob("*.yaml"))
