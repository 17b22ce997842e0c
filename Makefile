# revenant: one-command setup, tests, demo and benchmarks.
SHELL := /bin/bash
VENV   ?= .venv
PY     := $(VENV)/bin/python
PROTOS := $(shell find proto -name '*.proto' | sort)
PB_STAMP := proto/.generated
BIN_LINKS := containerd-shim-revenant-v1 revenant-snapshotter revenant
PYTEST_ARGS ?=

.PHONY: setup deps venv proto links test unit lint smoke-wheel package demo bench clean

setup: deps venv proto links

deps:
	@bash packaging/install-deps.sh

# Re-created only when pyproject.toml changes.
venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

proto: $(PB_STAMP)
$(PB_STAMP): $(PROTOS) $(VENV)/.installed
	@find proto -name '*_pb2*.py' -o -name '*_pb2.pyi' | xargs -r rm -f
	$(PY) -m grpc_tools.protoc -I proto --python_out=proto --pyi_out=proto --grpc_python_out=proto $(PROTOS)
	@find proto/revenant_pb -type d -exec sh -c 'test -f "$$1/__init__.py" || : > "$$1/__init__.py"' _ {} \;
	@touch $@

# containerd finds runtime shims on its PATH: put ours where a stock containerd looks.
links: $(VENV)/.installed
	@for b in $(BIN_LINKS); do \
	  target=$$(readlink -f $(VENV)/bin/$$b); \
	  [ "$$(readlink -f /usr/local/bin/$$b 2>/dev/null)" = "$$target" ] || ln -sf "$$target" /usr/local/bin/$$b; \
	done

# The type checker's scope: these are clean under the [tool.mypy] settings in pyproject.toml.
MYPY_PATHS := shim/ttrpc shim/store shim/protect/policy.py shim/libc.py shim/hosts.py shim/progress.py shim/protect/freeze.py shim/runc/freezer.py shim/checkpoint/image_check.py shim/checkpoint/lazy_pages.py shim/checkpoint/page_server.py shim/checkpoint/lazy_daemon.py

# Everything: lint first, then the whole suite against real containerd, runc, CRIU and servers (root).
test: setup
	$(MAKE) --no-print-directory lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# The tests that need no root, containerd or servers (the `unit` marker, tests/conftest.py).
unit: venv proto
	$(VENV)/bin/pytest -q -m unit -p no:cacheprovider $(PYTEST_ARGS)

lint: venv proto
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy $(MYPY_PATHS)

# The wheel as users get it: built, installed without dev extras into a fresh virtualenv, each command run.
smoke-wheel: venv
	bash packaging/smoke-wheel.sh $(PY)

# The self-contained tree the Kubernetes DaemonSet copies onto nodes (packaging/kubernetes/build-tree.sh):
# a virtualenv around PACKAGE_PYTHON with the wheel, the CRI fragments and the node installer. A virtualenv
# is not relocatable: PACKAGE_DEST is where it runs (/opt/revenant in the installer image).
PACKAGE_DEST ?= /opt/revenant
PACKAGE_PYTHON ?= python3
package: venv
	bash packaging/kubernetes/build-tree.sh $(PACKAGE_DEST) $(PACKAGE_PYTHON) $(PY)

demo: setup
	PYTHONPATH=tests $(PY) -m harness.demo

# Podman is only the protection and sweep benchmarks' peer, so it is installed here rather than by
# install-deps; matplotlib draws the economics and sweep plots (the sweep's plot test needs it too, so
# the dev extra has it as well).
bench: setup
	@command -v podman >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends podman
	$(PY) -m pip install -q -e '.[dev,bench]'
	PYTHONPATH=tests $(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(PB_STAMP)
	find proto -name '*_pb2*.py' -o -name '*_pb2.pyi' | xargs -r rm -f
