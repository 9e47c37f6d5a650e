#!/usr/bin/env python3
"""API fuzzing, the long run: schemathesis on every operation of both services, as every caller.

The same driver as ``tests/integration/test_api_fuzz.py`` (``tests/api_fuzz.py``)
with many more examples: a coordinator (TLS) and a node run as processes on
127.0.0.1 with data in them (a synthetic site corpus ingested, the approved
exams shared, release ``v1`` cut); each operation of each live OpenAPI document
is sent ``--examples`` generated requests (valid and invalid ones) as each caller
that may use it and ``--refused`` as each caller that may not, derandomized
(the same requests on every run). Every answer is checked: no 5xx; status, content type, headers and
body as documented; every error body an ``ErrorBody``; 401/403 for a caller
without the role, never for one with it. Revoking a site runs last.

Prints a table (operation × caller: examples tried, statuses seen, failures
found), then one example of each failure. A table, not pass/fail.

    .venv/bin/python bench/api_fuzz.py [--examples 100] [--refused 25] [--slow 20]
        [--only node|coordinator] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the driver lives with the tests

from tests import api_fuzz  # noqa: E402

#: Operations whose examples are slow to generate (a nested signed manifest).
SLOW = {("POST", "/api/v1/uploads")}
LAST = {("POST", "/api/v1/sites/{name}/revoke")}


def run_service(
    name: str,
    schema: object,
    callers: list[api_fuzz.Caller],
    roles: dict[tuple[str, str], frozenset[str] | None],
    base_url: str,
    args: argparse.Namespace,
) -> list[api_fuzz.Outcome]:
    found = {api_fuzz.label(op): op for op in api_fuzz.operations(schema)}
    missing = set(found) ^ set(roles)
    if missing:
        print(f"{name}: operations without roles, or roles without operations: {missing}")
    outcomes = []
    for key in sorted(found, key=lambda k: (k in LAST, k[1], k[0])):
        for caller in callers:
            allowed = roles.get(key) is None or caller.name in (roles[key] or ())
            examples = args.examples if allowed else args.refused
            if key in SLOW:
                examples = min(examples, args.slow)
            outcome = api_fuzz.fuzz(found[key], caller, roles.get(key), base_url, examples)
            outcomes.append(outcome)
            print(
                f"  {name} {outcome.operation} as {caller.name}: {outcome.examples} examples, "
                f"{len(outcome.failures)} failures ({outcome.seconds:.1f} s)",
                file=sys.stderr,
            )
    return outcomes


def table(rows: list[tuple[str, api_fuzz.Outcome]]) -> str:
    head = ["service", "operation", "caller", "may", "examples", "statuses", "failures"]
    lines = [
        [
            service,
            o.operation,
            o.caller,
            "yes" if o.allowed else "no",
            str(o.examples),
            " ".join(f"{s}×{n}" for s, n in sorted(o.statuses.items())),
            str(len(o.failures)),
        ]
        for service, o in rows
    ]
    widths = [max(len(r[i]) for r in [head, *lines]) for i in range(len(head))]

    def fmt(row: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    return "\n".join(
        [fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, lines)]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=100, help="per operation, allowed caller")
    parser.add_argument("--refused", type=int, default=25, help="per operation, refused caller")
    parser.add_argument("--slow", type=int, default=20, help="cap for POST /api/v1/uploads")
    parser.add_argument("--only", choices=["node", "coordinator"])
    parser.add_argument("--workdir", type=Path, help="where the services' homes go (a temp dir)")
    args = parser.parse_args()

    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(dir=args.workdir) as tmp,
        api_fuzz.federation(Path(tmp)) as running,
    ):
        setup = time.monotonic() - started
        rows: list[tuple[str, api_fuzz.Outcome]] = []
        if args.only in (None, "node"):
            schema = api_fuzz.load_schema(f"{running.node.url}/api/v1/openapi.json")
            for outcome in run_service(
                "node",
                schema,
                api_fuzz.node_callers(running),
                api_fuzz.node_roles(),
                running.node.url,
                args,
            ):
                rows.append(("node", outcome))
        if args.only in (None, "coordinator"):
            url = running.coordinator.url
            schema = api_fuzz.load_schema(
                f"{url}/api/v1/openapi.json", verify=str(running.coordinator.ca)
            )
            for outcome in run_service(
                "coordinator",
                schema,
                api_fuzz.coordinator_callers(running),
                api_fuzz.coordinator_roles(),
                url,
                args,
            ):
                rows.append(("coordinator", outcome))
        logs = {
            "node": running.node.log.read_text(),
            "coordinator": running.coordinator.log.read_text(),
        }
    total = time.monotonic() - started

    print(
        f"\nAPI fuzzing ({api_fuzz.when()}, {platform.processor() or platform.machine()}, ", end=""
    )
    print(f"Python {platform.python_version()}, schemathesis {api_fuzz.schemathesis.__version__})")
    print(
        f"examples per operation: {args.examples} (caller with the role), "
        f"{args.refused} (without), POST /api/v1/uploads at most {args.slow}\n"
    )
    print(table(rows))
    examples = sum(o.examples for _, o in rows)
    failures = [(s, o, k, v) for s, o in rows for k, v in o.failures.items()]
    unhandled = sum(text.count("unhandled error") for text in logs.values())
    print(
        f"\n{len(rows)} operation × caller pairs, {examples} requests, "
        f"{len(failures)} distinct failures, {unhandled} unhandled errors in the service logs; "
        f"setup {setup:.0f} s, total {total:.0f} s"
    )
    for service, outcome, kind, example in failures:
        print(f"\n## {service} {outcome.operation} as {outcome.caller}: {kind}\n{example}")


if __name__ == "__main__":
    main()
