"""Starting the servers a benchmark or an end-to-end test needs: a server that dies while
starting says why."""

from __future__ import annotations

import sys

import pytest

from twinroute.bench.processes import start_announced


async def test_a_server_that_exits_before_listening_shows_its_stderr() -> None:
    script = "import sys; sys.stderr.write('port 8080 already in use\\n'); sys.exit(3)"
    with pytest.raises(RuntimeError) as raised:
        await start_announced("doomed", [sys.executable, "-c", script], timeout_s=30)
    message = str(raised.value)
    assert "exited with status 3 before listening" in message
    assert "port 8080 already in use" in message


async def test_the_announcement_is_kept_whole() -> None:
    script = "print('thing listening on http://127.0.0.1:4321 (metrics http://127.0.0.1:99)')"
    server = await start_announced("announcer", [sys.executable, "-c", script], timeout_s=30)
    await server.stop()
    assert server.address == "127.0.0.1:4321"
    assert server.announcement.endswith("(metrics http://127.0.0.1:99)")
