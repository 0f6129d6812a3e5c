# The two quick-start commands: `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8080

.PHONY: run test lint bench-smoke clean

# scripts/install.sh: uv when it can be had (about 8 s from nothing), else pip (about 34 s).
$(VENV)/.installed: pyproject.toml
	VENV=$(VENV) PYTHON=$(PYTHON) sh scripts/install.sh .
	touch $@

$(VENV)/.installed-dev: pyproject.toml
	VENV=$(VENV) PYTHON=$(PYTHON) sh scripts/install.sh '.[dev]'
	touch $@ $(VENV)/.installed

## Install and start the app on the embedded defaults, with simulated devices publishing.
run: $(VENV)/.installed
	IOTMETER_SIMULATOR_ENABLED=$${IOTMETER_SIMULATOR_ENABLED:-true} \
		$(BIN)/uvicorn iotmeter.app:app --host $(HOST) --port $(PORT) \
		--http iotmeter.server:HttpProtocol

## Install the test dependencies, check the services the tests need, run everything.
test: $(VENV)/.installed-dev
	$(BIN)/python scripts/prepare_tests.py
	$(BIN)/pytest
	$(MAKE) --no-print-directory lint

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests migrations bench scripts
	$(BIN)/ruff format --check src tests migrations bench scripts
	$(BIN)/mypy src

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache
