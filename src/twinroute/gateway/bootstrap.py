"""Envoy's bootstrap for a twinroute gateway: Envoy carries the bytes, the picker chooses.

One renderer for every place Envoy runs (`twinroute gateway` on a laptop, the operator's Envoy
Deployment on Kubernetes), so what the tests exercise is what a cluster runs:

- a listener whose HTTP connection manager runs the `ext_proc` filter (the endpoint picker, a
  gRPC service on an HTTP/2 cluster) and then the router;
- the pool's cluster under `envoy.load_balancing_policies.override_host`: Envoy sends each
  request to the first address of the picker's `x-gateway-destination-endpoint` list and, on a
  retry, to the next (DualMap's other candidate), round robin only when the picker was not
  asked (fail-open, or the paths that need no pick);
- retries before a response started (connection refused or reset, a 5xx), never after: Envoy
  does not retry once it has passed response headers on to the client;
- the endpoint that served echoed to the picker (`x-gateway-destination-endpoint-served`), so
  the lease follows a retry; an access log; admin on 127.0.0.1 only.

Processing modes (`PROCESSING`): `lean` (default) sends the request headers and the buffered
body, two messages, the fewest that route; each request's end reaches the picker as an entry of
Envoy's gRPC access log (batched), which names the endpoint that served and closes the lease.
The first token is not seen at all: the scheduler drains the prefill at its predicted TTFT.
`full` also sends the response headers and streams the response body to the picker (exact first
token and usage; one message per chunk). `gie` is the shape GIE gateways use (full duplex both
ways); the picker serves all three.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

Processing = Literal["lean", "full", "gie"]
PROCESSING: Final[tuple[Processing, ...]] = ("lean", "full", "gie")
FailureMode = Literal["FailOpen", "FailClose"]
FAILURE_MODES: Final[tuple[FailureMode, ...]] = ("FailOpen", "FailClose")
INFERENCE_PATHS: Final = ("/v1/completions", "/v1/chat/completions")

# The headers the picker reads (`twinroute.scheduler.picker`: the request's path, length, id
# and SLO; the response's status and the endpoint that served). Envoy sends only these in the
# lean and full modes: every header it sends costs it and the picker a field to write and
# read (11 for a plain completion). `gie` sends them all, as a GIE gateway would.
PICKER_READS_HEADERS: Final = (
    ":path",
    "content-length",
    "x-request-id",
    "x-twinroute-ttft-slo-s",
    ":status",
    "x-gateway-destination-endpoint-served",
)
# The listener clients connect to; `twinroute gateway` asks the admin for its bound port by it.
LISTENER_NAME: Final = "gateway"
_EXT_PROC = "envoy.filters.http.ext_proc"
_TYPES = "type.googleapis.com/envoy."


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where the pool's engines are: static `HOST:PORT`s (IP addresses: the picker names
    endpoints by address) or a DNS name whose A records are the engines (a headless
    Service), with their port."""

    addresses: tuple[str, ...] = ()
    dns_name: str = ""
    dns_port: int = 8000

    def __post_init__(self) -> None:
        if bool(self.addresses) == bool(self.dns_name):
            raise ValueError("give the engines' addresses or a DNS name, not both or neither")


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    upstream: Upstream
    picker_address: str
    listen_host: str = "127.0.0.1"
    listen_port: int = 8080
    admin_port: int = 0
    processing: Processing = "lean"
    failure_mode: FailureMode = "FailClose"
    # Fallbacks tried after the primary, before any response started.
    retries: int = 1
    max_body_bytes: int = 16 * 1024 * 1024
    connect_timeout_s: float = 2.0
    # Per attempt: until the response starts (a stream's first byte), then between chunks.
    first_byte_timeout_s: float = 60.0
    idle_timeout_s: float = 60.0
    # One picker message may take this long (a pick, plus tokenizing a long prompt).
    picker_timeout_s: float = 5.0
    access_log: str = "/dev/stdout"

    def __post_init__(self) -> None:
        if self.processing not in PROCESSING:
            raise ValueError(f"processing must be one of {PROCESSING}, got {self.processing!r}")
        if self.failure_mode not in FAILURE_MODES:
            raise ValueError(f"failure mode must be one of {FAILURE_MODES}")
        if self.retries < 0:
            raise ValueError("retries must not be negative")
        host, _, port = self.picker_address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"picker address {self.picker_address!r} is not HOST:PORT")


def _duration(seconds: float) -> str:
    return f"{seconds:.3f}s"


def _socket(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def processing_mode(processing: Processing) -> dict[str, str]:
    if processing == "gie":
        return {
            "request_header_mode": "SEND",
            "request_body_mode": "FULL_DUPLEX_STREAMED",
            "request_trailer_mode": "SEND",
            "response_header_mode": "SEND",
            "response_body_mode": "FULL_DUPLEX_STREAMED",
            "response_trailer_mode": "SEND",
        }
    return {
        "request_header_mode": "SEND",
        "request_body_mode": "BUFFERED",
        "request_trailer_mode": "SKIP",
        # Lean: no response phase at all; the access log reports each request's end.
        "response_header_mode": "SKIP" if processing == "lean" else "SEND",
        "response_body_mode": "STREAMED" if processing == "full" else "NONE",
        "response_trailer_mode": "SKIP",
    }


def _pool_cluster(config: GatewayConfig) -> dict[str, Any]:
    upstream = config.upstream
    if upstream.addresses:
        endpoints = [{"endpoint": {"address": _socket(*_split(a))}} for a in upstream.addresses]
        discovery = "STATIC"
    else:
        endpoints = [{"endpoint": {"address": _socket(upstream.dns_name, upstream.dns_port)}}]
        discovery = "STRICT_DNS"
    cluster: dict[str, Any] = {
        "name": "pool",
        "type": discovery,
        "connect_timeout": _duration(config.connect_timeout_s),
        "load_assignment": {"cluster_name": "pool", "endpoints": [{"lb_endpoints": endpoints}]},
        "load_balancing_policy": {
            "policies": [
                {
                    "typed_extension_config": {
                        "name": "envoy.load_balancing_policies.override_host",
                        "typed_config": {
                            "@type": _TYPES + "extensions.load_balancing_policies.override_host"
                            ".v3.OverrideHost",
                            "override_host_sources": [
                                {"header": "x-gateway-destination-endpoint"},
                                {
                                    "metadata": {
                                        "key": "envoy.lb",
                                        "path": [{"key": "x-gateway-destination-endpoint"}],
                                    }
                                },
                            ],
                            "fallback_policy": {
                                "policies": [
                                    {
                                        "typed_extension_config": {
                                            "name": "envoy.load_balancing_policies.round_robin",
                                            "typed_config": {
                                                "@type": _TYPES
                                                + "extensions.load_balancing_policies"
                                                ".round_robin.v3.RoundRobin"
                                            },
                                        }
                                    }
                                ]
                            },
                        },
                    }
                }
            ]
        },
        # Many concurrent streams per engine: no circuit breaker below the engines' own limit.
        "circuit_breakers": {
            "thresholds": [
                {
                    "max_connections": 100_000,
                    "max_pending_requests": 100_000,
                    "max_requests": 100_000,
                    "max_retries": 10_000,
                }
            ]
        },
    }
    if discovery == "STRICT_DNS":
        # A headless Service: every A record is an engine; follow scale-out within seconds.
        cluster["dns_refresh_rate"] = "2s"
        cluster["respect_dns_ttl"] = False
    return cluster


def _picker_cluster(config: GatewayConfig) -> dict[str, Any]:
    host, port = _split(config.picker_address)
    return {
        "name": "picker",
        "type": "STATIC" if _is_ip(host) else "STRICT_DNS",
        "connect_timeout": _duration(config.connect_timeout_s),
        "load_assignment": {
            "cluster_name": "picker",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket(host, port)}}]}],
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _TYPES + "extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "circuit_breakers": {
            "thresholds": [
                {"max_connections": 1024, "max_pending_requests": 100_000, "max_requests": 100_000}
            ]
        },
    }


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _route(config: GatewayConfig, *, picked: bool, prefix: str) -> dict[str, Any]:
    route: dict[str, Any] = {
        "cluster": "pool",
        # No limit on a whole response: a stream may run as long as it keeps sending.
        "timeout": "0s",
        "idle_timeout": _duration(config.idle_timeout_s),
    }
    if picked:
        route["retry_policy"] = {
            # Only failures before the response started: Envoy never retries once it has
            # passed the response headers on, so a started stream is never sent twice.
            "retry_on": "connect-failure,refused-stream,reset,5xx",
            "num_retries": config.retries,
            "per_try_idle_timeout": _duration(config.first_byte_timeout_s),
            "retry_back_off": {"base_interval": "0.005s", "max_interval": "0.05s"},
        }
    entry: dict[str, Any] = {"match": {"prefix": prefix}, "route": route}
    if picked:
        # The endpoint that served, for the picker (so the lease follows a retry) and the
        # client; and the pick as the picker named it on the request (a picker that sees the
        # response replaces both with the id of the endpoint that served).
        entry["response_headers_to_add"] = [
            {"header": {"key": key, "value": value},
             "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
            for key, value in (
                ("x-gateway-destination-endpoint-served", "%UPSTREAM_REMOTE_ADDRESS%"),
                ("x-twinroute-endpoint", "%REQ(x-twinroute-endpoint)%"),
                ("x-twinroute-reason", "%REQ(x-twinroute-reason)%"),
            )
        ]  # fmt: skip
    else:
        entry["typed_per_filter_config"] = {
            _EXT_PROC: {
                "@type": _TYPES + "extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
                "disabled": True,
            }
        }
    return entry


def _request_end_log(config: GatewayConfig) -> list[dict[str, Any]]:
    """Lean mode: each finished request goes to the picker's access-log service (batched),
    which closes its lease; the other modes show the picker the response itself."""
    if config.processing != "lean":
        return []
    return [
        {
            "name": "envoy.access_loggers.http_grpc",
            "filter": {"header_filter": {"header": {
                "name": "x-twinroute-endpoint", "present_match": True
            }}},
            "typed_config": {
                "@type": _TYPES + "extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
                "common_config": {
                    "log_name": "twinroute_request_ends",
                    "grpc_service": {"envoy_grpc": {"cluster_name": "picker"}},
                    "transport_api_version": "V3",
                    # A lease closes at most this late; one message carries many requests.
                    # The flush timer runs whether or not anything ended: every 5 ms it kept
                    # an idle Envoy at 1.9% of a core, every 20 ms at 0.5%.
                    "buffer_flush_interval": "0.02s",
                    "buffer_size_bytes": 16_384,
                },
            },
        }
    ]  # fmt: skip


def render_bootstrap(config: GatewayConfig) -> dict[str, Any]:
    """The Envoy bootstrap (as a dict; `yaml.safe_dump` it) for `config`."""
    routes = [_route(config, picked=True, prefix=path) for path in INFERENCE_PATHS]
    # Everything else (/v1/models, /health, /metrics) goes to any engine, unpicked.
    routes.append(_route(config, picked=False, prefix="/"))
    access_log_format = (
        '[%START_TIME%] "%REQ(:METHOD)% %REQ(:PATH)%" %RESPONSE_CODE% %RESPONSE_FLAGS% '
        "upstream=%UPSTREAM_HOST% attempts=%UPSTREAM_REQUEST_ATTEMPT_COUNT% "
        "duration_ms=%DURATION% first_byte_ms=%RESPONSE_DURATION% id=%REQ(X-REQUEST-ID)%\n"
    )
    ext_proc = {
        "@type": _TYPES + "extensions.filters.http.ext_proc.v3.ExternalProcessor",
        "grpc_service": {
            "envoy_grpc": {"cluster_name": "picker"},
            "timeout": _duration(config.picker_timeout_s),
            # Lean: the stream ends before the request; its end comes in the access log (the
            # picker's `END_REPORT_METADATA`).
            **(
                {"initial_metadata": [{"key": "x-twinroute-request-ends", "value": "access-log"}]}
                if config.processing == "lean"
                else {}
            ),
        },
        "processing_mode": processing_mode(config.processing),
        "message_timeout": _duration(config.picker_timeout_s),
        # FailOpen: a picker that is down or slow is skipped and the pool's round robin
        # routes; FailClose: the client gets a 5xx at once.
        "failure_mode_allow": config.failure_mode == "FailOpen",
        # What FailClose answers when the picker fails: the pool is unavailable, not broken.
        "status_on_error": {"code": 503},
        "metadata_options": {"forwarding_namespaces": {"untyped": ["envoy.lb.subset_hint"]}},
        "mutation_rules": {"allow_all_routing": True},
    }
    if config.processing != "gie":
        ext_proc["forward_rules"] = {
            "allowed_headers": {"patterns": [{"exact": name} for name in PICKER_READS_HEADERS]}
        }
    connection_manager = {
        "@type": _TYPES + "extensions.filters.network.http_connection_manager.v3"
        ".HttpConnectionManager",
        "stat_prefix": "twinroute_gateway",
        "codec_type": "AUTO",
        "normalize_path": True,
        "route_config": {
            "name": "pool",
            "virtual_hosts": [{"name": "pool", "domains": ["*"], "routes": routes}],
        },
        "http_filters": [
            {"name": _EXT_PROC, "typed_config": ext_proc},
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": _TYPES + "extensions.filters.http.router.v3.Router"},
            },
        ],
        # Edge: Envoy assigns every request its own x-request-id (the access log's key).
        "use_remote_address": True,
        "access_log": [
            *_request_end_log(config),
            {
                "name": "envoy.access_loggers.file",
                "typed_config": {
                    "@type": _TYPES + "extensions.access_loggers.file.v3.FileAccessLog",
                    "path": config.access_log,
                    "log_format": {"text_format_source": {"inline_string": access_log_format}},
                },
            },
        ],
    }
    return {
        "admin": {"address": _socket("127.0.0.1", config.admin_port)},
        "static_resources": {
            "listeners": [
                {
                    "name": LISTENER_NAME,
                    "address": _socket(config.listen_host, config.listen_port),
                    # The buffered request body is held up to this; a larger one is a 413.
                    "per_connection_buffer_limit_bytes": config.max_body_bytes,
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": connection_manager,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [_pool_cluster(config), _picker_cluster(config)],
        },
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": _TYPES + "extensions.resource_monitors.downstream_connections"
                        ".v3.DownstreamConnectionsConfig",
                        "max_active_downstream_connections": 50_000,
                    },
                }
            ]
        },
    }


def addresses_of(endpoints: Sequence[tuple[str, str]]) -> tuple[str, ...]:
    """The addresses of `(id, HOST:PORT)` pairs, checked to be IP addresses (Envoy's
    override-host policy matches the picker's answer against its hosts' IPs)."""
    addresses = []
    for endpoint_id, address in endpoints:
        host, _ = _split(address)
        if not _is_ip(host):
            raise ValueError(
                f"endpoint {endpoint_id} is at {address}: the gateway needs IP addresses "
                "(the picker names endpoints by IP:PORT); use 127.0.0.1, not localhost"
            )
        addresses.append(address)
    return tuple(addresses)
