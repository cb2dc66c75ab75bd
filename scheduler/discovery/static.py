"""A fixed endpoint list from a flag (`[ID=]HOST:PORT,...`), or a YAML file re-read when it
changes (`WatchedFileSource`: edit the file to scale the pool without Kubernetes).

YAML file format (unknown keys are refused, so a typo cannot silently drop an endpoint):

    endpoints:
      - id: engine-0            # optional; defaults to the address
        address: 127.0.0.1:8001
        role: unified           # unified (default), prefill or decode
        model: tiny-llama       # optional; defaults to --model
        labels: {zone: a}       # optional
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from twinroute.scheduler.types import Endpoint, Role

_FIELDS = frozenset({"id", "address", "role", "model", "labels"})

logger = logging.getLogger(__name__)


def _check_address(address: str, *, what: str) -> str:
    address = address.strip().removeprefix("http://").rstrip("/")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{what}: address {address!r} is not HOST:PORT")
    return address


def parse_endpoint_list(spec: str, *, model: str = "") -> tuple[Endpoint, ...]:
    """`a=127.0.0.1:8001,127.0.0.1:8002` -> endpoints `a` and `127.0.0.1:8002`."""
    endpoints: list[Endpoint] = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        endpoint_id, _, address = item.rpartition("=")
        address = _check_address(address, what=f"endpoint {item!r}")
        endpoints.append(Endpoint(id=endpoint_id or address, address=address, model=model))
    return _unique(endpoints)


def _unique(endpoints: Sequence[Endpoint]) -> tuple[Endpoint, ...]:
    seen: set[str] = set()
    for endpoint in endpoints:
        if endpoint.id in seen:
            raise ValueError(f"endpoint id {endpoint.id!r} appears twice")
        seen.add(endpoint.id)
    return tuple(endpoints)


def endpoints_from_yaml(
    document: Any, *, model: str = "", origin: str = ""
) -> tuple[Endpoint, ...]:
    if not isinstance(document, Mapping) or not isinstance(document.get("endpoints"), list):
        raise ValueError(f"{origin}: expected a mapping with an 'endpoints' list")
    endpoints: list[Endpoint] = []
    for index, item in enumerate(document["endpoints"]):
        where = f"{origin}: endpoints[{index}]"
        if not isinstance(item, Mapping):
            raise ValueError(f"{where} must be a mapping")
        unknown = set(item) - _FIELDS
        if unknown:
            raise ValueError(f"{where} has unknown keys {sorted(unknown)}")
        if "address" not in item:
            raise ValueError(f"{where} needs an address")
        address = _check_address(str(item["address"]), what=where)
        try:
            role = Role(str(item.get("role", "unified")))
        except ValueError:
            raise ValueError(
                f"{where}: role {item.get('role')!r} is not one of {[r.value for r in Role]}"
            ) from None
        labels = item.get("labels") or {}
        if not isinstance(labels, Mapping):
            raise ValueError(f"{where}: labels must be a mapping")
        endpoints.append(
            Endpoint(
                id=str(item.get("id") or address),
                address=address,
                role=role,
                model=str(item.get("model") or model),
                labels={str(k): str(v) for k, v in labels.items()},
            )
        )
    return _unique(endpoints)


def load_endpoints_file(path: str | Path, *, model: str = "") -> tuple[Endpoint, ...]:
    text = Path(path).read_text(encoding="utf-8")
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML: {error}") from None
    return endpoints_from_yaml(document, model=model, origin=str(path))


class StaticSource:
    """One snapshot, then the source ends."""

    def __init__(self, *, endpoints: Sequence[Endpoint]) -> None:
        self._endpoints = _unique(endpoints)

    async def snapshots(self) -> AsyncIterator[tuple[Endpoint, ...]]:
        yield self._endpoints


class WatchedFileSource:
    """The endpoints of a YAML file: one snapshot at once, then one each time its content
    changes (polled every `interval_s`; write the file by rename for an atomic swap).

    The file is validated when the source is built, so a bad file stops the scheduler at
    start. Later, a file that cannot be read or is not valid keeps the last good snapshot in
    force and is reported once per distinct content: an editing mistake never empties the
    pool.
    """

    def __init__(
        self,
        *,
        path: str | Path,
        model: str = "",
        interval_s: float = 1.0,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self._path = Path(path)
        self._model = model
        self._interval_s = interval_s
        self._sleep = sleep
        self._text = self._path.read_text(encoding="utf-8")
        self._endpoints = self._parse(self._text)

    def _parse(self, text: str) -> tuple[Endpoint, ...]:
        try:
            document = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ValueError(f"{self._path}: not valid YAML: {error}") from None
        return endpoints_from_yaml(document, model=self._model, origin=str(self._path))

    async def snapshots(self) -> AsyncIterator[tuple[Endpoint, ...]]:
        yield self._endpoints
        seen: str | None = self._text
        while True:
            await self._sleep(self._interval_s)
            try:
                text = self._path.read_text(encoding="utf-8")
            except OSError as error:
                if seen is not None:
                    logger.error("endpoints file unreadable, keeping the last list: %s", error)
                seen = None
                continue
            if text == seen:
                continue
            seen = text
            try:
                endpoints = self._parse(text)
            except ValueError as error:
                logger.error("endpoints file rejected, keeping the last list: %s", error)
                continue
            if endpoints != self._endpoints:
                self._endpoints = endpoints
                logger.info("endpoints file changed: %d endpoint(s)", len(endpoints))
                yield endpoints
