# Each target bootstraps .venv itself (idempotent; quick when nothing changed): `make demo`
# installs the package with what the demo needs; the other targets add the dev tools.
.PHONY: demo test lint typecheck proto bench venv venv-demo clean

venv:
	@bash .ci/bootstrap dev

venv-demo:
	@bash .ci/bootstrap demo

demo: venv-demo
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

# Removes all that the project makes here: build/ and dist/, .venv, the caches (.pytest_cache
# .mypy_cache .ruff_cache .hypothesis .import_linter_cache, __pycache__), the package's
# *.egg-info (at the root and under src/), .tools/ (kubectl and Helm, the vLLM and peers venvs,
# the tiny test models, logs) and results/ (benchmark and demo output).
clean:
	rm -rf build dist .venv .pytest_cache .mypy_cache .ruff_cache .hypothesis \
		.import_linter_cache .tools results *.egg-info
	find src -name '*.egg-info' -prune -exec rm -rf {} +
	find . -path ./.git -prune -o -name __pycache__ -prune -exec rm -rf {} +
