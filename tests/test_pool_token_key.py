"""The operator's pool-token key: made once in a Secret, read back on every later start."""

from __future__ import annotations

import base64

import pytest
from kubernetes import client
from twinroute.operator.pool_token_key import PoolTokenKeyError, ensure_pool_token_key

from twinroute.testing.kube import api_server_in_thread

NS, NAME = "twinroute-system", "twinroute-pool-token-key"


def test_the_key_is_made_once_and_kept() -> None:
    with api_server_in_thread() as server:
        api = client.ApiClient(client.Configuration(host=server.url))
        first = ensure_pool_token_key(api, namespace=NS, name=NAME)
        assert len(first) >= 48
        assert ensure_pool_token_key(api, namespace=NS, name=NAME) == first
        stored = server.api.stored("v1/secrets", NS, NAME) or {}
        assert base64.b64decode(stored["data"]["key"]) == first
        # Another cluster (another server): another key.
    with api_server_in_thread() as other:
        api = client.ApiClient(client.Configuration(host=other.url))
        assert ensure_pool_token_key(api, namespace=NS, name=NAME) != first


@pytest.mark.parametrize("data", [{}, {"key": base64.b64encode(b"short").decode()}, {"key": "*"}])
def test_an_unusable_key_is_a_clear_error_not_a_new_key(data: dict[str, str]) -> None:
    """Replacing a key silently would change every pool's token under running pods."""
    with api_server_in_thread() as server:
        server.api.put_object(
            "v1/secrets",
            {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "data": data,
             "metadata": {"name": NAME, "namespace": NS}},
        )  # fmt: skip
        api = client.ApiClient(client.Configuration(host=server.url))
        with pytest.raises(PoolTokenKeyError, match="delete it to have a new key made"):
            ensure_pool_token_key(api, namespace=NS, name=NAME)
