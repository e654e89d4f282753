# maas-extproc: `make run` starts the local stack, `make test` installs and runs every test.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# make run ERA=subscriptions: the subscription-era MaaS, with a maas-api stand-in
ERA ?= tiers
# make run LAYOUT=full: the STREAMED fallback instead of the default lean layout (README "Layouts")
LAYOUT ?= lean
SOAK_REQUESTS ?= 1200

.PHONY: install protos run test lint format unit e2e fuzz bench bench-usage soak clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	# xds-protos ships an older copy of opentelemetry/proto/*; whichever package pip installs last
	# owns those files. The OTLP exporters need opentelemetry-proto's own: install them last.
	$(PY) -m pip install --quiet --force-reinstall --no-deps \
	  "opentelemetry-proto==$$($(PY) -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')"
	touch $(STAMP)

GEN := extproc/_gen/__init__.py
PROTO_SOURCES := $(shell find protos -name '*.proto') protos/generate.py

$(GEN): $(PROTO_SOURCES) $(STAMP)
	$(PY) protos/generate.py

protos: $(GEN)  ## generate extproc/_gen/ from protos/ (Kuadrant's rate-limit service)

install: $(STAMP) $(GEN)  ## create .venv, install the project with its dev tools, generate code

run: install  ## Envoy + sidecar + model simulator on loopback (REDIS_URL=redis://... for Redis)
	$(PY) -m extproc demo --era $(ERA) --layout $(LAYOUT)

lint: install  ## ruff and mypy --strict
	$(VENV)/bin/ruff check extproc tests bench
	$(VENV)/bin/ruff format --check extproc tests bench
	$(VENV)/bin/mypy

test: lint  ## lint, then the whole suite: unit, integration (real Redis), e2e (real Envoy)
	$(PY) -m pytest -q $(PYTEST_ARGS)

unit: install
	$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)

e2e: install
	$(PY) -m pytest -q tests/e2e $(PYTEST_ARGS)

fuzz: install  ## hostile-input properties at length (thousands of examples each; minutes)
	MAAS_FUZZ_PROFILE=long $(PY) -m pytest -q tests/fuzz $(PYTEST_ARGS)

format: install
	$(VENV)/bin/ruff format extproc tests bench
	$(VENV)/bin/ruff check --fix extproc tests bench

bench: install  ## load the local stack; writes docs/benchmarks.md
	$(PY) -m bench

bench-usage: install  ## the usage API over 100,000 users in Redis; writes its section of docs/benchmarks.md
	$(PY) -m bench.usage_api

soak: install  ## issue 12's fault scenarios at size (SOAK_REQUESTS=1200): lost, double-charged, overshoot
	$(PY) -m bench.soak --requests $(SOAK_REQUESTS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
