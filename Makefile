# The README's two commands are `make run` and `make test`; .ci/run uses the same targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The embedded default data: Debian's dataset-fashion-mnist (MIT licence, 30 MB, no download at run time).
FASHION_MNIST := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
RUNS := runs/fashion_mnist

.PHONY: setup data run run-smoke study summary test test-slow test-portable lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,onnx]'
	# torchattacks, the cross-check of our PGD in the tests: alone, since its metadata pins requests 2.25, which it
	# never imports
	$(BIN)/pip install --quiet --no-deps -c constraints.txt torchattacks
	touch $@

data:
	@test -f $(FASHION_MNIST)/train-images-idx3-ubyte.gz || { \
	  echo "installing the embedded default data set: Debian's dataset-fashion-mnist (30 MB)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; }

# The main job: train SAN10 pairwise and ResNet26 (small-input forms) on Fashion-MNIST, then compare.
# --resume: a second `make run` continues (or just reports) the runs in $(RUNS) instead of starting over.
# RUN_ARGS: more `torchsan train` options for both runs (run-smoke's shorter recipe).
RUN_ARGS ?=
run: setup data
	$(BIN)/torchsan train fashion_mnist/san10_pairwise --output $(RUNS)/san10_pairwise --resume $(RUN_ARGS)
	$(BIN)/torchsan train fashion_mnist/san_resnet26 --output $(RUNS)/san_resnet26 --resume $(RUN_ARGS)
	$(BIN)/torchsan results $(RUNS)/san10_pairwise $(RUNS)/san_resnet26

# CI's form of the main job: the same commands, one epoch on 2,000 training and 1,000 test images, into runs/smoke
# (a few minutes; the full job takes 25 to 80 minutes on 2 cores, too long for CI's 90 beside the tests).
run-smoke:
	$(MAKE) run RUNS=runs/smoke RUN_ARGS="--epochs 1 --train-subset 2000 --val-subset 1000"

# The mini-study (about 5 hours on 2 CPU cores): the core models at 1/4 width, the relation ablation (6 more runs),
# rotations and the attack on the core models, then docs/results.md, built from the result files copied to docs/study
# (no checkpoints). Every step resumes: stop it and run it again.
STUDY := runs/study
STUDY_CFG := fashion_mnist/study
CORE := $(STUDY)/san10_pairwise $(STUDY)/san10_patchwise $(STUDY)/san_resnet26
study: setup data
	$(BIN)/torchsan train $(STUDY_CFG) --output $(STUDY)/san10_pairwise --resume
	$(BIN)/torchsan train $(STUDY_CFG) --model san10_patchwise --output $(STUDY)/san10_patchwise --resume
	$(BIN)/torchsan train $(STUDY_CFG) --model san_resnet26 --output $(STUDY)/san_resnet26 --resume
	$(BIN)/torchsan train $(STUDY_CFG) --model-kwargs position_encoding=false \
	    --output $(STUDY)/san10_pairwise_no_position --resume
	$(BIN)/torchsan ablate relation $(STUDY_CFG) --output $(STUDY)/ablate --jobs 2 \
	    --reuse $(STUDY)/san10_pairwise $(STUDY)/san10_patchwise  # their relations' runs: not trained twice
	$(BIN)/torchsan robustness rotate $(addsuffix /model_best.pth,$(CORE)) --output $(STUDY)/robustness
	$(BIN)/torchsan robustness attack $(addsuffix /model_best.pth,$(CORE)) --output $(STUDY)/robustness \
	    --val-subset 2000  # 32 PGD steps on all 10,000 images would take about an hour on 2 cores
	$(BIN)/torchsan report $(STUDY) --collect docs/study --output docs/results.md --title "The mini-study" \
	    --claims src/torchsan/studies/mini_study_claims.yaml

summary: setup
	$(BIN)/torchsan summary

lint: setup
	$(BIN)/ruff check .

# The test suite without the tests marked slow (the deeper models' ONNX exports and MAC counts, the pipeline and the
# whole tiny SAN through Triton's interpreter, tl.dot in half precision there, torchrun's mid-epoch resume); CI runs
# those too.
# Two pytest workers (pytest-xdist): the Triton interpreter's tests and the subprocess tests run on one core each,
# beside the kernels' tests (tests/conftest.py keeps the workers' OpenMP threads from spinning). TEST_WORKERS=0: one
# process.
TEST_WORKERS ?= 2
test: lint
	$(BIN)/python -m pytest -q -m "not slow" -n $(or $(TEST_WORKERS),0) --durations=10

test-slow: setup
	$(BIN)/python -m pytest -q -m slow -n $(or $(TEST_WORKERS),0)

# The C++ kernels built for the architecture's baseline (x86-64 with SSE2 only, or Armv8-A), the portable path that
# machines without AVX run, then on a CPU with AVX-512 (whose native build is 512-bit) the 256-bit width (x86-64-v3),
# each against the reference. CI runs it after `make test`.
test-portable: setup
	arches="$$($(BIN)/python -c 'from torchsan.ops._cpu._build import portable_arches; print(*portable_arches())')" && \
	for arch in $$arches; do TORCHSAN_CPU_ARCH=$$arch $(BIN)/python -m pytest -q tests/test_ops_cpu_*.py || exit 1; done

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
