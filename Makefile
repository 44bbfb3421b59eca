# vmattach: every command a user or CI needs. Run as root on Debian 12.
SHELL := /bin/bash
VENV ?= .venv
# The interpreter the venv is made from: Debian's (scripts/setup-host.sh
# installs python3, python3-venv and python3-dev). It is built with
# profile-guided and link-time optimisation; a plain source build of 3.11
# (pyenv's) costs the services about 10 % more CPU per attach
# (bench/README.md, the session of 2026-12-04, 19:24).
PYTHON ?= /usr/bin/python3
PY := $(VENV)/bin/python
PROTOS := $(wildcard protos/vmattach/v1/*.proto)
GEN_STAMP := gen/.stamp
PYTEST_ARGS ?=

.PHONY: all host venv proto buf node-client test unit lint demo bench clean

all: proto

# Debian packages and daemons of the real stack (tgt, libvirtd, QEMU).
host:
	bash scripts/setup-host.sh

# The virtual environment with the project (editable) and its dev tools.
# Only building it touches the host (libvirt-python compiles against
# libvirt-dev); once built, proto/unit/lint never do.
$(VENV)/.stamp: pyproject.toml setup.py
	@[ -x $(PY) ] || bash scripts/setup-host.sh
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.stamp

# Generated gRPC/protobuf code: under gen/, never edited, never committed
# (the same step pip's build runs: setup.py build_protos).
$(GEN_STAMP): $(PROTOS) setup.py $(VENV)/.stamp
	$(PY) setup.py -q build_protos
	touch $@

proto: $(GEN_STAMP)

# The contract: buf lint (STANDARD, exceptions in protos/buf.yaml), buf
# format, and once a version of it is tagged (git tag contract-vN), buf
# breaking against the last such tag reachable from HEAD.
BUF = $(abspath $(VENV))/bin/buf
CONTRACT_TAG = $(shell git describe --tags --abbrev=0 --match 'contract-v*' 2>/dev/null)
buf: $(VENV)/.stamp
	cd protos && $(BUF) lint && $(BUF) format --diff --exit-code
	@if [ -n "$(CONTRACT_TAG)" ]; then \
	  tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	  git archive "$(CONTRACT_TAG)" protos | tar -x -C "$$tmp" && \
	  echo "buf breaking against $(CONTRACT_TAG)" && \
	  (cd protos && $(BUF) breaking --against "$$tmp/protos"); \
	else echo "buf breaking: no contract-v* tag yet, nothing to compare with"; fi

# Static checks: the contract (buf), ruff on everything, mypy on the typed core.
lint: proto buf
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# The Node.js client's packages (clients/node), from its lock file.
NODE_MODULES := clients/node/node_modules/.package-lock.json
$(NODE_MODULES): clients/node/package.json clients/node/package-lock.json
	cd clients/node && npm ci --no-audit --no-fund --loglevel=error
	touch $@

node-client: $(NODE_MODULES)

# Everything: the host set-up, the venv, the generated code, all tests.
test: host proto lint node-client
	bash scripts/build-test-guest.sh
	VMATTACH_REQUIRE_REALSTACK=1 $(PY) -m pytest -q -ra $(PYTEST_ARGS)

# The tests that need nothing outside this process (tests/unit).
unit: proto
	$(PY) -m pytest -q -ra tests/unit $(PYTEST_ARGS)

demo: host proto
	bash scripts/build-test-guest.sh
	$(PY) -m tests.demo

bench: host proto
	$(PY) -m tests.bench.run

clean:
	rm -rf gen $(VENV) .state clients/node/node_modules
