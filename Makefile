# watchtrain developer commands. `make run` and `make test` set everything up first.
PYTHON ?= python3
VENV   ?= .venv
SHARED ?= ../shared
CONFIG ?= watchtrain.toml
BIN    := $(VENV)/bin
# Benchmarks compare against PyTorch, which never goes into the runtime environment.
BENCH_VENV ?= .venv-bench

.PHONY: setup system-deps run test bench clean

# On Linux, MLX's CPU wheel ships a slow reference BLAS; watchtrain preloads OpenBLAS
# (Debian package libopenblas0-pthread) when it is installed. Best effort: skipped
# without root or apt, and never needed on macOS.
system-deps:
	@if [ "$$(uname)" = Linux ] && ! ls /usr/lib/*/libopenblas.so.0 /usr/lib64/libopenblas.so.0 >/dev/null 2>&1; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    (apt-get install -y -q libopenblas0-pthread || (apt-get update -q && apt-get install -y -q libopenblas0-pthread)) >/dev/null; \
	  else echo "note: install OpenBLAS (apt install libopenblas0-pthread) for ~3x faster training on Linux"; fi; \
	fi

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

setup: system-deps $(VENV)/.installed

# The daemon on the config in this folder (watches ../shared's clothing photos,
# publishes output/Clothing.mlpackage). Ctrl-C stops it.
run: setup
	@if [ -z "$$WATCHTRAIN_WEIGHTS" ] && [ -f $(SHARED)/weights/mobilenet_v2_imagenet.safetensors ]; then \
	  export WATCHTRAIN_WEIGHTS=$(SHARED)/weights/mobilenet_v2_imagenet.safetensors; fi; \
	exec $(BIN)/watchtrain run --config $(CONFIG)

test: setup
	$(BIN)/python -m pytest -q

$(BENCH_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install -q -e '.[bench]'
	touch $@

# Speed against PyTorch in one process, then the daemon's latency and the accuracy benchmarks.
bench: system-deps $(BENCH_VENV)/.installed
	$(BENCH_VENV)/bin/watchtrain bench --images $(SHARED)/datasets/clothing-small/validation \
	  --weights $(SHARED)/weights/mobilenet_v2_imagenet.safetensors
	$(BENCH_VENV)/bin/python benchmarks/incremental_latency.py
	$(BENCH_VENV)/bin/python benchmarks/nightly_clothing.py
	$(BENCH_VENV)/bin/python benchmarks/export_variants.py

clean:
	rm -rf $(VENV) $(BENCH_VENV) output .watchtrain-state *.egg-info
