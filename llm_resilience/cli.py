"""The ``llm-resilience`` command.

::

    llm-resilience init policy.yaml --chain openai/gpt-4o,openai/gpt-4o-mini
    llm-resilience validate policies/*.yaml
    llm-resilience explain policy.yaml --route chat --class summarize --messages-file prompt.json
    llm-resilience simulate policy.yaml edited.yaml --scenario 503-storm
    llm-resilience demo

Only argparse is imported at module level, and ``import llm_resilience`` is lazy: ``--help``
answers at once, ``validate``/``init``/``schema`` never import litellm (~2 s), and each
command imports what it needs.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._policy import Policy

EPILOG = """\
examples:
  llm-resilience init policy.yaml --chain openai/gpt-4o,openai/gpt-4o-mini
  llm-resilience validate policy.yaml
  llm-resilience explain policy.yaml --route chat --class summarize
  llm-resilience simulate policy.yaml --scenario latency-spike
  llm-resilience demo --quick

'llm-resilience COMMAND --help' shows each command's options and examples.
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``llm-resilience``; returns the exit status."""
    args = _parser().parse_args(argv)
    status: int = args.run(args)
    return status


def _command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, summary: str, description: str, examples: str
) -> argparse.ArgumentParser:
    return sub.add_parser(
        name,
        help=summary,
        description=description,
        epilog="examples:\n" + examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-resilience",
        description="Policy-driven fallbacks, circuit breakers and timeouts for litellm calls.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    init = _command(
        sub,
        "init",
        "write a commented starter policy",
        "Write a commented starter policy: a route 'chat' over your models (in order: the first is the "
        "primary, the others its fallbacks), prompt classes, breakers and validators, then print the next "
        "two steps. Never overwrites an existing file.",
        "  llm-resilience init                                   # policy.yaml, chain openai/gpt-4o -> gpt-4o-mini\n"
        "  llm-resilience init prod.yaml --chain anthropic/claude-sonnet-4-5,openai/gpt-4o-mini\n",
    )
    init.add_argument("path", nargs="?", default="policy.yaml", metavar="PATH", help="default: policy.yaml")
    init.add_argument(
        "--chain",
        type=_chain,
        metavar="MODEL,MODEL",
        help="litellm model strings, primary first (default: openai/gpt-4o,openai/gpt-4o-mini)",
    )
    init.set_defaults(run=_init)

    validate = _command(
        sub,
        "validate",
        "check policy files",
        "Check policy files; print every problem as FILE:LINE: FIELD: MESSAGE. Exit 1 on any.",
        "  llm-resilience validate policy.yaml\n  llm-resilience validate policies/*.yaml   # in CI, before a deploy\n",
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

    explain = _command(
        sub,
        "explain",
        "show what a request on a route would get",
        "Show what a request on a route would get from a policy: the chain in order (the class's own chain "
        "where it has one), per-attempt and whole-call timeouts, soft timeout, hedging and retry rules, breaker "
        "settings, validators and each model's input budget. With --messages-file: the prompt's tokens and, per "
        "model, whether it fits, would be truncated (to how many tokens) or skipped.",
        "  llm-resilience explain policy.yaml --route chat\n"
        "  llm-resilience explain policy.yaml --route chat --class summarize\n"
        "  llm-resilience explain policy.yaml --route chat --messages-file prompt.json\n"
        '      # prompt.json: [{"role": "user", "content": "..."}]  or  {"messages": [...], "max_tokens": 500}\n',
    )
    explain.add_argument("file", metavar="FILE", help="policy file")
    explain.add_argument("--route", required=True, metavar="R", help="the model= the application passes")
    explain.add_argument(
        "--class",
        dest="prompt_class",
        metavar="C",
        help="prompt class (default: what the policy's match rules pick for --messages-file, else 'default')",
    )
    explain.add_argument("--messages-file", metavar="F.json", help="a prompt to fit to each model of the chain")
    explain.set_defaults(run=_explain)

    simulate = _command(
        sub,
        "simulate",
        "replay a scripted incident against one or two policies, in simulated time",
        "Replay a scripted incident (per model: latency, errors, Retry-After, empty or cut-off answers, phase by "
        "phase; traffic per prompt class) against the real decision core in simulated time: a 30-minute incident "
        "takes seconds and the same seed gives the same table. Per phase: success, p50/p99, which model answered, "
        "fallbacks by reason, breaker transitions, requests per model, cost. With two policy files, side by side.\n\n"
        f"Shipped scenarios (--scenario NAME): {', '.join(_scenario_names()) or 'none found'}.",
        "  llm-resilience simulate policy.yaml --scenario latency-spike\n"
        "  llm-resilience simulate policy.yaml edited.yaml --scenario 503-storm     # what does my edit change?\n"
        "  llm-resilience simulate policy.yaml --scenario my-incident.yaml --seed 7 --plot incident.png\n",
    )
    simulate.add_argument("files", nargs="+", metavar="FILE", help="one policy file, or two to compare")
    simulate.add_argument(
        "--scenario", required=True, metavar="S", help="a scenario YAML file, or the name of a shipped one"
    )
    simulate.add_argument("--seed", type=int, metavar="N", help="random seed (default: the scenario's, else 1)")
    simulate.add_argument("--plot", metavar="OUT.png", help="also draw latency and models over time (needs matplotlib)")
    simulate.set_defaults(run=_simulate)

    demo = _command(
        sub,
        "demo",
        "replay a provider latency incident against fake providers on loopback",
        "Start two fake providers on loopback and replay the incident that started this project: the primary "
        "model's latency jumps 20x, then recovers. One line per request: which model answered, how fast, and why. "
        "Real engine, real litellm HTTP calls.",
        "  llm-resilience demo                      # ~20 s\n"
        "  llm-resilience demo --quick              # ~5 s: fewer requests, 30x faster\n"
        "  llm-resilience demo --policy policy.yaml --quiet\n",
    )
    demo.add_argument(
        "--policy",
        metavar="FILE",
        help="policy to replay the incident against (default: the example policy); its models are pointed "
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
    demo.add_argument("--quick", action="store_true", help="a short run: 30 requests at scale 0.03 (~5 s)")
    demo.add_argument("--quiet", action="store_true", help="print only the summary")
    demo.add_argument(
        "--review-log",
        metavar="FILE",
        help="keep the policy's fallback review log in FILE (by default it is written to a temporary "
        "directory removed when the demo ends)",
    )
    demo.set_defaults(run=_demo)

    schema = _command(
        sub,
        "schema",
        "print the JSON Schema of policy files",
        "Print the JSON Schema of policy files (for editors and CI; policies/policy.schema.json).",
        "  llm-resilience schema > policy.schema.json\n",
    )
    schema.set_defaults(run=_schema)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llm-resilience")
    except PackageNotFoundError:
        return "unknown"


def _scenario_names() -> list[str]:
    from ._resources import scenario_names

    return scenario_names()


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


def _chain(text: str) -> list[str]:
    models = [part.strip() for part in text.split(",") if part.strip()]
    if not models:
        raise argparse.ArgumentTypeError("expected litellm model strings separated by commas")
    if len(set(models)) != len(models):
        raise argparse.ArgumentTypeError("a model appears twice in the chain")
    return models


def _print_problems(problems: Sequence[str]) -> None:
    for problem in problems:
        print(problem, file=sys.stderr)


def _validate(args: argparse.Namespace) -> int:
    from ._base_errors import PolicyError
    from ._policy import Policy

    status = 0
    for file in args.files:
        try:
            policy = Policy.from_file(file, validators=args.validator)
        except PolicyError as e:
            status = 1
            _print_problems(e.problems)
            continue
        doc = policy.document
        print(f"ok: {file} ({len(doc.models)} models, {len(doc.routes)} routes, {len(policy.classes)} prompt classes)")
        for warning in _unset_variables(file, policy):
            print(warning)
    return status


def _unset_variables(file: str, policy: Policy) -> list[str]:
    """A warning per ``os.environ/NAME`` of a model's ``litellm_params`` that is not set where this runs.

    Warnings, not errors: CI often validates without the production secrets. Where it matters
    (the deploy itself), an unset one means every call to that model is skipped as ``missing_api_key``.
    """
    from ._policy import ENV_PREFIX

    out = []
    for name, spec in policy.models.items():
        for key, value in spec.litellm_params.items():
            if isinstance(value, str) and value.startswith(ENV_PREFIX) and value[len(ENV_PREFIX) :] not in os.environ:
                out.append(
                    f"warning: {file}: models.{name}.litellm_params.{key}: {value} is not set in this environment; "
                    f"calls skip '{name}' (missing_api_key) until {value[len(ENV_PREFIX) :]} is set"
                )
    return out


def _init(args: argparse.Namespace) -> int:
    from ._starter import write_starter

    return write_starter(args.path, args.chain, sys.stdout, sys.stderr)


def _explain(args: argparse.Namespace) -> int:
    from ._base_errors import PolicyError
    from ._explain import explain, load_prompt
    from ._policy import Policy

    try:
        policy = Policy.from_file(args.file)
        prompt = load_prompt(args.messages_file) if args.messages_file else None
    except PolicyError as e:
        _print_problems(e.problems)
        return 2
    return explain(policy, args.route, args.prompt_class, prompt, sys.stdout)


def _simulate(args: argparse.Namespace) -> int:
    from ._base_errors import PolicyError
    from ._policy import Policy
    from ._scenario import load_scenario

    if len(args.files) > 2:
        print("simulate compares at most two policy files", file=sys.stderr)
        return 2
    try:  # every file is checked before litellm is imported: a broken one is refused at once
        policies = [Policy.from_file(file) for file in args.files]
        scenario = load_scenario(args.scenario)
        for policy in policies:
            scenario.check_against(policy)
        from ._simulate import run_simulation

        return run_simulation(args.files, policies, scenario, seed=args.seed, plot=args.plot, out=sys.stdout)
    except PolicyError as e:
        _print_problems(e.problems)
        return 2


def _schema(args: argparse.Namespace) -> int:
    import json

    from ._policy import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from ._base_errors import PolicyError
    from ._demo import run_demo

    requests, scale = (30, 0.03) if args.quick else (args.requests, args.scale)
    try:
        return run_demo(
            policy_path=args.policy, requests=requests, scale=scale, quiet=args.quiet, review_log=args.review_log
        )
    except PolicyError as e:
        _print_problems(e.problems)
        return 2


if __name__ == "__main__":
    sys.exit(main())
