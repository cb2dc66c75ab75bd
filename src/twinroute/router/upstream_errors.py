"""How the router words an engine's connection failure for the client.

Connection errors name the engine's host and port; the cluster's addresses are not the
client's business, so answers carry the kind of failure and the full text goes to the log.
"""

from __future__ import annotations

import asyncio

import aiohttp

from twinroute.router.engine_http import EngineConnectionError


def describe(error: BaseException) -> str:
    """The kind of failure, in words fit for a client answer."""
    if isinstance(error, EngineConnectionError):
        return error.kind
    if isinstance(error, aiohttp.ClientConnectorError):
        return "cannot connect"
    if isinstance(error, aiohttp.ServerDisconnectedError):
        return "disconnected"
    if isinstance(error, TimeoutError | asyncio.TimeoutError):
        return "timed out"
    return type(error).__name__
