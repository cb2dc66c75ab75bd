"""Engine load from vLLM's Prometheus `/metrics`, and the loop that polls every endpoint.

`parse_vllm_metrics` is pure: exposition text in, `EngineStats` out. It reads vLLM's names
(`vllm:num_requests_running`, `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc` or the
older `vllm:gpu_cache_usage_perc`, `vllm:prefix_cache_queries[_total]`,
`vllm:prefix_cache_hits[_total]`), ignores every label (`model_name`, `engine`, ...) and sums
over engines (a data-parallel vLLM exposes one series per engine; KV usage is averaged, since
each engine has its own cache). Text that is not exposition format raises `ScrapeParseError`;
the scraper counts it and treats the endpoint's figures as unknown.

`Scraper` polls `/metrics` and `/health` of each endpoint every `interval_s` with aiohttp and
feeds `SchedulerCore.update_scrape`; a failed scrape stores nothing, so the last figures age
past the core's staleness limit and count as unknown, never as zero. Health uses hysteresis: an
endpoint leaves routing after `unhealthy_after` consecutive failures and returns after
`healthy_after` consecutive successes, so one lost packet does not reshuffle the rings.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
from twinroute.scheduler.core import SchedulerCore
from twinroute.scheduler.types import Endpoint

logger = logging.getLogger(__name__)

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_USAGE = "vllm:kv_cache_usage_perc"
KV_USAGE_OLD = "vllm:gpu_cache_usage_perc"
PREFIX_QUERIES = "vllm:prefix_cache_queries"
PREFIX_HITS = "vllm:prefix_cache_hits"
# An info gauge whose labels carry the engine's cache configuration, among them
# `num_gpu_blocks` (blocks of KV the engine allocated) and `block_size` (tokens per block).
CACHE_CONFIG = "vllm:cache_config_info"


class ScrapeParseError(ValueError):
    """The text is not Prometheus exposition format (or carries no vLLM figures)."""


@dataclass(frozen=True, slots=True)
class EngineStats:
    """One scrape of one vLLM server; None where the server did not report the figure."""

    running: int | None = None
    waiting: int | None = None
    kv_usage: float | None = None
    prefix_cache_queries: float | None = None
    prefix_cache_hits: float | None = None
    engines: int = 0
    # Tokens of KV the server holds (num_gpu_blocks x block_size, summed over its engines).
    kv_capacity_tokens: int | None = None

    @property
    def prefix_cache_hit_rate(self) -> float | None:
        if not self.prefix_cache_queries or self.prefix_cache_hits is None:
            return None
        return self.prefix_cache_hits / self.prefix_cache_queries


# Prefixes of the sample names read below, for a fast skip of every other line.
_READ_NAMES: tuple[str, ...] = (
    RUNNING,
    WAITING,
    KV_USAGE,
    KV_USAGE_OLD,
    PREFIX_QUERIES,
    PREFIX_HITS,
    CACHE_CONFIG,
)


def _series_name(name: str) -> str | None:
    """The figure a sample name stands for, or None for samples we do not read."""
    if name in (RUNNING, WAITING, KV_USAGE, KV_USAGE_OLD):
        return name
    for counter in (PREFIX_QUERIES, PREFIX_HITS):
        if name in (counter, counter + "_total"):
            return counter
    return None


def _split_sample(line: str) -> tuple[str, str, float]:
    """(name, labels text, value) of one sample line; raises ScrapeParseError."""
    brace = line.find("{")
    if brace >= 0:
        close = line.rfind("}")
        if close < brace:
            raise ScrapeParseError(f"unbalanced labels in {line[:80]!r}")
        name, labels, rest = line[:brace], line[brace + 1 : close], line[close + 1 :]
    else:
        name, _, rest = line.partition(" ")
        labels = ""
    fields = rest.split()
    if not name or not fields:
        raise ScrapeParseError(f"sample without a value: {line[:80]!r}")
    try:
        value = float(fields[0])
    except ValueError:
        raise ScrapeParseError(f"value {fields[0][:40]!r} is not a number") from None
    if not name.replace(":", "_").replace("_", "a").isalnum():
        raise ScrapeParseError(f"bad metric name {name[:80]!r}")
    return name.strip(), labels, value


def parse_vllm_metrics(text: str) -> EngineStats:
    """Sum vLLM's load figures over engines (labels ignored)."""
    if not isinstance(text, str):
        raise ScrapeParseError(f"metrics must be text, got {type(text).__name__}")
    sums: dict[str, float] = {}
    engines: dict[str, set[str]] = {}
    samples = 0
    kv_capacity_tokens: int | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not line.startswith(_READ_NAMES):
            # A sample this parser does not read (most of vLLM's 50 KB: histogram buckets):
            # checked only for looking like one, so an HTML error page still fails the scrape.
            if not (line[0].isalpha() or line[0] in "_:"):
                raise ScrapeParseError(f"not a metrics line: {line[:80]!r}")
            samples += 1
            continue
        name, labels, value = _split_sample(line)
        samples += 1
        if name == CACHE_CONFIG:
            capacity = _kv_capacity_tokens(labels)
            if capacity is not None:
                kv_capacity_tokens = (kv_capacity_tokens or 0) + capacity
            continue
        series = _series_name(name)
        if series is None or math.isnan(value):
            continue
        sums[series] = sums.get(series, 0.0) + value
        engines.setdefault(series, set()).add(labels)
    if samples == 0:
        raise ScrapeParseError("no samples in the metrics text")
    kv_name = KV_USAGE if KV_USAGE in sums else KV_USAGE_OLD
    kv_usage = None
    if kv_name in sums:
        kv_usage = min(1.0, max(0.0, sums[kv_name] / max(1, len(engines[kv_name]))))

    def count(series: str) -> int | None:
        return max(0, round(sums[series])) if series in sums else None

    return EngineStats(
        running=count(RUNNING),
        waiting=count(WAITING),
        kv_usage=kv_usage,
        prefix_cache_queries=sums.get(PREFIX_QUERIES),
        prefix_cache_hits=sums.get(PREFIX_HITS),
        engines=max((len(series) for series in engines.values()), default=0),
        kv_capacity_tokens=kv_capacity_tokens,
    )


def _kv_capacity_tokens(labels: str) -> int | None:
    """num_gpu_blocks x block_size from `vllm:cache_config_info`'s labels; None when either
    is missing or not a positive integer (vLLM writes "None" before the cache is sized)."""
    values: dict[str, str] = {}
    for part in labels.split('",'):
        key, sep, value = part.partition('="')
        if sep:
            values[key.strip().lstrip(",")] = value.rstrip('"')
    try:
        blocks = int(values["num_gpu_blocks"])
        block_size = int(values["block_size"])
    except (KeyError, ValueError):
        return None
    if blocks <= 0 or block_size <= 0:
        return None
    return blocks * block_size


@dataclass(slots=True)
class EndpointHealth:
    """Consecutive outcomes of one endpoint's checks, for hysteresis."""

    healthy: bool = True
    failures: int = 0
    successes: int = 0
    last_stats: EngineStats | None = None
    last_error: str = ""


@dataclass(frozen=True, slots=True)
class ScrapeSettings:
    interval_s: float = 1.0
    timeout_s: float = 0.8
    unhealthy_after: int = 3
    healthy_after: int = 2
    check_health: bool = True


class ScrapeListener:
    """What the scraper tells telemetry; the defaults do nothing."""

    def scraped(self, endpoint_id: str, stats: EngineStats) -> None:
        return None

    def scrape_failed(self, endpoint_id: str, kind: str) -> None:
        return None

    def health_changed(self, endpoint_id: str, *, healthy: bool) -> None:
        return None


@dataclass(slots=True)
class Scraper:
    """Polls every endpoint the core knows; one task per round, all endpoints concurrently."""

    core: SchedulerCore
    session: aiohttp.ClientSession
    clock: Callable[[], float]
    settings: ScrapeSettings = field(default_factory=ScrapeSettings)
    listener: ScrapeListener = field(default_factory=ScrapeListener)
    health: dict[str, EndpointHealth] = field(default_factory=dict)

    async def run(self) -> None:
        """Scrape forever, every `interval_s`; cancel to stop."""
        while True:
            await self.scrape_once()
            await asyncio.sleep(self.settings.interval_s)

    async def scrape_once(self) -> None:
        endpoints = list(self.core.endpoints.values())
        for gone in set(self.health) - {e.id for e in endpoints}:
            del self.health[gone]
        await asyncio.gather(*(self._scrape(endpoint) for endpoint in endpoints))

    async def _scrape(self, endpoint: Endpoint) -> None:
        base = endpoint.address if "://" in endpoint.address else f"http://{endpoint.address}"
        timeout = aiohttp.ClientTimeout(total=self.settings.timeout_s)
        state = self.health.setdefault(endpoint.id, EndpointHealth())
        try:
            if self.settings.check_health:
                async with self.session.get(f"{base}/health", timeout=timeout) as response:
                    if response.status >= 400:
                        raise _CheckFailed("health", f"/health answered {response.status}")
            async with self.session.get(f"{base}/metrics", timeout=timeout) as response:
                if response.status >= 400:
                    raise _CheckFailed("http", f"/metrics answered {response.status}")
                text = await response.text()
        except _CheckFailed as failure:
            self._failed(endpoint.id, state, failure.kind, failure.message)
            return
        except (aiohttp.ClientError, TimeoutError, OSError) as error:
            self._failed(endpoint.id, state, "connection", f"{type(error).__name__}: {error}")
            return
        try:
            stats = parse_vllm_metrics(text)
        except ScrapeParseError as error:
            # The engine answers, so it stays routable; only its figures are unknown.
            state.last_error = str(error)
            self.listener.scrape_failed(endpoint.id, "parse")
            logger.warning("unreadable /metrics from %s: %s", endpoint.id, error)
            self._succeeded(endpoint.id, state)
            return
        state.last_stats = stats
        state.last_error = ""
        self.core.update_scrape(
            endpoint.id,
            running=stats.running,
            queued=stats.waiting,
            kv_usage=stats.kv_usage,
            now=self.clock(),
        )
        if stats.kv_capacity_tokens is not None:
            self.core.set_kv_capacity(endpoint.id, tokens=stats.kv_capacity_tokens)
        self.listener.scraped(endpoint.id, stats)
        self._succeeded(endpoint.id, state)

    def _failed(self, endpoint_id: str, state: EndpointHealth, kind: str, message: str) -> None:
        state.failures += 1
        state.successes = 0
        state.last_error = message
        self.listener.scrape_failed(endpoint_id, kind)
        if state.healthy and state.failures >= self.settings.unhealthy_after:
            state.healthy = False
            self.core.set_health(endpoint_id, healthy=False)
            self.listener.health_changed(endpoint_id, healthy=False)
            logger.warning("endpoint %s leaves routing: %s", endpoint_id, message)

    def _succeeded(self, endpoint_id: str, state: EndpointHealth) -> None:
        state.successes += 1
        state.failures = 0
        if not state.healthy and state.successes >= self.settings.healthy_after:
            state.healthy = True
            self.core.set_health(endpoint_id, healthy=True)
            self.listener.health_changed(endpoint_id, healthy=True)
            logger.warning("endpoint %s recovered and rejoins routing", endpoint_id)


class _CheckFailed(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
