"""Every Prometheus series of prefix-serve, in a registry of the app's own.

Two sources feed it:

- state the engine and the adapter store already keep is read when Prometheus scrapes: the
  engine's as the ``EngineSnapshot`` its thread published after its latest step (queue
  lengths, KV usage, token and preemption counters, the device tier; ``AsyncEngine``), the
  store's from its thread-safe host tier. Nothing is counted twice, nothing can drift, and
  the scrape never reads an object another thread is changing;
- what only the API sees (per-request latencies, outcomes, errors, HTTP answers) is handed in
  through ``observe_request``, ``count_error`` and ``count_http_request``.

Labels carry bounded values only: a fixed tier, finish reason, error type, route template or
HTTP status. Never a prompt, a key, a request id or an adapter or tenant name (an adapter name
belongs to a tenant and there may be millions): unknown values become ``other``. ``SPECS``
lists every family with the vLLM metric it parallels; docs/operations.md is its table.
"""

from __future__ import annotations

import copy
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from adapters_store.tiers import Histogram, TierStats
from server.engine.snapshot import EngineSnapshot

if TYPE_CHECKING:
    from adapters_store.store import AdapterStore

# Bounded label values. ------------------------------------------------------------------------
OTHER = "other"
TIERS = ("device", "host")
FINISH_REASONS = ("stop", "length", "abort", "error", OTHER)
# Admission outcomes (server/async_engine.py): taken, or refused for the server's capacity, the
# tenant's share of it, or a model not loaded.
ADMISSIONS = ("admitted", "capacity", "tenant_share", "unavailable")
# The OpenAI error `type`s the API answers with (server/api/errors.py), plus `other`.
ERROR_TYPES = (
    "invalid_request_error",
    "authentication_error",
    "permission_error",
    "not_found_error",
    "conflict_error",
    "request_too_large",
    "unsupported_media_type",
    "overloaded_error",
    "internal_error",
    "service_unavailable_error",
    "insufficient_storage_error",
    OTHER,
)
# The route templates of docs/api.md; a path that matched none is counted as `other`.
ROUTES = (
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/models",
    "/v1/models/{model_id}",
    "/v1/adapters",
    "/v1/adapters/{name}",
    "/v1/adapters/{name}/versions",
    "/v1/admin/tenants",
    "/v1/admin/tenants/{tenant}/adapters",
    "/v1/admin/tenants/{tenant}/adapters/{adapter}",
    "/health",
    "/ready",
    "/metrics",
    "/openapi.json",
    OTHER,
)

# fmt: off
# Histogram bounds, in seconds or tokens; +Inf is implied. Near vLLM's, with finer low
# buckets for inter-token latency, which is milliseconds on a GPU.
TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                  5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0,
                     15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000,
                 100000)


@dataclass(frozen=True)
class MetricSpec:
    """One metric family. ``name`` is the family name (a counter's samples add ``_total``)."""

    name: str
    kind: str  # counter | gauge | histogram
    help: str
    labels: tuple[str, ...] = ()
    vllm: str = ""  # the vLLM metric this parallels, "" when vLLM has none


_SPECS = (
    # Scheduler state (read at scrape time).
    MetricSpec("prefix_serve_requests_running", "gauge",
               "Requests in the running batch.", (), "vllm:num_requests_running"),
    MetricSpec("prefix_serve_requests_waiting", "gauge",
               "Requests queued for admission (preempted ones included).", (),
               "vllm:num_requests_waiting"),
    MetricSpec("prefix_serve_kv_cache_usage_ratio", "gauge",
               "Fraction of KV cache blocks held by running requests, 0 to 1.", (),
               "vllm:kv_cache_usage_perc"),
    MetricSpec("prefix_serve_kv_cache_occupied_ratio", "gauge",
               "Fraction of KV cache blocks not free: held by requests or by cached prefixes "
               "(evictable).", ()),
    MetricSpec("prefix_serve_prompt_tokens", "counter",
               "Prompt positions admitted, adapters' virtual tokens included.", (),
               "vllm:prompt_tokens_total"),
    MetricSpec("prefix_serve_generation_tokens", "counter", "Tokens generated.", (),
               "vllm:generation_tokens_total"),
    MetricSpec("prefix_serve_prefix_cache_queries", "counter",
               "Prompt positions looked up in the prefix cache, in tokens.", (),
               "vllm:prefix_cache_queries_total"),
    MetricSpec("prefix_serve_prefix_cache_hits", "counter",
               "Prompt positions found in the prefix cache, in tokens.", (),
               "vllm:prefix_cache_hits_total"),
    MetricSpec("prefix_serve_preemptions", "counter",
               "Sequences preempted (KV dropped, recomputed later) for lack of KV blocks.", (),
               "vllm:num_preemptions_total"),
    MetricSpec("prefix_serve_share_preemptions", "counter",
               "Sequences preempted (KV dropped, recomputed later, mostly from the prefix cache) "
               "to seat a waiting tenant below its share of the running seats or of the KV pool."),
    MetricSpec("prefix_serve_engine_steps", "counter", "Engine iterations that ran the model."),
    MetricSpec("prefix_serve_adapters_running", "gauge",
               "Distinct adapters (prefix, prompt and P-tuning) used by running requests.", (),
               "vllm:lora_requests_info{running_lora_adapters}"),
    MetricSpec("prefix_serve_adapters_waiting", "gauge",
               "Distinct adapters (prefix, prompt and P-tuning) used by waiting requests.", (),
               "vllm:lora_requests_info{waiting_lora_adapters}"),
    # Adapter tiers (read at scrape time): device (engine) and host (store) LRU tiers.
    MetricSpec("prefix_serve_adapter_tier_hits", "counter",
               "Adapter look-ups served by the tier.", ("tier",)),
    MetricSpec("prefix_serve_adapter_tier_misses", "counter",
               "Adapter look-ups the tier could not serve.", ("tier",)),
    MetricSpec("prefix_serve_adapter_tier_loads", "counter",
               "Adapters loaded into the tier from the tier below.", ("tier",)),
    MetricSpec("prefix_serve_adapter_tier_load_failures", "counter",
               "Loads into the tier that failed.", ("tier",)),
    MetricSpec("prefix_serve_adapter_tier_evictions", "counter",
               "Adapters evicted from the tier.", ("tier",)),
    MetricSpec("prefix_serve_adapter_tier_resident_adapters", "gauge",
               "Adapters held by the tier.", ("tier",)),
    MetricSpec("prefix_serve_adapter_tier_resident_bytes", "gauge",
               "Bytes held by the tier.", ("tier",)),
    MetricSpec("prefix_serve_adapter_tier_load_seconds", "histogram",
               "Time to load an adapter into the tier.", ("tier",)),
    # Per request (observed by the API).
    MetricSpec("prefix_serve_time_to_first_token_seconds", "histogram",
               "Arrival to first generated token.", (), "vllm:time_to_first_token_seconds"),
    MetricSpec("prefix_serve_inter_token_latency_seconds", "histogram",
               "Time between consecutive generated tokens of a request.", (),
               "vllm:inter_token_latency_seconds"),
    MetricSpec("prefix_serve_e2e_request_latency_seconds", "histogram",
               "Arrival to last token.", (), "vllm:e2e_request_latency_seconds"),
    MetricSpec("prefix_serve_request_queue_time_seconds", "histogram",
               "Arrival to first scheduling.", (), "vllm:request_queue_time_seconds"),
    MetricSpec("prefix_serve_request_prompt_tokens", "histogram",
               "Prompt positions per finished request.", (), "vllm:request_prompt_tokens"),
    MetricSpec("prefix_serve_request_generation_tokens", "histogram",
               "Generated tokens per finished request.", (), "vllm:request_generation_tokens"),
    MetricSpec("prefix_serve_requests_finished", "counter",
               "Requests that ended in the engine, by finish reason.", ("finish_reason",),
               "vllm:request_success_total{finished_reason}"),
    MetricSpec("prefix_serve_admissions", "counter",
               "Requests offered to the engine, by outcome: admitted, or refused (429) for the "
               "server's capacity or the tenant's share of it, or (503) while the model loads.",
               ("outcome",)),
    MetricSpec("prefix_serve_request_errors", "counter",
               "Requests answered with an error, by OpenAI error type.", ("error_type",)),
    MetricSpec("prefix_serve_http_requests", "counter",
               "HTTP requests answered, by route template and status.", ("route", "status"),
               "http_requests_total"),
)
# fmt: on
SPECS: Mapping[str, MetricSpec] = MappingProxyType({s.name: s for s in _SPECS})


def sample_names(spec: MetricSpec) -> tuple[str, ...]:
    """The series names a family exposes (what PromQL refers to)."""
    if spec.kind == "counter":
        return (spec.name + "_total",)
    if spec.kind == "histogram":
        return tuple(spec.name + s for s in ("_bucket", "_sum", "_count"))
    return (spec.name,)


def _empty_tier(name: str) -> TierStats:
    return TierStats(name, 0, 0, 0, 0, 0, 0, 0, 0, Histogram())


# The API-side observations. -------------------------------------------------------------------
@dataclass
class _Requests:
    """Per-request observations; guarded by ``Metrics._lock``."""

    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS_S))
    itl: Histogram = field(default_factory=lambda: Histogram(ITL_BUCKETS_S))
    e2e: Histogram = field(default_factory=lambda: Histogram(REQUEST_BUCKETS_S))
    queue: Histogram = field(default_factory=lambda: Histogram(REQUEST_BUCKETS_S))
    prompt_tokens: Histogram = field(default_factory=lambda: Histogram(TOKEN_BUCKETS))
    generation_tokens: Histogram = field(default_factory=lambda: Histogram(TOKEN_BUCKETS))
    finished: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    http: Counter[tuple[str, str]] = field(default_factory=Counter)


class Metrics:
    """The app's metrics. ``snapshot()`` returns the engine's latest published
    ``EngineSnapshot`` (all zero while the model loads; None: no engine, every engine series
    reads 0); ``store`` is the ``AdapterStore`` whose host tier is reported, or None.
    Thread-safe: observations and scrapes may come from any thread."""

    def __init__(
        self,
        snapshot: Callable[[], EngineSnapshot] | None = None,
        store: AdapterStore | None = None,
        admissions: Callable[[], Mapping[str, int]] = dict,
    ) -> None:
        """``admissions()``: counts by outcome (``ADMISSIONS``) since start."""
        self._snapshot: Callable[[], EngineSnapshot] = snapshot or EngineSnapshot
        self._store = store
        self._admissions = admissions
        self._lock = threading.Lock()
        self._requests = _Requests()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))

    # Called by the API ----------------------------------------------------------------------
    def observe_request(
        self,
        ttft_s: float | None,
        itl_s: Sequence[float],
        e2e_s: float,
        queue_s: float | None,
        finish_reason: str | None,
        prompt_tokens: int,
        generation_tokens: int,
    ) -> None:
        """One engine request that ended (finished or aborted; ``finish_reason`` is the
        engine's ``stop`` | ``length`` | ``abort``). Times in seconds from its arrival at the
        API; ``ttft_s`` None when no token came, ``queue_s`` None when unknown. ``itl_s`` holds
        the gaps between consecutive tokens (one fewer than the tokens)."""
        reason = finish_reason if finish_reason in FINISH_REASONS else OTHER
        with self._lock:
            r = self._requests
            if ttft_s is not None:
                r.ttft.observe(ttft_s)
            for gap in itl_s:
                r.itl.observe(gap)
            r.e2e.observe(e2e_s)
            if queue_s is not None:
                r.queue.observe(queue_s)
            r.prompt_tokens.observe(prompt_tokens)
            r.generation_tokens.observe(generation_tokens)
            r.finished[reason] += 1

    def count_error(self, error_type: str) -> None:
        """A request answered with an error; ``error_type`` is the OpenAI error ``type`` of the
        body (``invalid_request_error``, ``overloaded_error``, ...)."""
        label = error_type if error_type in ERROR_TYPES else OTHER
        with self._lock:
            self._requests.errors[label] += 1

    def count_http_request(self, route: str, status: int) -> None:
        """An HTTP answer; ``route`` is the matched route's template (never the raw path)."""
        route = route if route in ROUTES else OTHER
        code = str(status) if isinstance(status, int) and 100 <= status <= 599 else OTHER
        with self._lock:
            self._requests.http[(route, code)] += 1

    def render(self) -> tuple[bytes, str]:
        """The exposition body and its content type, for ``GET /metrics``."""
        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4

    # Read by the collector ------------------------------------------------------------------
    def engine_snapshot(self) -> EngineSnapshot:
        return self._snapshot()

    def tiers(self, state: EngineSnapshot) -> dict[str, TierStats]:
        host = self._store.host_tier if self._store is not None else None
        return {
            "device": state.device_tier or _empty_tier("device"),
            "host": host.stats() if host is not None else _empty_tier("host"),
        }

    def admission_counts(self) -> dict[str, int]:
        return dict(self._admissions())

    def requests_snapshot(self) -> _Requests:
        with self._lock:
            return copy.deepcopy(self._requests)


class _Collector:
    """Builds every family at scrape time from ``Metrics``' sources."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        state = self.metrics.engine_snapshot()
        yield from _engine_families(state)
        yield from _tier_families(self.metrics.tiers(state))
        yield from _request_families(self.metrics.requests_snapshot())
        admissions = self.metrics.admission_counts()
        family = _family(SPECS["prefix_serve_admissions"])
        for outcome in ADMISSIONS:
            family.add_metric([outcome], admissions.get(outcome, 0))
        yield family


def _engine_families(state: EngineSnapshot) -> Iterator[Metric]:
    scalars = {
        "prefix_serve_requests_running": state.running,
        "prefix_serve_requests_waiting": state.waiting,
        "prefix_serve_kv_cache_usage_ratio": state.kv_usage,
        "prefix_serve_kv_cache_occupied_ratio": state.kv_occupied,
        "prefix_serve_prompt_tokens": state.prompt_tokens,
        "prefix_serve_generation_tokens": state.generation_tokens,
        "prefix_serve_prefix_cache_queries": state.prompt_tokens,
        "prefix_serve_prefix_cache_hits": state.cached_prompt_tokens,
        "prefix_serve_preemptions": state.preemptions,
        "prefix_serve_share_preemptions": state.share_preemptions,
        "prefix_serve_engine_steps": state.steps,
        "prefix_serve_adapters_running": state.adapters_running,
        "prefix_serve_adapters_waiting": state.adapters_waiting,
    }
    for name, value in scalars.items():
        family = _family(SPECS[name])
        family.add_metric([], value)
        yield family


def _tier_families(tiers: dict[str, TierStats]) -> Iterator[Metric]:
    values: dict[str, Callable[[TierStats], int]] = {
        "prefix_serve_adapter_tier_hits": lambda t: t.hits,
        "prefix_serve_adapter_tier_misses": lambda t: t.misses,
        "prefix_serve_adapter_tier_loads": lambda t: t.loads,
        "prefix_serve_adapter_tier_load_failures": lambda t: t.load_failures,
        "prefix_serve_adapter_tier_evictions": lambda t: t.evictions,
        "prefix_serve_adapter_tier_resident_adapters": lambda t: t.resident_entries,
        "prefix_serve_adapter_tier_resident_bytes": lambda t: t.resident_bytes,
    }
    for name, value_of in values.items():
        family = _family(SPECS[name])
        for tier in TIERS:
            family.add_metric([tier], value_of(tiers[tier]))
        yield family
    load_seconds = _histogram_family(SPECS["prefix_serve_adapter_tier_load_seconds"])
    for tier in TIERS:
        _add_histogram(load_seconds, [tier], tiers[tier].load_seconds)
    yield load_seconds


def _request_families(r: _Requests) -> Iterator[Metric]:
    histograms = {
        "prefix_serve_time_to_first_token_seconds": r.ttft,
        "prefix_serve_inter_token_latency_seconds": r.itl,
        "prefix_serve_e2e_request_latency_seconds": r.e2e,
        "prefix_serve_request_queue_time_seconds": r.queue,
        "prefix_serve_request_prompt_tokens": r.prompt_tokens,
        "prefix_serve_request_generation_tokens": r.generation_tokens,
    }
    for name, hist in histograms.items():
        histogram = _histogram_family(SPECS[name])
        _add_histogram(histogram, [], hist)
        yield histogram
    labelled = {
        "prefix_serve_requests_finished": (FINISH_REASONS, r.finished),
        "prefix_serve_request_errors": (ERROR_TYPES, r.errors),
    }
    for name, (values, counts) in labelled.items():
        family = _family(SPECS[name])
        for value in values:  # every value, zeros included: rate() sees the first one
            family.add_metric([value], counts[value])
        yield family
    family = _family(SPECS["prefix_serve_http_requests"])
    for (route, status), count in sorted(r.http.items()):
        family.add_metric([route, status], count)
    yield family


def _family(spec: MetricSpec) -> CounterMetricFamily | GaugeMetricFamily:
    """A counter or gauge family (histograms: ``_histogram_family``)."""
    kinds: dict[str, type[CounterMetricFamily | GaugeMetricFamily]] = {
        "counter": CounterMetricFamily,
        "gauge": GaugeMetricFamily,
    }
    return kinds[spec.kind](spec.name, spec.help, labels=list(spec.labels))


def _histogram_family(spec: MetricSpec) -> HistogramMetricFamily:
    if spec.kind != "histogram":
        raise ValueError(f"metric {spec.name} is a {spec.kind}, not a histogram")
    return HistogramMetricFamily(spec.name, spec.help, labels=list(spec.labels))


def _add_histogram(family: HistogramMetricFamily, labels: list[str], hist: Histogram) -> None:
    buckets = [
        (floatToGoString(bound), count)  # type: ignore[no-untyped-call]  # prometheus_client: unannotated
        for bound, count in hist.cumulative()
    ]
    family.add_metric(labels, buckets, sum_value=hist.sum)
