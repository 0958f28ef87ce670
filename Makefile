# One place for every set-up command.
#
# torch: TORCH_INDEX says which build. The default is PyTorch's CPU wheel index, so
# `make install` gets the CPU build (PyPI's torch is the CUDA build, several GB). On a
# GPU host pick a CUDA index, for example
#   make install TORCH_INDEX=https://download.pytorch.org/whl/cu128
# or PyPI itself (TORCH_INDEX=https://pypi.org/simple, the CUDA build of PyPI). torch is
# installed alone from that index; its dependencies then come from PyPI with ours. Where
# pip is configured with local wheels (find-links), a matching local torch wheel is taken
# when the index cannot be reached. `make image` passes the same TORCH_INDEX to the build.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
CONFIG ?= config.yaml
PY := $(VENV)/bin/python
# The venv's bin first on PATH, as an activated venv has it: torch.utils.cpp_extension finds
# the ninja that `make install` puts there (it builds the fused CPU routing ops).
VENV_PATH := PATH=$(abspath $(VENV))/bin:$$PATH
# Image: moe-router:<version>-<last part of TORCH_INDEX> (0.1.0-cpu, 0.1.0-cu128), built
# by docker or podman, whichever is installed (CONTAINER_ENGINE=... to choose).
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE ?= moe-router
IMAGE_TAG ?= $(VERSION)-$(notdir $(TORCH_INDEX))
CONTAINER_ENGINE ?= $(shell command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1 \
	&& echo docker || (command -v podman >/dev/null 2>&1 && echo podman))
# podman keeps HEALTHCHECK only in the Docker image format.
IMAGE_FORMAT = $(if $(filter podman,$(CONTAINER_ENGINE)),--format docker,)
BASE_IMAGE_ARG := $(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE),)
# glibc malloc tuned for large gRPC messages (README "Large messages"); the same values as
# moe_router.config.environment.MALLOC_TUNING. glibc ignores an mmap threshold above 32 MiB.
MALLOC_ENV := MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 MALLOC_TOP_PAD_=67108864

.PHONY: install serve test fuzz bench proto lint image clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-deps --index-url $(TORCH_INDEX) $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[server,bench,dev]'
	touch $@

install: $(VENV)/.installed

serve: install
	env $(VENV_PATH) $(MALLOC_ENV) $(PY) -m moe_router serve --config $(CONFIG)

test: install
	$(PY) scripts/install_prometheus.py || true
	env $(VENV_PATH) $(PY) -m pytest -q -p no:cacheprovider

# The fuzz suite at full budget (9 categories x 7,000 examples: over 50,000 calls to a real
# server) and the SIGTERM / rolling-restart scenarios over 10 runs each.
fuzz: install
	MOE_ROUTER_FUZZ_EXAMPLES=7000 MOE_ROUTER_DRAIN_RUNS=10 $(PY) -m pytest -q -s \
		-p no:cacheprovider tests/doors/test_fuzz.py tests/doors/test_drain.py

bench: install
	env $(VENV_PATH) $(MALLOC_ENV) $(PY) -m moe_router bench --preset default

proto: install
	$(PY) scripts/gen_protos.py

lint: install
	$(VENV)/bin/ruff check server client tests scripts
	$(VENV)/bin/mypy server/moe_router client/moe_router_client

image:
	@test -n "$(CONTAINER_ENGINE)" || { echo "make image: neither docker (with a running daemon) nor podman is installed"; exit 2; }
	$(CONTAINER_ENGINE) build $(IMAGE_FORMAT) $(BASE_IMAGE_ARG) \
		--build-arg TORCH_INDEX=$(TORCH_INDEX) -t $(IMAGE):$(IMAGE_TAG) .

clean:
	rm -rf $(VENV) build *.egg-info benchmark_results
