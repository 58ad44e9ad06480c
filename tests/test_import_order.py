"""The offline and quiet settings hold when the application imported litellm before us."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import litellm
import pytest

BUNDLED_MAP = Path(litellm.__file__).parent / "model_prices_and_context_window_backup.json"

PROBE = """
import json, warnings
warnings.simplefilter("always")
import litellm
before = litellm.model_cost["gpt-4o"]["max_input_tokens"]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import llm_resilience
print(json.dumps({
    "before": before,
    "after": litellm.model_cost["gpt-4o"]["max_input_tokens"],
    "warnings": [f"{w.category.__name__}: {w.message}" for w in caught if "llm_resilience" in w.category.__module__],
    "quiet": litellm.suppress_debug_info, "no_hf": litellm.disable_hf_tokenizer_download,
}))
"""


class _CostMapServer(ThreadingHTTPServer):
    status = 200
    body = b""
    headers: dict[str, str] = {}


class _Handler(BaseHTTPRequestHandler):
    disable_nagle_algorithm = True
    server: _CostMapServer

    def do_GET(self) -> None:
        self.send_response(self.server.status)
        self.send_header("Content-Length", str(len(self.server.body)))
        for name, value in self.server.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(self.server.body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def cost_map_server() -> Iterator[_CostMapServer]:
    server = _CostMapServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _import_litellm_first(server: _CostMapServer) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k not in ("LITELLM_LOCAL_MODEL_COST_MAP", "LITELLM_OFFLINE_MODE")}
    env["LITELLM_MODEL_COST_MAP_URL"] = f"http://127.0.0.1:{server.server_address[1]}/map.json"
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=180, check=True
    )
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_remote_cost_map_adopted_before_our_import_is_replaced_by_the_bundled_one(
    cost_map_server: _CostMapServer,
) -> None:
    remote = json.loads(BUNDLED_MAP.read_text(encoding="utf-8"))
    bundled_window = remote["gpt-4o"]["max_input_tokens"]
    remote["gpt-4o"]["max_input_tokens"] = 12345
    cost_map_server.status, cost_map_server.body, cost_map_server.headers = 200, json.dumps(remote).encode(), {}

    result = _import_litellm_first(cost_map_server)

    assert result["before"] == 12345  # litellm did fetch it: the scenario is real
    assert result["after"] == bundled_window
    assert result["warnings"] == []
    assert (result["quiet"], result["no_hf"]) == (True, True)


def test_cost_map_fetch_still_running_gets_one_warning_that_says_what_to_do(cost_map_server: _CostMapServer) -> None:
    # litellm's retry thread honours Retry-After: it is still waiting when llm_resilience is imported.
    cost_map_server.status, cost_map_server.body, cost_map_server.headers = 503, b"busy", {"Retry-After": "30"}

    result = _import_litellm_first(cost_map_server)

    warnings = result["warnings"]
    assert isinstance(warnings, list) and len(warnings) == 1
    assert warnings[0].startswith("ImportOrderWarning: litellm was imported before llm_resilience")
    assert "LITELLM_LOCAL_MODEL_COST_MAP=True" in warnings[0]
    assert (result["quiet"], result["no_hf"]) == (True, True)
