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

# Most of the suite's wall time is spent waiting on real ssh, sshd and swtpm processes, so
# TEST_WORKERS pytest processes (pytest-xdist) share it; each test file goes whole to one
# worker (loadfile), so a module's shared servers start once. The floods come after, alone:
# the sockets they churn must not disturb other tests' servers (tests/conftest.py).
TEST_WORKERS ?= 3

test: setup lint
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile -m "not flood"
	$(PY) -m pytest -q -p no:cacheprovider -m flood

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
