"""Fixtures shared by the tests: the real vLLM's interpreter, for the parity checks that run
vLLM's own code.

Where the real-vLLM scenarios run (CI, or TWINROUTE_E2E_VLLM=1) a missing vLLM is installed
here, as `e2e/` would install it a few minutes later anyway, so the checks never skip in CI;
elsewhere they skip with the reason.
"""

from __future__ import annotations

import pathlib

import pytest

from twinroute.bench.vllm_engines import (
    CHECKOUT,
    ensure_vllm_installed,
    real_vllm_enabled,
    vllm_installed,
    vllm_python,
)


@pytest.fixture(scope="session")
def vllm_venv_python() -> pathlib.Path:
    if not vllm_installed():
        if not real_vllm_enabled():
            pytest.skip(
                f"no vLLM at {vllm_python()} (TWINROUTE_E2E_VLLM=1 installs it): "
                "cannot run vLLM's own code"
            )
        ensure_vllm_installed(log_path=CHECKOUT / ".tools" / "logs" / "vllm-install.log")
    return vllm_python()
