"""Run the fake provider in the foreground: ``python -m llm_resilience.testing --port 8001``."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import get_args

from llm_resilience.testing._fake_provider import DEFAULT_CONTENT, Behavior, BodyMode, FakeProvider


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llm_resilience.testing",
        description="Serve a fake OpenAI-compatible chat-completions API until Ctrl-C.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before answering")
    parser.add_argument("--status", type=int, default=200)
    parser.add_argument("--error-message", default=None)
    parser.add_argument("--retry-after", type=float, default=None, help="Retry-After header, seconds")
    parser.add_argument("--content", default=DEFAULT_CONTENT)
    parser.add_argument("--body", choices=get_args(BodyMode), default="normal")
    parser.add_argument("--chunks", type=int, default=3, help="content chunks per stream")
    parser.add_argument("--inter-chunk", type=float, default=0.0, help="seconds between stream chunks")
    args = parser.parse_args(argv)

    behavior = Behavior(
        latency_s=args.latency,
        status=args.status,
        error_message=args.error_message,
        retry_after_s=args.retry_after,
        content=args.content,
        body=args.body,
        chunks=args.chunks,
        inter_chunk_s=args.inter_chunk,
    )
    with FakeProvider(args.host, args.port, behavior=behavior) as provider:
        print(f"fake provider listening on {provider.base_url}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
