# vmattach: every command a user or CI needs. Run as root on Debian 12.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PROTOS := $(wildcard protos/vmattach/v1/*.proto)
GEN_STAMP := gen/.stamp
PYTEST_ARGS ?=

.PHONY: all host venv proto test unit demo bench clean

all: proto

# Debian packages and daemons of the real stack (tgt, libvirtd, QEMU).
host:
	bash scripts/setup-host.sh

# The virtual environment with the project and its dev tools.
$(VENV)/.stamp: pyproject.toml | host
	python3 -m venv $(VENV)
	mkdir -p gen/vmattach/v1
	touch gen/vmattach/__init__.py gen/vmattach/v1/__init__.py
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.stamp

# Generated gRPC/protobuf code: under gen/, never edited, never committed.
$(GEN_STAMP): $(PROTOS) $(VENV)/.stamp
	rm -f gen/vmattach/v1/*_pb2*.py gen/vmattach/v1/*_pb2*.pyi
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=gen --pyi_out=gen \
		--grpc_python_out=gen $(PROTOS)
	touch $@

proto: $(GEN_STAMP)

# Everything: the host set-up, the venv, the generated code, all tests.
test: host proto
	bash scripts/build-test-guest.sh
	VMATTACH_REQUIRE_REALSTACK=1 $(PY) -m pytest -q -ra $(PYTEST_ARGS)

# The tests not marked realstack (no libvirt guests).
unit: proto
	$(PY) -m pytest -q -ra -m 'not realstack' $(PYTEST_ARGS)

demo: host proto
	bash scripts/build-test-guest.sh
	$(PY) -m clients.demo

bench: host proto
	$(PY) -m tests.bench.run

clean:
	rm -rf gen $(VENV) .state
