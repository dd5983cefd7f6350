# One entry point for a new machine: `make demo` and `make test` create the virtualenv,
# install everything from this repository's own files, then run.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
DEPS_STAMP := $(VENV)/.deps-installed
# The packages of the uro_recs namespace, one per top-level folder (README, "Layout").
PACKAGES := core sdk broker worker pipeline app

.PHONY: install demo serve test layout-check test-python test-elixir elixir-check lint format bench bench-smoke bench-elixir bench-ingest clean

# The first time this takes minutes (TensorFlow, torch): pip names each package as it goes.
$(DEPS_STAMP): pyproject.toml constraints.txt
	@echo "== installing dependencies into $(VENV) (the first time takes several minutes)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	bash -o pipefail -c '$(BIN)/python -m pip install --progress-bar off -c constraints.txt \
		".[server,dev,perf]" | sed -n -u -E "/^(Collecting|Installing|Successfully|ERROR)/p"'
	touch $@

# Our own code is installed non-editable (the folders map onto one namespace, uro_recs),
# so every target refreshes it. setuptools builds in build/lib and would ship whatever an
# earlier build left there (a module since moved or deleted): start that build afresh.
install: $(DEPS_STAMP)
	rm -rf build/lib build/bdist.* uro_recs.egg-info
	mkdir -p build
	$(BIN)/python -m pip install -q --no-deps --force-reinstall . >build/pip.log 2>&1 || { cat build/pip.log; exit 1; }

demo: install
	$(BIN)/uro-recs demo --once

serve: install
	$(BIN)/uro-recs demo

lint: install elixir-check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy $(addprefix -p uro_recs.,$(PACKAGES))
	$(BIN)/mypy tests perf
	cd sdk/elixir && mix format --check-formatted && mix compile --warnings-as-errors

test: lint layout-check test-python test-elixir

# The package layout: no import cycle between packages (the graph: python -m tests.layout), and
# a base install (no extra) in which every module it promises imports.
layout-check: install
	$(BIN)/python -m tests.layout --check >/dev/null || $(BIN)/python -m tests.layout --check
	rm -rf build/base-venv && $(PYTHON) -m venv build/base-venv
	rm -rf build/lib build/bdist.* uro_recs.egg-info
	build/base-venv/bin/python -m pip install -q -c constraints.txt . >build/pip-base.log 2>&1 || { cat build/pip-base.log; exit 1; }
	build/base-venv/bin/python -m tests.layout --base-imports
	build/base-venv/bin/uro-recs --help >/dev/null
	cd build && base-venv/bin/uro-recs worker --model als 2>&1 | grep -q "install the 'server' extra"

test-python: install
	$(BIN)/python -m pytest -ra

# The Elixir client (sdk/elixir): pure Elixir, no Hex packages. Its live ZMTP tests speak to a
# broker that tests/with_broker.py starts for them; its integration tests train models and run
# the broker and workers through the CLI of the Python named by URO_RECS_PYTHON.
test-elixir: install elixir-check
	URO_RECS_PYTHON=$(abspath $(BIN)/python) $(BIN)/python -m tests.with_broker sh -c 'cd sdk/elixir && mix test'

elixir-check:
	@command -v mix >/dev/null || { echo "mix not found: install Elixir (apt-get install -y elixir)" >&2; exit 1; }

# The full benchmark (hours on 2 cores: 3 interleaved rounds of every system); results in
# perf/results/.
bench: install
	$(BIN)/python -m perf.bench

bench-smoke: install elixir-check
	$(BIN)/python -m perf.bench --smoke --out build/bench-smoke
	$(BIN)/python -m perf.ingest_bench --events 2000 --sizes 1,100
	$(BIN)/python -m perf.elixir_bench --smoke --json build/elixir-bench-smoke.json
	$(BIN)/python -m perf.two_stage --catalogue demo --candidates 50,200 --users 30
	$(BIN)/python -m perf.ladder --seconds 0.5 --rounds 1

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
