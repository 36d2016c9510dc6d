# The two commands a new machine needs: `make demo` and `make test`.
# Each first runs scripts/setup.sh, which installs whatever is missing.
PY := .venv/bin/python

.PHONY: setup demo test lint unit bench clean

setup:
	@./scripts/setup.sh

demo: setup
	$(PY) scripts/demo.py $(DEMO_ARGS)

lint: setup
	$(PY) -m ruff check bastion client tests scripts bench
	.venv/bin/lint-imports --no-cache
	$(PY) -m bandit -q -c pyproject.toml -r bastion client
	$(PY) -m mypy

test: setup lint
	$(PY) -m pytest -q -p no:cacheprovider

unit: setup
	$(PY) -m pytest -q -m "not integration"

bench: setup
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf .venv demo-state .pytest_cache

# The deployed shape for --minutes (default 3) with locks every 20 s; not part of CI.
.PHONY: soak
soak: setup
	$(PY) -m bench.soak $(SOAK_ARGS)
