# Each target bootstraps .venv itself (idempotent; quick when nothing changed).
.PHONY: demo test lint typecheck proto bench venv clean

venv:
	@bash .ci/bootstrap

demo: venv
	.venv/bin/twinroute demo

test: venv
	.venv/bin/pytest -q tests

lint: venv
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/python tools/gen_proto.py --check
	.venv/bin/lint-imports
	$(MAKE) typecheck

typecheck: venv
	.venv/bin/mypy -p twinroute

proto: venv
	.venv/bin/python tools/gen_proto.py

clean:
	rm -rf build dist .venv .pytest_cache .mypy_cache .ruff_cache
