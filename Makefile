# The two commands of the README: `make demo` (main job) and `make test` (test suite).
.PHONY: setup demo lint test bench cluster-up cluster-down

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/c2seg demo

lint: setup
	.venv/bin/ruff check .
	.venv/bin/mypy

test: setup lint
	bash scripts/run_tests.sh

bench: setup
	.venv/bin/python benchmarks/run_all.py
