"""MkDocs hooks (mkdocs.yml ``hooks:``): the parts of the site that are produced, not written.

- ``<!-- policy-reference -->`` becomes the policy reference: one table per section of the policy,
  every field with its type, default, unit and meaning, read from the pydantic models the loader
  validates with (``llm_resilience._policy``). A field added to the code is in the docs at the next
  build; a field without a description fails the build (and ``tests/test_docs.py``).
- ``<!-- run: llm-resilience ARGS -->`` becomes a console block with what that command prints when run
  from the repository root now, so sample output cannot drift from the code. A command that must fail
  to show its error output is written ``<!-- run-fails: llm-resilience ARGS -->``.
- ``benchmarks/results/*.png`` are published beside the benchmark pages (``benchmarks/NAME.png``): the
  pages include the results' Markdown with pymdownx.snippets, and the images those files name.
- In the API reference, the Sphinx roles of the docstrings (``:class:`X```) read as code, and a
  paragraph ending in ``::`` before a code block ends in one colon.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

_POLICY_MARKER = "<!-- policy-reference -->"
_RUN = re.compile(r"^<!-- (run|run-fails): (llm-resilience [^>]*?) -->$", re.MULTILINE)
_ROLE = re.compile(r":(?:class|func|meth|attr|exc|mod|data):<code>")


# ---------------------------------------------------------------------------------------------
# The policy reference, from the models.


def _sections() -> list[tuple[str, str, type[BaseModel]]]:
    """(anchor, YAML path, model) for every section of a policy, top level first, in reading order."""
    from llm_resilience import _policy as p

    return [
        ("top-level", "(top level)", p.PolicyDocument),
        ("models", "models.NAME", p.ModelConfig),
        ("routes", "routes.NAME", p.Route),
        ("route-classes", "routes.NAME.classes.CLASS", p.RouteOptions),
        ("hedge", "routes.NAME.hedge", p.HedgeConfig),
        ("retries", "routes.NAME.retries", p.RetryConfig),
        ("truncation", "routes.NAME.truncation", p.TruncationConfig),
        ("streaming", "routes.NAME.streaming", p.StreamingConfig),
        ("prompt-classes", "prompt_classes.NAME", p.PromptClass),
        ("soft-timeout", "prompt_classes.NAME.soft_timeout", p.SoftTimeoutConfig),
        ("match", "prompt_classes.NAME.match[]", p.MatchRule),
        ("breakers", "breakers.default, breakers.MODEL", p.BreakerConfig),
        ("reset-backoff", "breakers.*.reset_backoff", p.ResetBackoff),
        ("errors", "errors", p.ErrorsConfig),
        ("review-log", "review_log", p.ReviewLogConfig),
        ("telemetry", "telemetry", p.TelemetryConfig),
        ("state", "state", p.StateConfig),
    ]


def policy_models() -> list[type[BaseModel]]:
    """Every model a policy file is validated with: the reference must have a section for each."""
    from llm_resilience import _policy as p

    found: list[type[BaseModel]] = []

    def walk(model: type[BaseModel]) -> None:
        if model in found:
            return
        found.append(model)
        for field in model.model_fields.values():
            for nested in _models_in(field.annotation):
                walk(nested)

    walk(p.PolicyDocument)
    return found


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _anchor_of(model: type[BaseModel]) -> str:
    return next(anchor for anchor, _, m in _sections() if m is model)


def _constraints(metadata: list[Any]) -> str:
    bounds = []
    for item in metadata:
        for attr, word in (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤")):
            value = getattr(item, attr, None)
            if value is not None:
                bounds.append(f"{word} {value:g}" if isinstance(value, float) else f"{word} {value}")
        if isinstance(item, FieldInfo):
            bounds.append(_constraints(item.metadata))
        if getattr(item, "min_length", None):
            bounds.append(f"at least {item.min_length}")
    return ", ".join(b for b in bounds if b)


def _type(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        base, *metadata = args
        bounds = _constraints(metadata)
        return _type(base) + (f" ({bounds})" if bounds else "")
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type(a) for a in args if a is not type(None))
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin is list:
        return f"list of {_type(args[0])}"
    if origin is dict:
        return f"mapping of name → {_type(args[1])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"[section](#{_anchor_of(annotation)})"
    names = {str: "string", int: "integer", float: "number", bool: "boolean"}
    if annotation is Any:
        return "any"
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _unit(name: str) -> str:
    if name.endswith("_s") or name in ("timeout_s", "deadline_s"):
        return "seconds"
    if name.endswith("cost_per_token"):
        return "USD per token"
    if name.endswith("ratio"):
        return "share of recent requests, 0 to 1"
    if "tokens" in name or name == "context_window":
        return "tokens"
    if name == "percentile":
        return "percent"
    return ""


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float):
        return f"`{value:g}`"
    if isinstance(value, list | tuple | frozenset | set):
        return ", ".join(f"`{v}`" for v in (sorted(value) if not isinstance(value, list | tuple) else value)) or "none"
    if isinstance(value, dict):
        return "none" if not value else f"`{value}`"
    if isinstance(value, str):
        return f"`{value!r}`" if value.strip() != value or "\n" in value else f"`{value}`"
    return f"`{value}`"


def field_default(model: type[BaseModel], name: str) -> str:
    """What applies when the key is left out, as the reference shows it."""
    from llm_resilience import _policy as p

    field = model.model_fields[name]
    if model is p.BreakerConfig:  # every key None in the file means "inherit": the built-in value applies
        value = getattr(p.BreakerSettings(), name)
        return "off" if value is None else _show(value)
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
        if isinstance(value, BaseModel):
            return f"see [section](#{_anchor_of(type(value))})"
        return _show(value)
    if field.default is PydanticUndefined:
        return "**required**"
    if field.default is None:
        return "none"
    return _show(field.default)


def policy_reference() -> str:
    """The policy reference tables, one per section, generated from the models."""
    from llm_resilience import _policy as p

    sections = _sections()
    missing = [m.__name__ for m in policy_models() if m not in [s[2] for s in sections]]
    if missing:
        raise ValueError(f"scripts/docs_hooks.py: the policy reference has no section for {', '.join(missing)}")
    out = []
    for anchor, path, model in sections:
        doc = (model.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
        doc = re.sub(r"``([^`]+)``", r"`\1`", doc)
        out += [f"### `{path}` {{#{anchor}}}", "", doc, ""]
        out += ["| key | type | default | unit | meaning |", "|---|---|---|---|---|"]
        for name, field in model.model_fields.items():
            if not field.description:
                raise ValueError(f"{model.__name__}.{name} has no description (Field(description=...))")
            key = field.alias or name
            meaning = field.description.replace("|", "\\|")
            if model is p.BreakerConfig and name == "count":
                meaning += " Validator names count only when listed here."
            bounds = _constraints(field.metadata)
            kind = _type(field.annotation) + (f" ({bounds})" if bounds else "")
            row = [f"`{key}`", kind, field_default(model, name), _unit(name), meaning]
            out.append("| " + " | ".join(row) + " |")
        out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Command output, run at build time.


def command_output(command: str, *, must_fail: bool = False) -> str:
    """What ``command`` (``llm-resilience ...``) prints when run from the repository root."""
    argv = shlex.split(command)
    exe = Path(sys.executable).parent / argv[0]
    result = subprocess.run([str(exe), *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    failed = result.returncode != 0
    if failed != must_fail:
        raise RuntimeError(f"docs: `{command}` exited {result.returncode}:\n{result.stdout}{result.stderr}")
    text = (result.stdout + result.stderr).rstrip()
    return f"```console\n$ {command}\n{text}\n```"


def expand(markdown: str) -> str:
    """The page's markdown with every generated part filled in."""
    if _POLICY_MARKER in markdown:
        markdown = markdown.replace(_POLICY_MARKER, policy_reference())
    return _RUN.sub(lambda m: command_output(m.group(2), must_fail=m.group(1) == "run-fails"), markdown)


# ---------------------------------------------------------------------------------------------
# MkDocs hook entry points.


def on_page_markdown(markdown: str, **_: Any) -> str:
    return expand(markdown)


def on_page_content(html: str, **_: Any) -> str:
    # Docstrings are written for Sphinx-style readers: ":class:`X`" roles and "text::" before a block.
    return _ROLE.sub("<code>", html).replace("::</p>", ":</p>")


def on_files(files: Any, config: Any, **_: Any) -> Any:
    from mkdocs.structure.files import File

    for image in sorted(RESULTS.glob("*.png")):
        files.append(File.generated(config, f"benchmarks/{image.name}", abs_src_path=str(image)))
    return files
