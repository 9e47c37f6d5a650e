# RadFed: `make demo` runs the main job, `make test` runs every check. Both install first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.radfed-installed

.PHONY: install system-deps services demo test lint typecheck unit audit bench profile clean

# torch goes in first (the CPU wheel on local disk); an unpinned torch would pull a CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Debian packages: dicom3tools (dciodvfy validates outputs against the IODs),
# tesseract-ocr (burned-in text), chromium (the web UI's browser tests),
# docker-compose (validates compose/ without a Docker engine).
SYSTEM_PACKAGES := dicom3tools:dciodvfy tesseract-ocr:tesseract chromium:chromium \
	docker-compose:docker-compose
system-deps:
	@missing=""; for pair in $(SYSTEM_PACKAGES); do \
	  command -v "$${pair#*:}" >/dev/null || missing="$$missing $${pair%%:*}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  echo "installing Debian packages:$$missing"; \
	  $$SUDO apt-get update -qq && \
	  $$SUDO apt-get -o DPkg::Lock::Timeout=300 install -y -qq $$missing >/dev/null; fi

# PostgreSQL on 127.0.0.1:5432 (trust auth) with database `test`: the coordinator's
# registry tests run against it as well as SQLite. Started if it is down.
PG_DSN ?= postgresql://postgres@127.0.0.1:5432/test
services:
	@pg_isready -q -h 127.0.0.1 -p 5432 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  echo "starting PostgreSQL"; \
	  $$SUDO pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql) main start; \
	  for i in $$(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done; }
	@psql -h 127.0.0.1 -U postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'test'" \
	  | grep -q 1 || createdb -h 127.0.0.1 -U postgres test

demo: install system-deps
	$(BIN)/radfed demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

# Two workers, one module per worker at a time (module fixtures start real services).
PYTEST_WORKERS ?= 2
unit: install system-deps services
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadfile --durations=25

audit: install
	$(BIN)/python tools/audit.py

test: install system-deps services lint typecheck audit unit

bench: install services
	$(BIN)/python bench/deid.py
	$(BIN)/python bench/deid_memory.py
	$(BIN)/python bench/node_intake.py
	$(BIN)/python bench/coordinator_registry.py
	$(BIN)/python bench/coordinator_intake.py
	$(BIN)/python bench/federation_share.py
	$(BIN)/python bench/fedavg_aggregation.py
	$(BIN)/python bench/training_overhead.py
	$(BIN)/python bench/api_fuzz.py
	$(BIN)/python bench/fuzz_dicom.py --seconds 600
	$(BIN)/python bench/demo_time.py
	$(BIN)/python bench/load_coordinator.py
	$(BIN)/python bench/load_coordinator.py --backend postgresql
	$(BIN)/python bench/load_node_ingest.py

profile: install
	$(BIN)/python tools/gen_deid_profile.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
