"""Label and annotation keys shared by the operator and the scheduler.

The operator writes these onto every object it creates; the scheduler's Kubernetes discovery
selects engine pods by them. Both import this module, never each other.
"""

from __future__ import annotations

from typing import Final

API_GROUP: Final = "twinroute.io"
API_VERSION: Final = "v1alpha1"
MODELPOOL_KIND: Final = "ModelPool"
MODELPOOL_PLURAL: Final = "modelpools"

# Labels on every child object and on the pods of every Deployment the operator renders.
POOL_LABEL: Final = "twinroute.io/pool"
# "unified", "prefill", "decode" for engines; "scheduler" for the scheduler/router pods.
ROLE_LABEL: Final = "twinroute.io/role"
# The served model name, sanitised into a label value (see `model_label_value`).
MODEL_LABEL: Final = "twinroute.io/model"
COMPONENT_LABEL: Final = "app.kubernetes.io/component"
MANAGED_BY_LABEL: Final = "app.kubernetes.io/managed-by"
MANAGED_BY_VALUE: Final = "twinroute-operator"
SCHEDULER_ROLE: Final = "scheduler"
# The pods of a pool's own Envoy gateway (`gateway.kind: envoy`).
GATEWAY_ROLE: Final = "gateway"

# Annotations on engine pods: where the OpenAI API and the metrics are served.
ENGINE_PORT_ANNOTATION: Final = "twinroute.io/engine-port"
# The served model name verbatim (label values cannot carry every model name).
SERVED_MODEL_ANNOTATION: Final = "twinroute.io/served-model"

# Container port names the operator uses; discovery and drain look ports up by name.
ENGINE_PORT_NAME: Final = "http"
SCHEDULER_GRPC_PORT_NAME: Final = "grpc"
ROUTER_HTTP_PORT_NAME: Final = "http"
SCHEDULER_METRICS_PORT_NAME: Final = "metrics"
# The scheduler's endpoint picker (Envoy external processing, the GIE protocol).
SCHEDULER_PICKER_PORT_NAME: Final = "picker"


def model_label_value(model: str) -> str:
    """A label value for a served model name: at most 63 characters of [A-Za-z0-9._-],
    starting and ending alphanumeric ("meta-llama/Llama-3-8B" -> "meta-llama.Llama-3-8B")."""
    cleaned = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "." for c in model)
    cleaned = cleaned[:63].strip("._-")
    return cleaned or "unnamed"
