# One place for every set-up command. Override TORCH_SPEC on a GPU host, e.g.
#   make test TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= config.yaml
PY := $(VENV)/bin/python
# glibc malloc tuned for large gRPC messages (README "Large messages"); the same values as
# moe_router.config.environment.MALLOC_TUNING. glibc ignores an mmap threshold above 32 MiB.
MALLOC_ENV := MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 MALLOC_TOP_PAD_=67108864

.PHONY: install serve test fuzz bench proto lint clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[server,dev]'
	touch $@

install: $(VENV)/.installed

serve: install
	env $(MALLOC_ENV) $(PY) -m moe_router serve --config $(CONFIG)

test: install
	$(PY) scripts/install_promtool.py || true
	$(PY) -m pytest -q -p no:cacheprovider

# The fuzz suite at full budget (9 categories x 7,000 examples: over 50,000 calls to a real
# server) and the SIGTERM / rolling-restart scenarios over 10 runs each.
fuzz: install
	MOE_ROUTER_FUZZ_EXAMPLES=7000 MOE_ROUTER_DRAIN_RUNS=10 $(PY) -m pytest -q -s \
		-p no:cacheprovider tests/doors/test_fuzz.py tests/doors/test_drain.py

bench: install
	env $(MALLOC_ENV) $(PY) -m moe_router bench --preset default

proto: install
	$(PY) scripts/gen_protos.py

lint: install
	$(VENV)/bin/ruff check server client tests scripts
	$(VENV)/bin/mypy server/moe_router client/moe_router_client

clean:
	rm -rf $(VENV) build *.egg-info benchmark_results
