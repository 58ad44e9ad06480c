"""The OTLP metric exporter as this package runs it: a failing export is said once, not every interval.

Imported only when our own MeterProvider exports OTLP (the SDK is heavy; most processes never export).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, MetricsData

_EXPORTER_LOGGERS = (
    "opentelemetry.exporter.otlp.proto.http.metric_exporter",
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
)
"""Where the OTLP metric exporters log a failed export (once per export interval, for ever)."""


class _Capture(logging.Filter):
    """Holds back the exporter's log records while this thread runs a :class:`QuietWhileFailing` export."""

    def __init__(self) -> None:
        super().__init__()
        self.local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        held: list[logging.LogRecord] | None = getattr(self.local, "held", None)
        if held is None:
            return True  # another thread (the trace exporter shares the gRPC logger): untouched
        held.append(record)
        return False


_capture = _Capture()
for _name in _EXPORTER_LOGGERS:
    logging.getLogger(_name).addFilter(_capture)


class QuietWhileFailing(MetricExporter):
    """Wraps the OTLP metric exporter: a failing export is said once, then nothing until one works.

    Pointed at a collector that takes traces only (Jaeger has no ``/v1/metrics``), the SDK's
    exporter logs ``Failed to export metrics batch code: 404`` at every export interval, for the
    life of the process. This wrapper logs one warning that says where, why and what to do; it
    keeps exporting (quietly) so that it notices, and says, when metrics get through again.
    """

    def __init__(self, inner: MetricExporter) -> None:
        super().__init__(
            preferred_temporality=inner._preferred_temporality,
            preferred_aggregation=inner._preferred_aggregation,
        )
        self.inner = inner
        self.failing = False
        # Said where the SDK would have said it (its exporter's logger): an application that has not
        # configured logging still sees it on stderr, as it saw the SDK's own message.
        self.log = logging.getLogger(type(inner).__module__)

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> MetricExportResult:
        held: list[logging.LogRecord] = []
        _capture.local.held = held
        try:
            result = self.inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs)
        except Exception as error:  # the reader would log a traceback every interval
            held.append(logging.makeLogRecord({"msg": f"{type(error).__name__}: {error}", "levelno": logging.ERROR}))
            result = MetricExportResult.FAILURE
        finally:
            _capture.local.held = None
        if result is MetricExportResult.FAILURE:
            if not self.failing:
                self.failing = True
                said = "; ".join(r.getMessage() for r in held if r.levelno >= logging.WARNING) or "no detail"
                self.log.warning(
                    "llm_resilience: exporting metrics to %s failed (%s). Said once: further failures stay quiet "
                    "until an export works. A collector that takes only traces (Jaeger) has no /v1/metrics: set "
                    "OTEL_METRICS_EXPORTER=none, or send metrics elsewhere with OTEL_EXPORTER_OTLP_METRICS_ENDPOINT.",
                    _endpoint(self.inner),
                    said,
                )
            return result
        for record in held:  # a successful export's own warnings are not ours to hide
            logging.getLogger(record.name).handle(record)
        if self.failing:
            self.failing = False
            self.log.warning("llm_resilience: exporting metrics to %s works again", _endpoint(self.inner))
        return result

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return bool(self.inner.force_flush(timeout_millis=timeout_millis))

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self.inner.shutdown(timeout_millis=timeout_millis, **kwargs)


def _endpoint(exporter: Any) -> str:
    return str(getattr(exporter, "_endpoint", None) or "the OTLP endpoint")
