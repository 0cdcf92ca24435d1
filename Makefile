# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint test-fast test-slurm bench ablation clean-venv
TLA := $(VENV)/bin/tla
DEMO_RUN ?= demo-$(shell date +%Y%m%d-%H%M%S)
DEMO_DATA ?= data/fashion-mnist
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

# The venv is (re)built when pyproject.toml or constraints.txt change. constraints.txt pins the
# torch/torchvision releases this project's machines install from local disk.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	@touch $@

lint: $(STAMP)
	$(VENV)/bin/ruff check tla_jobs tests benchmarks cli.py

# Tests run on pytest-xdist workers (tests/conftest.py puts the SLURM tests in one group, serial on one
# worker, and the tests of the built image in another). On 2 cores: test-fast's tests are CPU-bound
# but wait now and then (detached jobs, polling), so 3 workers; `make test` adds a worker that mostly
# waits on the SLURM cluster, one that builds the image first, and two for the rest.
FAST_WORKERS ?= 3
TEST_WORKERS ?= 4
XDIST = --dist loadgroup -n

# The package and the tests compiled once per session: where PYTHONDONTWRITEBYTECODE is set (as on this
# project's machines) every `tla` process a test starts would otherwise compile tla_jobs from source
# again (about 0.06 CPU-s of the 0.45 a `tla status` costs; the suite starts about 900 processes).
PYC = $(PY) -m compileall -q tla_jobs tests >/dev/null

# test-fast: the quick loop while editing: no SLURM, no containers, no test marked `slow` (those that
# train real models or build one through timm); `make test` runs everything.
test-fast: $(STAMP)
	@$(PYC)
	$(VENV)/bin/pytest $(XDIST) $(FAST_WORKERS) --durations=15 -m "not slurm and not container and not slow"

# The whole suite, SLURM and container tests included: the one-machine SLURM cluster
# (tests/slurm_cluster, needs root) is brought up first and down afterwards, also when tests fail.
test: lint
	@$(PYC)
	@status=0; \
	bash tests/slurm_cluster/cluster.sh up || { bash tests/slurm_cluster/cluster.sh logs; exit 1; }; \
	$(VENV)/bin/pytest $(XDIST) $(TEST_WORKERS) --durations=15 || status=$$?; \
	if [ $$status -ne 0 ]; then bash tests/slurm_cluster/cluster.sh logs 40 || true; fi; \
	bash tests/slurm_cluster/cluster.sh down >/dev/null 2>&1 || true; \
	exit $$status

test-slurm: lint
	bash tests/slurm_cluster/cluster.sh up
	$(VENV)/bin/pytest -m slurm

# Speed (not tests): TL-Align's train step, `tla train` against a bare loop, `tla status` over 1,000 runs, the
# loader workers' cost per image (PIL path against the batched data path's CPU side), 50,000 small JPEGs read
# as files against as shards (cold cache as root).
bench: $(STAMP)
	$(PY) benchmarks/bench_align.py
	$(PY) benchmarks/bench_trainer.py
	$(PY) benchmarks/bench_status.py
	$(PY) benchmarks/bench_data.py
	$(PY) benchmarks/bench_shards.py

# The CPU part of docs/results.md: TL-Align paired with grid CutMix, 5 seeds, on the one-head Swin where
# the labels move (about 35 minutes on 2 cores; not part of `make test`). benchmarks/gpu_ablation.sh is the GPU part.
ablation: $(STAMP)
	$(PY) benchmarks/ablation.py

clean-venv:
	rm -rf $(VENV)

# The main job a newcomer runs: a real TL-Align training run of a small ViT on Fashion-MNIST (from
# Debian's dataset-fashion-mnist; scikit-learn's digits when that cannot be installed), submitted
# through submitit's local executor and followed to the end, then status, report and plot.
# A few minutes on 2 cores: 5 epochs of 10,000 images at 28x28, without RandAugment and random
# erasing (which a 5-epoch run on 28x28 images cannot afford; the real recipe keeps them).
demo: $(STAMP)
	@if [ ! -f $(FMNIST) ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian's dataset-fashion-mnist"; \
	  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)) || true; \
	fi
	@if [ -f $(FMNIST) ]; then \
	  $(TLA) data prepare fashion-mnist $(DEMO_DATA) --limit 1000 && echo fashion-mnist > .demo-dataset; \
	else \
	  echo "Fashion-MNIST unavailable: using scikit-learn's digits"; \
	  $(TLA) data prepare digits data/digits && echo digits > .demo-dataset; \
	fi
	@ds=$$(cat .demo-dataset); rm -f .demo-dataset; \
	if [ "$$ds" = digits ]; then data=data/digits; model=tla_vit_nano; size=16; else data=$(DEMO_DATA); model=tla_vit_micro; size=28; fi; \
	$(TLA) submit train --name $(DEMO_RUN) --cluster local --model $$model --dataset $$ds --data-path $$data \
	  --img-size $$size --epochs 5 --warmup-epochs 0 --batch-size 64 --lr 1e-3 --workers 1 --no-repeated-aug \
	  --aa none --reprob 0 --crop-scale 0.5 --drop-path 0 --checkpoint-every-min 1 --follow
	@$(TLA) status
	@$(TLA) report $(DEMO_RUN) --plot runs/$(DEMO_RUN)/accuracy.png
