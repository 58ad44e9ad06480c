"""Shared fixtures: three fake providers, a policy builder, and engines that record spans in memory.

The providers are started once per session (starting and stopping servers for every test would
cost more than the tests) and reset before each test, so every test sees fresh recordings and the
default behaviour (answer at once).
"""

from __future__ import annotations

import asyncio
import gzip
import http.server
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import llm_resilience
from llm_resilience import Resilience
from llm_resilience.testing import FakeProvider

PROMPT = "PROMPT-MARKER-7f3a: please summarise the quarterly otter census"
MESSAGES: list[dict[str, Any]] = [{"role": "user", "content": PROMPT}]
API_KEYS = {name: f"sk-{name}-SECRET-KEY-9d2e41" for name in ("big", "small", "tiny")}
WIRE_MODELS = {"big": "gpt-4o", "small": "gpt-4o-mini", "tiny": "tiny-model"}
"""The model name each provider sees in the request body (litellm strips the ``openai/`` prefix)."""


def free_port() -> int:
    """A loopback port nothing listens on (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(condition: Callable[[], bool], timeout: float = 5.0, interval: float = 0.005) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout`` seconds pass (False): no blind sleeps."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


async def wait_until_async(condition: Callable[[], bool], timeout: float = 5.0, interval: float = 0.005) -> bool:
    """:func:`wait_until` for coroutines (the event loop keeps running while it polls)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(interval)
    return True


def hidden(response: Any) -> dict[str, Any]:
    """The summary the engine attaches to a response."""
    summary: dict[str, Any] = response._hidden_params["llm_resilience"]
    return summary


def outcomes(response_or_attempts: Any) -> list[tuple[str, str | None, str | None]]:
    """(model, outcome, reason) per attempt, from a response or a list of records/dicts."""
    attempts = (
        hidden(response_or_attempts)["attempts"]
        if hasattr(response_or_attempts, "_hidden_params")
        else response_or_attempts
    )
    out = []
    for a in attempts:
        if isinstance(a, Mapping):
            out.append((a["model"], a["outcome"], a["reason"]))
        else:
            out.append((a.model, a.outcome, a.reason))
    return out


FAULT_MATRIX: dict[tuple[str, str], str] = {}
"""(scenario, mode) -> outcome, filled by ``test_fault_scenarios.py`` and printed after the run."""


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not FAULT_MATRIX:
        return
    modes = ["sync", "async", "sync stream", "async stream"]
    scenarios = list(dict.fromkeys(name for name, _ in FAULT_MATRIX))
    width = max(len(s) for s in scenarios)
    cells = {key: value.replace("answered by ", "").replace("raises ", "") for key, value in FAULT_MATRIX.items()}
    terminalreporter.section("fault scenarios (faulty model first; cell: answering model or exception raised)")
    terminalreporter.write_line(f"{'scenario':<{width}} | " + " | ".join(f"{m:<18}" for m in modes))
    for name in scenarios:
        row = " | ".join(f"{cells.get((name, m), 'n/a'):<18}" for m in modes)
        terminalreporter.write_line(f"{name:<{width}} | {row}")


def pytest_configure(config: pytest.Config) -> None:
    # pydantic warns about litellm's own TypedDicts on first use; not ours to fix, and it buries real warnings.
    config.addinivalue_line("filterwarnings", "ignore:.*ReadOnly. qualifier:UserWarning")


# -- providers ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def _servers() -> Iterator[dict[str, FakeProvider]]:
    providers = {name: FakeProvider().start() for name in ("big", "small", "tiny")}
    yield providers
    for p in providers.values():
        p.stop()


@pytest.fixture(scope="session", autouse=True)
def _warm_litellm(request: pytest.FixtureRequest) -> None:
    if all(item.get_closest_marker("sans_io") for item in request.session.items):
        return  # only server-less tests (e.g. the mutation run, one session per mutant): no server to warm
    _warm_up_litellm(request.getfixturevalue("_servers")["big"])


def _warm_up_litellm(provider: FakeProvider) -> None:
    """litellm's first call of each kind imports modules lazily (0.3 to 1 s), which would otherwise land
    inside some test's short timeout; and until an attempt has ended, timeouts are not blamed (cold start)."""
    llm_resilience.Resilience().warm_up()


def _fresh(provider: FakeProvider) -> FakeProvider:
    # A timed-out request from an earlier test may still be winding down server-side; wait so it
    # cannot finish inside this test's recordings.
    provider.wait_idle(2.0)
    provider.reset(behaviors=True)
    return provider


@pytest.fixture
def big(_servers: dict[str, FakeProvider]) -> FakeProvider:
    """The primary provider (``openai/gpt-4o``)."""
    return _fresh(_servers["big"])


@pytest.fixture
def small(_servers: dict[str, FakeProvider]) -> FakeProvider:
    """The first fallback (``openai/gpt-4o-mini``)."""
    return _fresh(_servers["small"])


@pytest.fixture
def tiny(_servers: dict[str, FakeProvider]) -> FakeProvider:
    """The last fallback (``openai/tiny-model``)."""
    return _fresh(_servers["tiny"])


# -- policies ----------------------------------------------------------------------------------


class PolicyBuilder(Protocol):
    def __call__(
        self,
        chain: Sequence[str] = ...,
        *,
        timeout_s: float = ...,
        deadline_s: float = ...,
        fail_max: int = ...,
        reset_timeout_s: float = ...,
        prompt_classes: Mapping[str, Any] | None = ...,
        breakers: Mapping[str, Any] | None = ...,
        **sections: Any,
    ) -> dict[str, Any]: ...


def model_entry(name: str, api_base: str, api_key: str | None = None) -> dict[str, Any]:
    """A ``models:`` entry for one of the fake providers."""
    return {
        "litellm_params": {
            "model": f"openai/{WIRE_MODELS[name]}",
            "api_base": api_base,
            "api_key": api_key if api_key is not None else API_KEYS[name],
        }
    }


@pytest.fixture
def policy_dict(big: FakeProvider, small: FakeProvider, tiny: FakeProvider) -> PolicyBuilder:
    """Builds a policy dict: models big/small/tiny on the fake providers, route ``chat``."""

    def build(
        chain: Sequence[str] = ("big", "small", "tiny"),
        *,
        timeout_s: float = 1.0,
        deadline_s: float = 5.0,
        fail_max: int = 3,
        reset_timeout_s: float = 30.0,
        prompt_classes: Mapping[str, Any] | None = None,
        breakers: Mapping[str, Any] | None = None,
        **sections: Any,
    ) -> dict[str, Any]:
        classes = {"default": {"timeout_s": timeout_s, "deadline_s": deadline_s}}
        classes.update(prompt_classes or {})
        breaker_section = {"default": {"fail_max": fail_max, "reset_timeout_s": reset_timeout_s}}
        breaker_section.update(breakers or {})
        policy: dict[str, Any] = {
            "models": {
                name: model_entry(name, p.base_url) for name, p in (("big", big), ("small", small), ("tiny", tiny))
            },
            "routes": {"chat": {"chain": list(chain)}},
            "prompt_classes": classes,
            "breakers": breaker_section,
        }
        policy.update(sections)
        return policy

    return build


# -- engines and spans -------------------------------------------------------------------------


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    """Collects every span of the engines built by ``make_engine``."""
    return InMemorySpanExporter()


@pytest.fixture
def tracer_provider(exporter: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


EngineFactory = Callable[..., Resilience]


@pytest.fixture
def make_engine(tracer_provider: TracerProvider) -> EngineFactory:
    """``make_engine(policy_dict, **options)``: an engine whose spans go to ``exporter``."""

    def make(policy: Mapping[str, Any], **options: Any) -> Resilience:
        options.setdefault("tracer_provider", tracer_provider)
        return Resilience(llm_resilience.Policy.from_dict(policy), **options)

    return make


@pytest.fixture
def engine(make_engine: EngineFactory, policy_dict: PolicyBuilder) -> Resilience:
    """An engine on the default test policy: route ``chat`` = big -> small -> tiny, fail_max 3."""
    return make_engine(policy_dict())


# -- sync and async, same scenario -------------------------------------------------------------

Caller = Callable[..., Any]


@pytest.fixture(params=["sync", "async"])
def call(request: pytest.FixtureRequest) -> Caller:
    """``call(engine, model, messages, **kwargs)`` through ``completion`` or ``acompletion``."""
    if request.param == "sync":

        def sync_call(engine: Resilience, model: str, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> Any:
            return engine.completion(model, messages, **kwargs)

        return sync_call

    def async_call(engine: Resilience, model: str, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> Any:
        return asyncio.run(engine.acompletion(model, messages, **kwargs))

    return async_call


@pytest.fixture(autouse=True)
def _no_default_engine() -> Iterator[None]:
    # The module-level engine is process-global: never let one test's engine leak into another.
    llm_resilience.set_default_engine(None)
    yield
    llm_resilience.set_default_engine(None)


# -- a real OTLP/HTTP receiver on loopback ------------------------------------------------------------


class OtlpReceiver:
    """Records the bodies POSTed to ``/v1/traces`` and ``/v1/metrics`` (protobuf, as the SDK sends them)."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, bytes]] = []
        self._cond = threading.Condition()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                with receiver._cond:
                    receiver.posts.append((self.path, body))
                    receiver._cond.notify_all()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def bodies(self, path: str) -> list[bytes]:
        with self._cond:
            return [body for p, body in self.posts if p == path]

    def wait_for(self, path: str, timeout: float = 10.0) -> list[bytes]:
        with self._cond:
            self._cond.wait_for(lambda: any(p == path for p, _ in self.posts), timeout)
        return self.bodies(path)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def otlp_receiver() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    yield receiver
    receiver.stop()
