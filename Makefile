# The two commands a new user needs: `make demo` (the main job) and `make test` (the whole suite).
# Both set up .venv first (pinned by constraints.txt: torch 2.13.0's CPU build, no CUDA download).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_FLAGS ?= -q --disable-pip-version-check

.PHONY: setup demo test test-fast lint bench bench-two-host gpu-check protos browser clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) -c constraints.txt -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/adamd demo

# Headless Chromium for the dashboard tests (Debian packages; needs root, as on CI).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

# The tests, by layer: tests/unit (the core, codecs, protos, architecture and docs checks; no
# sockets, daemons or subprocesses), tests/integration (real daemons in this process, on loopback),
# tests/system (real processes: `adamd serve`, workers, examples; namespaces, containers, browser).
# `make test` runs all three on two pytest workers, each taking whole test files (tests in a file
# share servers and fixtures), and lists the 30 slowest; `make test-fast` the unit layer alone (under
# 2 minutes).
PYTEST_WORKERS ?= 2
test: setup browser lint
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile --durations=30 tests

test-fast: setup
	$(PY) -m pytest -x tests/unit

# Every benchmark suite in one run, BENCHMARKS.md written from scratch (about 25 minutes on 2 cores;
# the two-host and sharding suites need root, and are reported as not measured without it).
# `$(PY) -m bench --quick` is a smoke run of every suite; `--only`/`--skip` choose suites.
bench: setup
	$(PY) -m bench

# Across two network namespaces (needs root): adamd vs torch RPC over a veth pair, plain and tc-shaped;
# prints its section (step and training, MTU 1500 and 10 GbE by default).
bench-two-host: setup
	$(PY) -m bench.two_host

# On a CUDA machine: the GPU tests and the GPU benchmark rows (figures into
# bench/results/gpu_check.json, which `make bench` reports with that machine and date). No
# venv needed there (the project's .venv holds a CPU-only torch): python3 with torch, grpcio,
# protobuf and pytest is enough. Without CUDA it stops with a message (exit 2).
GPU_PY ?= $(if $(wildcard $(VENV)/bin/python),$(PY),python3)
gpu-check:
	$(GPU_PY) -m bench.gpu_check

protos: setup
	$(PY) -m grpc_tools.protoc -I protos --python_out=protos --pyi_out=protos --grpc_python_out=protos protos/adamd/v1/adamd.proto

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
