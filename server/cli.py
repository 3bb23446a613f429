"""``prefix-serve`` command line: ``serve`` and ``bench``.

``bench`` runs the ``prefix-serve-bench`` package (bench/ of a source checkout; ``make setup``
installs it), imported only when a benchmark runs: ``serve`` never imports it, nor PEFT.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from server.config import ConfigError, add_serve_arguments, config_from_args

BENCH_MISSING = (
    "prefix-serve bench: the benchmarks are not installed with the server; they are the\n"
    "prefix-serve-bench package, in the bench/ directory of a source checkout of prefix-serve.\n"
    "From the checkout, `make setup` installs it (with every dependency from requirements.lock),\n"
    "or, into this environment:\n"
    "    python -m pip install --no-deps --no-build-isolation -e ./bench"
)


def _bench_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = sub.add_parser(
        "bench",
        help="run a benchmark (docs/benchmarks.md; needs the prefix-serve-bench package)",
        description="Run a benchmark (docs/benchmarks.md).\n\n"
        "The benchmarks are not installed with the server: they are the prefix-serve-bench\n"
        "package, bench/ of a source checkout, which `make setup` installs.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    w1.add_argument(
        "--dtypes", default="float32,bfloat16", help="the engine's dtypes, comma-separated"
    )
    w1.add_argument("--no-peers", action="store_true", help="skip the text-only peers")
    w1.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="time every system this many times and keep its fastest (for shared hosts)",
    )
    w1.add_argument("--llama-gguf", default=None, help="GGUF file for llama-server, if installed")
    _add_attention_flag(w1)
    profile = which.add_parser("profile", help="where a W1 engine step's time goes, by part")
    profile.add_argument("--tenants", type=int, default=4)
    profile.add_argument("--requests", type=int, default=4, help="requests per tenant")
    profile.add_argument("--new-tokens", type=int, default=32)
    profile.add_argument("--dtype", default="float32")
    profile.add_argument("--model", default="default")
    profile.add_argument("--data-dir", default="./data")
    profile.add_argument("--json", default=None, help="where to write the JSON")
    _add_attention_flag(profile)
    w3 = which.add_parser("w3", help="the GPU engine on a Llama-3.2-1B-shaped model (CUDA)")
    w3.add_argument("--requests", type=int, default=64, help="requests in flight")
    w3.add_argument("--prefix", type=int, default=1024, help="system prompt tokens")
    w3.add_argument("--question", type=int, default=128, help="question tokens")
    w3.add_argument("--new-tokens", type=int, default=128)
    w3.add_argument("--variants", default="shared,distinct,shared-long", help="comma-separated")
    w3.add_argument("--no-baselines", action="store_true", help="skip PEFT and generate_batch")
    w3.add_argument("--no-graphs", action="store_true", help="decode steps eagerly")
    w3.add_argument(
        "--window",
        type=int,
        default=8,
        help="greedy decode steps run back to back on the GPU (EngineConfig.decode_window)",
    )
    w3.add_argument("--blas", choices=["cublas", "cublaslt"], help="the products' library")
    w3.add_argument("--json", default="bench/results/w3.json", help="where to write the JSON")
    host = which.add_parser(
        "host", help="the host's part of GPU decode windows, the device's part replaced"
    )
    host.add_argument("--requests", default="64,256", help="requests in flight, comma-separated")
    host.add_argument("--prefix", type=int, default=1024, help="system prompt tokens")
    host.add_argument("--question", type=int, default=128, help="question tokens")
    host.add_argument("--new-tokens", type=int, default=128)
    host.add_argument("--window", type=int, default=8, help="EngineConfig.decode_window")
    host.add_argument("--model", default="default", help="whose tokenizer")
    host.add_argument("--data-dir", default="./data")
    host.add_argument("--json", default=None, help="where to write the JSON")
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
    return _bench(args)


def _add_attention_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--attention",
        default="auto",
        choices=["auto", "native", "fused", "reference"],
        help="the engine's attention backend (EngineConfig.attention_backend; default auto)",
    )


def _bench(args: argparse.Namespace) -> int:
    try:
        if args.workload == "w1":
            from bench.w1 import run
        elif args.workload == "profile":
            from bench.profile import format_profile, profile_w1
        elif args.workload == "w3":
            from bench.w3 import run as run_w3
        elif args.workload == "host":
            from bench.host_step import run as run_host
        else:
            from bench.w2 import run as run_w2
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] != "bench":
            # bench is there, one of its dependencies (installed from the lock) is not.
            print(
                f"prefix-serve bench: {exc}; the prefix-serve-bench package needs it "
                "(`make setup` installs every dependency from requirements.lock)",
                file=sys.stderr,
            )
        else:
            print(BENCH_MISSING, file=sys.stderr)
        return 2
    if args.workload == "w1":
        if args.rounds < 1:
            print("prefix-serve bench w1: --rounds must be at least 1", file=sys.stderr)
            return 2
        run(
            args.tenants,
            args.requests,
            args.new_tokens,
            args.baselines,
            args.model,
            args.data_dir,
            args.json,
            args.torch_threads,
            tuple(d.strip() for d in args.dtypes.split(",") if d.strip()),
            not args.no_peers,
            args.llama_gguf,
            args.rounds,
            args.attention,
        )
    elif args.workload == "profile":
        result = profile_w1(
            args.tenants,
            args.requests,
            args.new_tokens,
            args.dtype,
            args.model,
            args.data_dir,
            args.attention,
        )
        print(format_profile(result))
        if args.json:
            from pathlib import Path

            Path(args.json).write_text(json.dumps(result, indent=2))
    elif args.workload == "host":
        run_host(
            tuple(int(n) for n in args.requests.split(",") if n.strip()),
            args.prefix,
            args.question,
            args.new_tokens,
            args.window,
            args.model,
            args.data_dir,
            args.json,
        )
    elif args.workload == "w3":
        run_w3(
            args.requests,
            args.prefix,
            args.question,
            args.new_tokens,
            tuple(v.strip() for v in args.variants.split(",") if v.strip()),
            not args.no_baselines,
            args.json,
            not args.no_graphs,
            window=args.window,
            blas=args.blas,
        )
    else:
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
