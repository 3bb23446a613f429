"""bench/capacity.py: the simulation on hand-computed cases, and its ring against a real
nginx (``hash $http_x_adapter consistent``) in front of three stub upstreams."""

from __future__ import annotations

import http.server
import threading
import zlib
from collections.abc import Iterator

import httpx
import pytest

from bench.capacity import (
    Ring,
    bounded_load,
    bytes_table,
    server_points,
    simulate,
    zipf_weights,
)
from bench.local_nginx import UPSTREAM_HEADER, LocalNginx, find_nginx


def test_lru_hits_and_imbalance_on_a_hand_computed_stream() -> None:
    route = {"a": "r1", "b": "r2", "c": "r1"}.__getitem__
    stream = ["a", "b", "a", "c", "a", "b"]
    # slots 1: r1 sees a (miss) a (hit) c (miss, a out) a (miss); r2 sees b (miss) b (hit)
    one = simulate(stream, ["r1", "r2", "r3"], route, slots=1)
    assert (one.hits, one.load) == (2, {"r1": 4, "r2": 2, "r3": 0})
    assert one.hit_rate == 2 / 6 and one.imbalance == 4 / 2  # mean 2 over three replicas
    # slots 2: c no longer evicts a, so r1's last a hits too
    two = simulate(stream, ["r1", "r2"], route, slots=2)
    assert (two.hits, two.imbalance) == (3, 4 / 3)


def test_zipf_weights_are_one_over_rank_normalised() -> None:
    assert zipf_weights(3, 1.0) == pytest.approx([6 / 11, 3 / 11, 2 / 11])
    assert zipf_weights(2, 2.0) == pytest.approx([4 / 5, 1 / 5])


def test_ring_points_follow_nginx_formula() -> None:
    points = server_points("10.0.0.1:8000")
    assert len(points) == 160 and len(server_points("10.0.0.1:8000", weight=2)) == 320
    # crc32(host \0 port prev), prev the previous point as 4 little-endian bytes (0 first)
    first = zlib.crc32(b"10.0.0.1\x008000\x00\x00\x00\x00")
    assert points[0] == first
    assert points[1] == zlib.crc32(b"10.0.0.1\x008000" + first.to_bytes(4, "little"))
    assert server_points("unix:/run/a.sock")[0] == zlib.crc32(b"/run/a.sock\x00\x00\x00\x00\x00")


def test_ring_lookup_wraps_and_remaps_only_the_removed_share() -> None:
    names = ["10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"]
    ring = Ring(names)
    past_end = next(f"k{i}" for i in range(10**6) if zlib.crc32(f"k{i}".encode()) > ring.hashes[-1])
    assert ring.lookup(past_end) == ring.owners[0]  # wraps to the first point
    keys = [f"adapter-{i}" for i in range(2000)]
    smaller = Ring(names[:2])
    for key in keys:
        owner = ring.lookup(key)
        if owner != names[2]:
            assert smaller.lookup(key) == owner  # only the removed server's keys move
        assert smaller.lookup(key) == ring.lookup(key, skip={names[2]})  # = nginx's failover
    assert ring.lookup("x", skip=set(names)) is None


def test_bounded_loads_pass_a_hot_key_on_at_its_cap() -> None:
    ring = Ring(["10.0.0.1:8000", "10.0.0.2:8000"])
    a = ring.lookup("x")
    b = next(s for s in ring.servers if s != a)
    route = bounded_load(ring, factor=1.0, window=4)  # cap: 1.0 x 4 / 2 = 2 of the last 4
    # 1, 2: a; 3, 4: a full, b; 5: both full, a (the window drops the first a); 6: likewise
    assert [route("x") for _ in range(6)] == [a, a, b, b, a, a]


def test_adapter_bytes_from_the_shapes() -> None:
    rows = {(r["shape"].split()[0], r["tokens"]): r for r in bytes_table((20,))}
    # SmolLM2-135M: 30 layers x 2 x 3 kv heads x 64 x 20 tokens; prompt: 576 x 20
    assert rows[("SmolLM2-135M", 20)]["prefix_fp32"] == 30 * 2 * 3 * 64 * 20 * 4 == 921_600
    assert rows[("SmolLM2-135M", 20)]["prompt_bf16"] == 576 * 20 * 2
    assert rows[("Llama-2-7B", 20)]["prefix_bf16"] == 32 * 2 * 32 * 128 * 20 * 2
    assert rows[("Llama-3-70B", 20)]["prefix_bf16"] == 80 * 2 * 8 * 128 * 20 * 2


@pytest.fixture
def stubs() -> Iterator[list[http.server.ThreadingHTTPServer]]:
    """Three loopback HTTP servers answering 200 to any GET."""

    class Stub(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stub) for _ in range(3)]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    yield servers
    for s in servers:
        s.shutdown()
        s.server_close()


def test_the_ring_predicts_real_nginx_and_its_failover(stubs) -> None:
    if find_nginx() is None:
        pytest.skip("no nginx binary: `make tools` installs the Debian package")
    addrs = [f"127.0.0.1:{s.server_port}" for s in stubs]
    nginx = LocalNginx(addrs).start()
    try:
        ring = Ring(addrs)
        keys = [f"adapter-{i}" for i in range(200)]
        with httpx.Client(base_url=nginx.url, trust_env=False) as http:
            seen = {
                k: http.get("/", headers={"X-Adapter": k}).headers[UPSTREAM_HEADER] for k in keys
            }
            assert seen == {k: ring.lookup(k) for k in keys}
            assert set(seen.values()) == set(addrs)
            stubs[0].shutdown()
            stubs[0].server_close()  # refused from now on: nginx walks on along the ring
            for k in keys:
                r = http.get("/", headers={"X-Adapter": k})
                tried = r.headers[UPSTREAM_HEADER].split(", ")
                owner = ring.lookup(k)
                expected = [owner] if owner != addrs[0] else [owner, ring.lookup(k, {addrs[0]})]
                assert (r.status_code, tried) == (200, expected), k
    finally:
        nginx.stop()
