"""``prefix-serve`` command line: ``serve`` and ``bench``."""

from __future__ import annotations

import argparse
import sys


def _bench_parser(sub) -> None:
    bench = sub.add_parser("bench", help="run a benchmark of BENCHMARKS.md")
    which = bench.add_subparsers(dest="workload", required=True)
    w1 = which.add_parser("w1", help="multi-tenant prefix tuning on the CPU vs PEFT baselines")
    w1.add_argument("--tenants", type=int, default=4)
    w1.add_argument("--requests", type=int, default=4, help="requests per tenant")
    w1.add_argument("--new-tokens", type=int, default=32)
    w1.add_argument("--baselines", default="AB", help="which PEFT baselines to run: A, B, AB or ''")
    w1.add_argument("--model", default="default")
    w1.add_argument("--data-dir", default="./data")
    w1.add_argument("--json", default="bench/results/w1.json", help="where to write the JSON")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prefix-serve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _bench_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "bench" and args.workload == "w1":
        from bench.w1 import run

        run(
            args.tenants,
            args.requests,
            args.new_tokens,
            args.baselines,
            args.model,
            args.data_dir,
            args.json,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
