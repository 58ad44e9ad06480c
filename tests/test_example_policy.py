"""policies/example.yaml: valid, complete (every schema field appears) and documented (every field commented)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from llm_resilience import Policy
from llm_resilience._policy import ENV_PREFIX, json_schema

pytestmark = pytest.mark.sans_io  # no server: `make mutate` runs these for every mutant

EXAMPLE = Path(__file__).resolve().parent.parent / "policies" / "example.yaml"
ROOT = "<top level>"


def _example() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    return data


def _definitions(schema: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every object of the schema by name; the top level (the document itself) as ROOT."""
    defs = {name: d for name, d in schema.get("$defs", {}).items() if "properties" in d}
    defs[ROOT] = schema
    return defs


def _walk(value: Any, node: dict[str, Any], schema: dict[str, Any], seen: dict[str, set[str]]) -> None:
    """Record, per schema object, which of its fields the example's value sets (recursively)."""
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        _walk_object(value, name, schema["$defs"][name], schema, seen)
        return
    for branch in node.get("anyOf", []):
        _walk(value, branch, schema, seen)
    if isinstance(value, dict) and isinstance(node.get("additionalProperties"), dict):
        for item in value.values():  # a name -> section mapping (models, routes, ...)
            _walk(item, node["additionalProperties"], schema, seen)
    if isinstance(value, list) and isinstance(node.get("items"), dict):
        for item in value:
            _walk(item, node["items"], schema, seen)


def _walk_object(
    value: Any, name: str, definition: dict[str, Any], schema: dict[str, Any], seen: dict[str, set[str]]
) -> None:
    if not isinstance(value, dict):
        return  # a shorthand such as `soft_timeout: p95`
    properties = definition["properties"]
    seen.setdefault(name, set()).update(key for key in value if key in properties)
    for key, item in value.items():
        if key in properties:
            _walk(item, properties[key], schema, seen)


def test_example_policy_is_valid() -> None:
    policy = Policy.from_file(EXAMPLE)
    assert policy.route_for("chat", "default").chain[0].name == "big"


def test_example_policy_sets_every_field_of_the_schema() -> None:
    schema = json_schema()
    seen: dict[str, set[str]] = {}
    _walk_object(_example(), ROOT, schema, schema, seen)
    missing = [
        f"{name}.{field}"
        for name, definition in _definitions(schema).items()
        for field in definition["properties"]
        if field not in seen.get(name, set())
    ]
    assert not missing, f"policies/example.yaml does not show these schema fields: {', '.join(missing)}"


def test_the_completeness_check_notices_a_missing_field() -> None:
    # Guards the test above against walking nothing and passing vacuously.
    schema = json_schema()
    data = _example()
    del data["routes"]["chat"]["classes"]["summarize"]["hedge"]
    del data["prompt_classes"]["code"]["soft_timeout"]["floor_s"]
    seen: dict[str, set[str]] = {}
    _walk_object(data, ROOT, schema, schema, seen)
    assert "hedge" not in seen["RouteOptions"]
    assert "floor_s" not in seen["SoftTimeoutConfig"]
    assert "hedge" in seen["Route"]  # the extract route still has one


def _keys(node: yaml.Node) -> Iterator[yaml.ScalarNode]:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            yield key
            yield from _keys(value)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            yield from _keys(item)


def test_every_field_in_the_example_policy_is_commented() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    lines = text.splitlines()
    fields = {field for d in _definitions(json_schema()).values() for field in d["properties"]}
    uncommented = []
    document = yaml.compose(text)
    assert document is not None
    for key in _keys(document):
        if key.value not in fields:
            continue  # names chosen by the policy's author (models, routes, metadata keys)
        line = key.start_mark.line
        above = lines[line - 1].strip() if line > 0 else ""
        if not re.search(r"\s#\s", lines[line]) and not above.startswith("#"):
            uncommented.append(f"line {line + 1}: {key.value}")
    assert not uncommented, "fields without a comment: " + "; ".join(uncommented)


def test_example_models_read_keys_from_the_environment_and_call_loopback() -> None:
    for name, model in _example()["models"].items():
        params = model["litellm_params"]
        assert params["api_key"].startswith(ENV_PREFIX), name
        assert urlsplit(params["api_base"]).hostname in ("127.0.0.1", "localhost", "::1"), name


@pytest.mark.parametrize("section", ["models", "routes", "prompt_classes", "breakers", "errors", "review_log"])
def test_example_policy_has_every_top_level_section(section: str) -> None:
    assert section in json_schema()["properties"]
    assert _example().get(section), section


def test_example_policy_never_records_prompt_text() -> None:
    assert _example()["telemetry"]["record_content"] is False
