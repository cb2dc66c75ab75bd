"""The operator's key for pools' tokens: read from a Secret in its own namespace, made once.

Each pool's token is derived from this key (`render.derive_pool_token`), so the key must
outlive operator restarts and upgrades, and must not be baked into a chart or a manifest that
many clusters share. The operator therefore makes it itself, on its first start, in a Secret it
names (random, 48 bytes), and reads it back on every later start. Two operators starting at
once both try to create it: the loser of the race reads the winner's.
"""

from __future__ import annotations

import base64
import logging
import secrets

from kubernetes import client

from twinroute import labels

log = logging.getLogger(__name__)

KEY_FIELD = "key"


class PoolTokenKeyError(RuntimeError):
    """The key Secret exists but holds no usable key, or the API refused us."""


def ensure_pool_token_key(api_client: client.ApiClient, *, namespace: str, name: str) -> bytes:
    """The key in Secret `namespace/name`, creating the Secret with a fresh key if missing."""
    core = client.CoreV1Api(api_client)
    try:
        return _key_of(core.read_namespaced_secret(name, namespace), namespace, name)
    except client.ApiException as error:
        if error.status != 404:
            raise PoolTokenKeyError(
                f"cannot read Secret {namespace}/{name}: HTTP {error.status} {error.reason}"
            ) from None
    key = secrets.token_urlsafe(48).encode()
    body = client.V1Secret(
        metadata=client.V1ObjectMeta(
            name=name,
            namespace=namespace,
            labels={labels.MANAGED_BY_LABEL: labels.MANAGED_BY_VALUE},
        ),
        type="Opaque",
        data={KEY_FIELD: base64.b64encode(key).decode()},
    )
    try:
        core.create_namespaced_secret(namespace, body)
    except client.ApiException as error:
        if error.status != 409:
            raise PoolTokenKeyError(
                f"cannot create Secret {namespace}/{name}: HTTP {error.status} {error.reason}"
            ) from None
        # Another operator made it a moment ago: use theirs.
        return _key_of(core.read_namespaced_secret(name, namespace), namespace, name)
    log.info("Made the pool-token key in Secret %s/%s", namespace, name)
    return key


def _key_of(secret: client.V1Secret, namespace: str, name: str) -> bytes:
    encoded = (secret.data or {}).get(KEY_FIELD, "")
    try:
        key = base64.b64decode(encoded, validate=True).strip()
    except ValueError:
        key = b""
    if len(key) < 32:
        raise PoolTokenKeyError(
            f"Secret {namespace}/{name} has no usable '{KEY_FIELD}' (at least 32 bytes): delete "
            "it to have a new key made, which changes every pool's token"
        )
    return key
