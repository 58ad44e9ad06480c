"""The OTLP exporters as this package runs them: a failing export is said once, not every batch.

Pointed at a collector that is down, or at one that takes traces only (Jaeger has no
``/v1/metrics``), the SDK's exporters log ``Failed to export ... batch`` at every batch or
export interval, for the life of the process, with a retry notice before each. The wrappers
here log one warning that says where, why and what to do; they keep exporting (quietly) so
that they notice, and say, when exports get through again. A call is never affected either way.

Imported only when our own providers export OTLP (the SDK is heavy; most processes never export).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, MetricsData
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

_EXPORTER_LOGGERS = (
    "opentelemetry.exporter.otlp.proto.http.metric_exporter",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
)
"""Where the OTLP exporters log a failed export (once per batch or interval, for ever)."""


class _Capture(logging.Filter):
    """Holds back the exporter's log records while this thread runs one of our exports."""

    def __init__(self) -> None:
        super().__init__()
        self.local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        held: list[logging.LogRecord] | None = getattr(self.local, "held", None)
        if held is None:
            return True  # not inside one of our exports (another exporter on this logger): untouched
        held.append(record)
        return False


_capture = _Capture()
for _name in _EXPORTER_LOGGERS:
    logging.getLogger(_name).addFilter(_capture)

Result = TypeVar("Result", MetricExportResult, SpanExportResult)


class _SaidOnce:
    """The say-once bookkeeping both wrappers share: one warning per failing stretch, one when it ends."""

    def __init__(self, inner: Any, what: str, advice: str) -> None:
        self.inner, self.what, self.advice = inner, what, advice
        self.failing = False
        # Said where the SDK would have said it (its exporter's logger): an application that has not
        # configured logging still sees it on stderr, as it saw the SDK's own message.
        self.log = logging.getLogger(type(inner).__module__)

    def run(self, export: Callable[[], Result], failure: Result) -> Result:
        held: list[logging.LogRecord] = []
        _capture.local.held = held
        try:
            result = export()
        except Exception as error:  # the SDK would log a traceback at every batch
            held.append(logging.makeLogRecord({"msg": f"{type(error).__name__}: {error}", "levelno": logging.ERROR}))
            result = failure
        finally:
            _capture.local.held = None
        if result is failure:
            if not self.failing:
                self.failing = True
                said = "; ".join(r.getMessage() for r in held if r.levelno >= logging.WARNING) or "no detail"
                self.log.warning(
                    "llm_resilience: exporting %s to %s failed (%s). Said once: further failures stay quiet until "
                    "an export works. %s",
                    self.what,
                    _endpoint(self.inner),
                    said,
                    self.advice,
                )
            return result
        for record in held:  # a successful export's own warnings are not ours to hide
            logging.getLogger(record.name).handle(record)
        if self.failing:
            self.failing = False
            self.log.warning("llm_resilience: exporting %s to %s works again", self.what, _endpoint(self.inner))
        return result


class QuietMetricExporter(MetricExporter):
    """Wraps the OTLP metric exporter: a failing export is said once, then nothing until one works."""

    def __init__(self, inner: MetricExporter) -> None:
        super().__init__(
            preferred_temporality=inner._preferred_temporality,
            preferred_aggregation=inner._preferred_aggregation,
        )
        self.inner = inner
        self.said = _SaidOnce(
            inner,
            "metrics",
            "A collector that takes only traces (Jaeger) has no /v1/metrics: set OTEL_METRICS_EXPORTER=none, "
            "or send metrics elsewhere with OTEL_EXPORTER_OTLP_METRICS_ENDPOINT.",
        )

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> MetricExportResult:
        return self.said.run(
            lambda: self.inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs),
            MetricExportResult.FAILURE,
        )

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return bool(self.inner.force_flush(timeout_millis=timeout_millis))

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self.inner.shutdown(timeout_millis=timeout_millis, **kwargs)


class QuietSpanExporter(SpanExporter):
    """Wraps the OTLP span exporter: a failing export is said once, then nothing until one works."""

    def __init__(self, inner: SpanExporter) -> None:
        self.inner = inner
        self.said = _SaidOnce(
            inner,
            "spans",
            "The spans of those batches are dropped; calls are not affected. Check the collector, or set "
            "OTEL_TRACES_EXPORTER=none.",
        )

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return self.said.run(lambda: self.inner.export(spans), SpanExportResult.FAILURE)

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return bool(self.inner.force_flush(timeout_millis=timeout_millis))

    def shutdown(self) -> None:
        self.inner.shutdown()


def _endpoint(exporter: Any) -> str:
    return str(getattr(exporter, "_endpoint", None) or "the OTLP endpoint")
