"""A fixed endpoint list: from a flag (`[ID=]HOST:PORT,...`) or a YAML file.

YAML file format (unknown keys are refused, so a typo cannot silently drop an endpoint):

    endpoints:
      - id: engine-0            # optional; defaults to the address
        address: 127.0.0.1:8001
        role: unified           # unified (default), prefill or decode
        model: tiny-llama       # optional; defaults to --model
        labels: {zone: a}       # optional
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from twinroute.scheduler.types import Endpoint, Role

_FIELDS = frozenset({"id", "address", "role", "model", "labels"})


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
