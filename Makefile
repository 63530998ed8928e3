# One entry point per job. `make test` builds .venv from scratch when it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and torchvision must be a matching pair (torchvision's compiled ops fail against
# another torch build, e.g. the local CPU-only 2.13.0 wheel); pin one for reproducible runs.
TORCH_PAIR ?= torch==2.14.1 torchvision==0.29.1

.PHONY: test bench demo lint clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]' $(TORCH_PAIR)
	touch $@

# Two workers, a test file each: most tests wait on subprocesses (2 cores: 7-8 min, not 11).
PYTEST_WORKERS ?= 2
test: $(VENV)/.installed
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile tests

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check repsim tests benchmarks

bench: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[bench]' $(TORCH_PAIR)
	$(PY) benchmarks/bench_cka.py
	$(PY) benchmarks/bench_data.py
	$(PY) benchmarks/bench_extract.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_e2e.py
	$(PY) benchmarks/bench_attention.py
	$(PY) benchmarks/bench_stats.py
	$(PY) benchmarks/bench_correspondence.py

# The main job, offline: the bundled 1,000-image CIFAR-10 probe set, the committed
# checkpoints, every figure in analyses/ whose weights are here (the others are skipped with
# one line each). The full study, online: make demo DEMO_ARGS="--dataset cifar10 --n 10000"
DEMO_ARGS ?= --offline
demo: $(VENV)/.installed
	$(VENV)/bin/repsim figures $(DEMO_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
