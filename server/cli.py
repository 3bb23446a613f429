"""``prefix-serve`` command line: ``serve`` and ``bench``."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from server.config import ConfigError, add_serve_arguments, config_from_args


def _bench_parser(sub) -> None:
    bench = sub.add_parser("bench", help="run a benchmark (docs/benchmarks.md)")
    which = bench.add_subparsers(dest="workload", required=True)
    w1 = which.add_parser("w1", help="multi-tenant prefix tuning on the CPU vs PEFT baselines")
    w1.add_argument("--tenants", type=int, default=4)
    w1.add_argument("--requests", type=int, default=4, help="requests per tenant")
    w1.add_argument("--new-tokens", type=int, default=32)
    w1.add_argument("--baselines", default="AB", help="which PEFT baselines to run: A, B, AB or ''")
    w1.add_argument("--model", default="default")
    w1.add_argument("--data-dir", default="./data")
    w1.add_argument("--json", default="bench/results/w1.json", help="where to write the JSON")
    w1.add_argument("--torch-threads", type=int, default=None, help="default: torch's")
    w2 = which.add_parser("w2", help="W1's tenants served over HTTP at concurrency 1, 4, 16")
    w2.add_argument("--tenants", type=int, default=4)
    w2.add_argument("--requests", type=int, default=4, help="requests per tenant")
    w2.add_argument("--new-tokens", type=int, default=32)
    w2.add_argument("--concurrency", default="1,4,16", help="comma-separated levels")
    w2.add_argument("--model", default="default")
    w2.add_argument("--data-dir", default="./data", help="where the model is (converted) cached")
    w2.add_argument("--json", default="bench/results/w2.json", help="where to write the JSON")
    w2.add_argument("--plot", default="bench/results/w2.png", help="where to draw the PNG")
    w2.add_argument("--rounds", type=int, default=3, help="top-level runs vs in-process runs")
    w2.add_argument("--torch-threads", type=int, default=None, help="for server and reference")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prefix-serve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="run the HTTP server (every flag also reads PREFIX_SERVE_<FLAG>)",
        description="Serve the OpenAI-compatible API and adapter management (see docs/api.md).",
    )
    add_serve_arguments(serve)
    _bench_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
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
            args.torch_threads,
        )
    elif args.command == "bench" and args.workload == "w2":
        from bench.w2 import run as run_w2

        levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
        run_w2(
            args.tenants,
            args.requests,
            args.new_tokens,
            levels,
            args.model,
            args.data_dir,
            args.json,
            args.plot,
            args.rounds,
            args.torch_threads,
        )
    return 0


def _serve(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args, os.environ)
        logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
        from server.api.server import serve

        return serve(config)
    except ConfigError as exc:
        print(f"prefix-serve serve: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
