# Each target bootstraps .venv itself (idempotent; quick when nothing changed).
.PHONY: demo test lint typecheck proto bench venv clean

venv:
	@bash .ci/bootstrap

demo: venv
	.venv/bin/twinroute demo

# tests/ needs nothing but this machine; e2e/ adds whole-process scenarios (a local cluster
# stand-in always; real vLLM engines when CI=true or TWINROUTE_E2E_VLLM=1, installing vLLM's
# CPU build into .tools/ on first use; a real cluster when TWINROUTE_E2E_CONTEXT is set).
test: venv
	.venv/bin/pytest -q tests e2e

lint: venv
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/python tools/gen_proto.py --check
	.venv/bin/lint-imports
	$(MAKE) typecheck

typecheck: venv
	.venv/bin/mypy -p twinroute
	MYPYPATH=e2e .venv/bin/mypy --strict e2e/local_cluster.py e2e/test_local_cluster.py \
		e2e/test_vllm_routing.py e2e/test_vllm_real.py e2e/vllm_real.py e2e/test_real_cluster.py \
		e2e/test_local_pd.py e2e/test_bench_vllm.py

proto: venv
	.venv/bin/python tools/gen_proto.py

clean:
	rm -rf build dist .venv .pytest_cache .mypy_cache .ruff_cache
