"""The ``llm-resilience`` command.

::

    llm-resilience demo                      # replay the latency incident on loopback (~25 s)
    llm-resilience validate policies/*.yaml  # check policies; exit 1 on any problem
    llm-resilience schema > policy.schema.json

Only argparse is imported at module level: ``--help`` answers at once, and each
subcommand imports what it needs (the package itself imports litellm, ~2 s).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``llm-resilience``; returns the exit status."""
    args = _parser().parse_args(argv)
    status: int = args.run(args)
    return status


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-resilience",
        description="Policy-driven fallbacks, circuit breakers and timeouts for litellm calls.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="replay a provider latency incident against fake providers on loopback",
        description="Start two fake providers on loopback and replay the incident that started this project: "
        "the primary model's latency jumps 20x, then recovers. One line per request: which model answered, "
        "how fast, and why.",
    )
    demo.add_argument(
        "--policy",
        metavar="FILE",
        help="policy to replay the incident against (default: policies/example.yaml); its models are pointed "
        "at the fake providers: the first model of route 'chat' (or the first route) is the sick one",
    )
    demo.add_argument("--requests", type=_at_least(10), default=80, metavar="N", help="requests to send (default: 80)")
    demo.add_argument(
        "--scale",
        type=_positive,
        default=0.1,
        metavar="X",
        help="multiply every latency and every duration of the policy by X (default: 0.1, i.e. 10x faster "
        "than the real incident: about 20 s)",
    )
    demo.add_argument("--quiet", action="store_true", help="print only the summary")
    demo.set_defaults(run=_demo)

    validate = sub.add_parser(
        "validate",
        help="check policy files",
        description="Check policy files; print every problem as FILE:LINE: FIELD: MESSAGE. Exit 1 on any.",
    )
    validate.add_argument("files", nargs="+", metavar="FILE")
    validate.add_argument(
        "--validator",
        action="append",
        default=[],
        metavar="NAME",
        help="a custom validator the application registers (repeat for several); any other name is an error",
    )
    validate.set_defaults(run=_validate)

    schema = sub.add_parser(
        "schema",
        help="print the JSON Schema of policy files",
        description="Print the JSON Schema of policy files (for editors and CI; policies/policy.schema.json).",
    )
    schema.set_defaults(run=_schema)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llm-resilience")
    except PackageNotFoundError:
        return "unknown"


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum} (the story needs a few requests per phase)")
        return value

    return parse


def _validate(args: argparse.Namespace) -> int:
    from ._exceptions import PolicyError
    from ._policy import Policy

    status = 0
    for file in args.files:
        try:
            policy = Policy.from_file(file, validators=args.validator)
        except PolicyError as e:
            status = 1
            for problem in e.problems:
                print(problem, file=sys.stderr)
            continue
        doc = policy.document
        print(f"ok: {file} ({len(doc.models)} models, {len(doc.routes)} routes, {len(policy.classes)} prompt classes)")
    return status


def _schema(args: argparse.Namespace) -> int:
    import json

    from ._policy import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo
    from ._exceptions import PolicyError

    try:
        return run_demo(policy_path=args.policy, requests=args.requests, scale=args.scale, quiet=args.quiet)
    except PolicyError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
