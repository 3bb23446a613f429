"""Helpers shared by the HTTP tests (a module of its own: ``conftest`` is ambiguous as an
import name when several test folders have one)."""

from __future__ import annotations

import io
import os
import socket
import stat
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import httpx
import openai
import uvicorn

from server.async_engine import AsyncEngine
from server.engine.engine import EngineConfig
from server.llm import LLM
from server.served_model import ServedModel

DATA_DIR = Path(os.environ.get("PREFIX_SERVE_TEST_DATA_DIR", "data"))
TINY_ID = "tiny-llama"
KEYS = {"acme": "key-acme", "globex": "key-globex"}
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def make_llm(model_dir: Path, **engine) -> LLM:
    engine.setdefault("kv_cache_memory", 64 << 20)
    return LLM(
        str(model_dir),
        data_dir=DATA_DIR,
        device="cpu",
        dtype="float32",
        engine_config=EngineConfig(**engine),
    )


class LiveServer:
    """A uvicorn server in a thread, on a free loopback port, around ``create_app``."""

    def __init__(self, app) -> None:
        self.app = app
        self.ctx = app.state.ctx
        # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY only on sockets whose proto says
        # TCP, and without it every response after a connection's first waits ~40 ms (Nagle
        # holding the body back until the client's delayed ACK of the headers).
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(
            app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]})

    @property
    def engine(self) -> AsyncEngine:
        engine = self.ctx.engine
        assert isinstance(engine, AsyncEngine)  # call_blocking: the tests' engine probes
        return engine

    def start(self, wait_ready: bool = True) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        while wait_ready and not self.engine.ready:
            assert time.monotonic() < deadline, "model did not load"
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()

    def openai(self, tenant: str | None = "acme", **kw) -> openai.OpenAI:
        key = KEYS.get(tenant, "none") if tenant else "none"
        kw.setdefault("http_client", httpx.Client(trust_env=False, timeout=60))
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, **kw)

    def http(self, tenant: str | None = "acme", **kw) -> httpx.Client:
        headers = {"Authorization": f"Bearer {KEYS[tenant]}"} if tenant else {}
        kw.setdefault("timeout", 60)
        return httpx.Client(base_url=self.url, headers=headers, trust_env=False, **kw)

    def engine_state(self) -> dict:
        """Read in the engine thread, between steps."""

        def read(served: ServedModel) -> dict:
            e = served.engine
            return {
                "seqs": len(e.seqs),
                "free": e.pool.num_free,
                "cached": e.tree.num_cached_blocks,
                "blocks": e.pool.num_blocks,
                "running": len(e.scheduler.running),
                "waiting": e.scheduler.num_waiting(),
                "generated": e.stats.generated_tokens,
            }

        return self.engine.call_blocking(read)

    def wait_idle(self, timeout: float = 10.0) -> dict:
        """Until no request holds a KV block: every used block is the prefix tree's."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.engine_state()
            if state["seqs"] == 0 and state["free"] + state["cached"] == state["blocks"]:
                return state
            assert time.monotonic() < deadline, f"engine still busy: {state}"
            time.sleep(0.02)


def error_of(response: httpx.Response) -> dict:
    """The OpenAI error object, after checking the shape exactly."""
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def files_of(path: Path) -> dict:
    """Multipart ``config`` + ``weights`` parts of a PEFT output directory."""
    return {
        "config": (CONFIG, (path / CONFIG).read_bytes(), "application/json"),
        "weights": (WEIGHTS, (path / WEIGHTS).read_bytes(), "application/octet-stream"),
    }


def zip_of(entries: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in entries.items():
            z.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            z.writestr(info, target)
    return buf.getvalue()


def tar_gz_of(entries: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            t.addfile(info)
    return buf.getvalue()


def peft_entries(path: Path, prefix: str = "my-adapter/") -> dict[str, bytes]:
    """What zipping a PeftModel.save_pretrained directory gives (README.md included)."""
    return {
        prefix + CONFIG: (path / CONFIG).read_bytes(),
        prefix + WEIGHTS: (path / WEIGHTS).read_bytes(),
        prefix + "README.md": b"# model card\n",
    }


def upload(http: httpx.Client, name: str, **files) -> httpx.Response:
    return http.post("/v1/adapters", data={"name": name}, files=files)
