"""Capacity on paper, checked by simulation (docs/operations.md, "Capacity").

    python -m bench.capacity                 # the tables of docs/operations.md
    python -m bench.capacity --requests 400000 --adapters 20000 --zipf 1.1

Two parts:

- **Bytes.** What one adapter costs at each tier, from the model's shape: prefix tuning stores
  per-layer keys and values (layers x 2 x kv_heads x head_dim per virtual token), prompt and
  P-tuning one embedding (hidden per virtual token) whose KV is derived on the device.
- **Routing.** N replicas behind nginx's ``hash $http_x_adapter consistent`` (``Ring``: the
  same points nginx computes, so it predicts which replica nginx picks; the scale-out test
  checks that against a real nginx), each replica holding its hottest adapters in an LRU of
  ``slots`` entries, under Zipf-distributed adapter popularity. Reported per replica count:
  the hit rate of the hot tier, and load imbalance (busiest replica's requests / the mean),
  against round robin (any replica, same LRUs) and consistent hashing with bounded loads (the
  ring, but a replica already holding ``c`` times its share of the recent window passes the
  request to the next one on the ring).
"""

from __future__ import annotations

import argparse
import bisect
import math
import random
import zlib
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

POINTS_PER_WEIGHT = 160  # nginx: ngx_http_upstream_init_chash, npoints = weight * 160


# -- nginx's consistent hash ----------------------------------------------------------------


def server_points(name: str, weight: int = 1) -> list[int]:
    """The ring points nginx gives ``server name weight=W;`` in a ``hash ... consistent``
    upstream: ``crc32(HOST "\\0" PORT PREV)``, PREV the previous point as 4 little-endian bytes
    (0 for the first), 160 points per unit of weight. ``name`` is the address as written in
    the ``server`` line; the port is what follows the last ``:`` when it is all digits."""
    host, port = name, ""
    head, sep, tail = name.rpartition(":")
    if sep and (tail.isdigit() or not tail):
        host, port = head, tail
    if name.lower().startswith("unix:"):
        host, port = name[5:], ""
    base = zlib.crc32(host.encode() + b"\0" + port.encode())
    points, prev = [], 0
    for _ in range(weight * POINTS_PER_WEIGHT):
        prev = zlib.crc32(prev.to_bytes(4, "little"), base)
        points.append(prev)
    return points


class Ring:
    """nginx's consistent-hash ring over ``servers`` (``{name: weight}`` or names of weight
    1). A key goes to the server of the first point >= crc32(key), wrapping to the first
    point; servers in ``skip`` (down, or already tried) pass it to the next point's server."""

    def __init__(self, servers: Iterable[str] | dict[str, int]) -> None:
        weights = dict(servers) if isinstance(servers, dict) else dict.fromkeys(servers, 1)
        assert weights, "a ring needs at least one server"
        points: dict[int, str] = {}
        for name, weight in weights.items():
            for h in server_points(name, weight):
                points.setdefault(h, name)  # equal hashes: nginx keeps one of them
        self.servers = list(weights)
        self.hashes = sorted(points)
        self.owners = [points[h] for h in self.hashes]

    def start(self, key: str) -> int:
        """Index of the key's first point (nginx's ``find_chash_point``)."""
        return bisect.bisect_left(self.hashes, zlib.crc32(key.encode())) % len(self.hashes)

    def lookup(self, key: str, skip: frozenset[str] | set[str] = frozenset()) -> str | None:
        """The server nginx sends ``key`` to; None when every server is skipped."""
        i, n = self.start(key), len(self.hashes)
        for step in range(n):
            owner = self.owners[(i + step) % n]
            if owner not in skip:
                return owner
        return None

    def walk(self, key: str) -> Iterator[str]:
        """Distinct servers in the order a key meets them on the ring (its failover order)."""
        i, n, seen = self.start(key), len(self.hashes), set()
        for step in range(n):
            owner = self.owners[(i + step) % n]
            if owner not in seen:
                seen.add(owner)
                yield owner
                if len(seen) == len(self.servers):
                    return


# -- the simulation -------------------------------------------------------------------------


def zipf_weights(n: int, s: float) -> list[float]:
    """Popularity of ranks 1..n: proportional to 1/rank**s, summing to 1."""
    raw = [1.0 / (rank**s) for rank in range(1, n + 1)]
    total = sum(raw)
    return [w / total for w in raw]


def zipf_requests(adapters: int, s: float, count: int, seed: int = 0) -> list[str]:
    """``count`` adapter names drawn from a Zipf(s) popularity over ``adapters`` names."""
    rng = random.Random(seed)
    names = [f"adapter-{i}" for i in range(adapters)]
    cum, acc = [], 0.0
    for w in zipf_weights(adapters, s):
        acc += w
        cum.append(acc)
    return rng.choices(names, cum_weights=cum, k=count)


@dataclass(frozen=True)
class SimResult:
    """``hits``: requests whose adapter was already in its replica's hot tier; ``load``:
    requests per replica (every replica listed, idle ones at 0)."""

    requests: int
    hits: int
    load: dict[str, int]

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 0.0

    @property
    def imbalance(self) -> float:
        """Busiest replica's requests over the mean (1.0 is perfect balance)."""
        mean = self.requests / len(self.load)
        return max(self.load.values()) / mean if mean else 0.0


Router = Callable[[str], str]


def simulate(
    requests: Sequence[str], replicas: Sequence[str], route: Router, slots: int
) -> SimResult:
    """Send each request to ``route(adapter)``; each replica keeps an LRU of ``slots``
    adapters (its hot tier). A request is a hit when its replica already holds its adapter."""
    lru = {r: OrderedDict() for r in replicas}
    load = dict.fromkeys(replicas, 0)
    hits = 0
    for adapter in requests:
        replica = route(adapter)
        load[replica] += 1
        held = lru[replica]
        if adapter in held:
            hits += 1
            held.move_to_end(adapter)
        else:
            held[adapter] = None
            if len(held) > slots:
                held.popitem(last=False)
    return SimResult(len(requests), hits, load)


def round_robin(replicas: Sequence[str]) -> Router:
    turn = iter(range(1 << 62))
    return lambda _adapter: replicas[next(turn) % len(replicas)]


def bounded_load(ring: Ring, factor: float, window: int) -> Router:
    """Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam 2018): a replica
    that served more than ``factor`` x its fair share of the last ``window`` requests passes
    the request to the next replica on the key's ring walk."""
    recent: deque[str] = deque()
    counts: Counter[str] = Counter()
    cap = max(1, math.ceil(factor * window / len(ring.servers)))

    def route(adapter: str) -> str:
        first = None
        for replica in ring.walk(adapter):
            first = first or replica
            if counts[replica] < cap:
                chosen = replica
                break
        else:
            chosen = first
        recent.append(chosen)
        counts[chosen] += 1
        if len(recent) > window:
            counts[recent.popleft()] -= 1
        return chosen

    return route


def replica_names(n: int) -> list[str]:
    """Addresses as they would appear in nginx's upstream (their hash places them)."""
    return [f"10.0.0.{i + 1}:8000" for i in range(n)]


def routing_table(
    counts: Sequence[int], adapters: int, s: float, requests: int, slots: int, seed: int
) -> list[dict]:
    stream = zipf_requests(adapters, s, requests, seed)
    rows = []
    for n in counts:
        names = replica_names(n)
        ring = Ring(names)
        hashed = simulate(stream, names, ring.lookup, slots)
        spread = simulate(stream, names, round_robin(names), slots)
        bounded = simulate(stream, names, bounded_load(ring, 1.25, 1000), slots)
        adapter_share = Counter(ring.lookup(f"adapter-{i}") for i in range(adapters))
        rows.append(
            {
                "replicas": n,
                "hash_hit": hashed.hit_rate,
                "hash_imbalance": hashed.imbalance,
                "adapters_imbalance": max(adapter_share.values()) / (adapters / n),
                "rr_hit": spread.hit_rate,
                "rr_imbalance": spread.imbalance,
                "bounded_hit": bounded.hit_rate,
                "bounded_imbalance": bounded.imbalance,
            }
        )
    return rows


# -- bytes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    hidden: int
    kv_heads: int
    head_dim: int

    def prefix_values_per_token(self) -> int:
        """Values of one virtual token of prefix-tuning KV (keys and values, every layer)."""
        return self.layers * 2 * self.kv_heads * self.head_dim

    def prompt_values_per_token(self) -> int:
        return self.hidden


SHAPES = (
    Shape("SmolLM2-135M (default)", layers=30, hidden=576, kv_heads=3, head_dim=64),
    Shape("Llama-2-7B (MHA)", layers=32, hidden=4096, kv_heads=32, head_dim=128),
    Shape("Llama-3-70B (GQA 8)", layers=80, hidden=8192, kv_heads=8, head_dim=128),
)


def bytes_table(tokens: Sequence[int]) -> list[dict]:
    """Per shape and virtual-token count: the stored/host copy (float32, canonical) and the
    device copy (bfloat16) of each kind; prompt/P-tuning's derived KV has prefix tuning's size."""
    rows = []
    for shape in SHAPES:
        for p in tokens:
            kv = shape.prefix_values_per_token() * p
            emb = shape.prompt_values_per_token() * p
            rows.append(
                {
                    "shape": shape.name,
                    "tokens": p,
                    "prefix_fp32": kv * 4,
                    "prefix_bf16": kv * 2,
                    "prompt_fp32": emb * 4,
                    "prompt_bf16": emb * 2,
                }
            )
    return rows


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", default="1,2,3,4,8,16,32")
    parser.add_argument("--adapters", type=int, default=10_000)
    parser.add_argument("--zipf", type=float, default=1.0)
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--slots", type=int, default=64, help="hot adapters per replica")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    print("| shape | virtual tokens | prefix KV fp32 (blob, host) | prefix KV bf16 (device) "
          "| prompt fp32 (blob, host) | prompt bf16 (device) |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in bytes_table((20, 128)):
        print(
            f"| {r['shape']} | {r['tokens']} | {human(r['prefix_fp32'])} | "
            f"{human(r['prefix_bf16'])} | {human(r['prompt_fp32'])} | {human(r['prompt_bf16'])} |"
        )
    print()
    counts = [int(x) for x in args.replicas.split(",")]
    rows = routing_table(counts, args.adapters, args.zipf, args.requests, args.slots, args.seed)
    print(
        f"{args.requests} requests, {args.adapters} adapters, Zipf s={args.zipf}, "
        f"{args.slots} hot slots per replica\n"
    )
    print("| replicas | hash: hot hit rate | hash: load max/mean | hash: adapters max/mean "
          "| round robin: hit rate | round robin: max/mean | bounded 1.25: hit rate "
          "| bounded 1.25: max/mean |")  # fmt: skip
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['replicas']} | {r['hash_hit']:.1%} | {r['hash_imbalance']:.2f} | "
            f"{r['adapters_imbalance']:.2f} | {r['rr_hit']:.1%} | {r['rr_imbalance']:.2f} | "
            f"{r['bounded_hit']:.1%} | {r['bounded_imbalance']:.2f} |"
        )


if __name__ == "__main__":
    main()
