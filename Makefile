# One entry point for a new machine: `make demo` and `make test` create the virtualenv,
# install everything from this repository's own files, then run.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
DEPS_STAMP := $(VENV)/.deps-installed

.PHONY: install demo serve test test-python test-elixir elixir-check lint format bench bench-smoke bench-elixir bench-ingest clean

$(DEPS_STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt ".[server,dev,perf]"
	touch $@

# Our own code is installed non-editable (the folders map onto one namespace, uro_recs),
# so every target refreshes it.
install: $(DEPS_STAMP)
	$(BIN)/python -m pip install -q --no-deps --force-reinstall . 2>&1 | grep -v -i warning || true

demo: install
	$(BIN)/uro-recs demo --once

serve: install
	$(BIN)/uro-recs demo

lint: install elixir-check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy -p uro_recs
	$(BIN)/mypy tests perf
	cd sdk/elixir && mix format --check-formatted && mix compile --warnings-as-errors

test: lint test-python test-elixir

test-python: install
	$(BIN)/python -m pytest -ra

# The Elixir client (sdk/elixir): pure Elixir, no Hex packages. Its live ZMTP tests speak to a
# broker that tests/with_broker.py starts for them; its integration tests train models and run
# the broker and workers through the CLI of the Python named by URO_RECS_PYTHON.
test-elixir: install elixir-check
	URO_RECS_PYTHON=$(abspath $(BIN)/python) $(BIN)/python -m tests.with_broker sh -c 'cd sdk/elixir && mix test'

elixir-check:
	@command -v mix >/dev/null || { echo "mix not found: install Elixir (apt-get install -y elixir)" >&2; exit 1; }

# The full benchmark (about 20 minutes on 2 cores); results in perf/results/.
bench: install
	$(BIN)/python -m perf.bench

bench-smoke: install elixir-check
	$(BIN)/python -m perf.bench --smoke --out build/bench-smoke
	$(BIN)/python -m perf.ingest_bench --events 2000 --sizes 1,100
	$(BIN)/python -m perf.elixir_bench --smoke --json build/elixir-bench-smoke.json

# The Elixir client next to the Python SDK, taking turns on one broker (about 90 s).
bench-elixir: install elixir-check
	$(BIN)/python -m perf.elixir_bench --json build/elixir-bench.json

# Event ingest, straight into the database and through the broker (about a minute).
bench-ingest: install
	$(BIN)/python -m perf.ingest_bench --json build/ingest-bench.json

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) var build *.egg-info
