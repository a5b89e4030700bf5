# fastattn's entry points. `make bench` runs the main job (the benchmark suite: the GPU if
# there is one, else the CPU); `make test` runs the tests. Both set up what they need.
#
# Setup: where $(PYTHON) already has torch, pytest and pytest-benchmark (a GPU image, say),
# it is used as is; otherwise a virtual environment .venv is made and filled from pyproject.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch
export CUDA_HOME ?= /usr/local/cuda
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))

HAVE_DEPS := $(shell $(PYTHON) -c "import torch, pytest, pytest_benchmark, numpy" >/dev/null 2>&1 && echo yes)
PY := $(if $(HAVE_DEPS),$(PYTHON),$(VENV)/bin/python)
ON_GPU = $(shell $(PY) -c "import torch; print('yes' if torch.cuda.is_available() else '')" 2>/dev/null)
SHAPES ?= $(if $(ON_GPU),default,smoke)
RESULTS ?= results

.PHONY: setup test bench bench-check bench-twice window-sweep fast-transformers build build-cuda wheel wheel-check lint clean

setup: $(if $(HAVE_DEPS),,$(VENV)/.installed)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q "$(TORCH)"
	$(VENV)/bin/python -m pip install -q -e ".[test,plots]"
	touch $@

build: setup
	$(PY) -m fastattn.build

# Compile check of the CUDA sources; works on a machine without a GPU.
build-cuda: setup
	$(PY) -m fastattn.build --cuda

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# The ahead-of-time build (setup.py, docs/install.md): a wheel compiled against this torch into
# $(WHEEL_OUT)/dist, with CUDA kernels where nvcc is found (TORCH_CUDA_ARCH_LIST; FASTATTN_BUILD_CUDA=1
# requires them). `make wheel-check` installs that wheel (make it first) into a fresh venv and runs
# the CPU tests there, against the installed package, with the JIT build disabled
# (tools/wheel_check.sh).
WHEEL_OUT ?= $(RESULTS)/wheel
wheel: setup
	$(PY) -m pip install -q "setuptools>=68" wheel
	rm -rf $(WHEEL_OUT)/dist build/lib* build/temp*
	$(PY) -m pip wheel --no-build-isolation --no-deps -w $(WHEEL_OUT)/dist .

wheel-check: setup
	PYTHON="$(PYTHON)" BUILD_PY="$(PY)" OUT=$(WHEEL_OUT) tools/wheel_check.sh

# The benchmark suite: JSON (every round kept, seconds per call) in $(RESULTS)/bench.json, also
# saved to pytest-benchmark's storage for --benchmark-compare; then the markdown table and the
# PNG chart ($(RESULTS)/table.md, chart.png). The report is written even when a case fails.
BENCH_PYTEST = $(PY) -m pytest bench --benchmark-only --shapes $(SHAPES) \
	--benchmark-json $(RESULTS)/bench.json --benchmark-save-data \
	--benchmark-storage $(RESULTS)/storage --benchmark-autosave $(BENCH_ARGS)

bench: setup
	mkdir -p $(RESULTS)
	status=0; $(BENCH_PYTEST) || status=$$?; \
	if [ -s $(RESULTS)/bench.json ]; then $(PY) -m fastattn.perf report $(RESULTS)/bench.json --out $(RESULTS); fi; \
	exit $$status

# What the report and the gate read is in the run: per-round samples, FLOPs, TFLOP/s, device.
bench-check: setup
	$(PY) -m fastattn.perf check-json $(RESULTS)/bench.json

# TFLOP/s against window width (the `full` set's causal sweep at L = 32768, D = 128, bf16) for
# every implementation present: results/windows/{bench.json,windows.md,windows.png}.
window-sweep: setup
	$(MAKE) --no-print-directory bench SHAPES=full RESULTS=$(RESULTS)/windows \
		BENCH_ARGS="-k 'local and bf16 and B1H16L32768D128' $(BENCH_ARGS)"
	$(PY) -m fastattn.perf windows $(RESULTS)/windows/bench.json --out $(RESULTS)/windows

# Noise check: the same cases twice in a row; prints each median's change (results/noise.md).
bench-twice: setup
	$(MAKE) --no-print-directory bench RESULTS=$(RESULTS)/first
	$(MAKE) --no-print-directory bench RESULTS=$(RESULTS)
	$(PY) -m fastattn.perf report $(RESULTS)/bench.json --out $(RESULTS) --noise $(RESULTS)/first/bench.json

# fast-transformers 0.4.0, a benchmark peer, built from its sdist in .ft/ for this torch.
fast-transformers: setup
	$(PY) tools/build_fast_transformers.py

lint: setup
	$(PY) -m ruff check fastattn tests bench conftest.py

clean:
	rm -rf build $(RESULTS) .pytest_cache .benchmarks

# --- the regression gate (docs/gate.md) -----------------------------------------------------
# `make baseline`: run the suite (`make bench`) and promote the run to
# $(BASELINES)/<device>.json, atomically. `make compare`: run the suite and gate it against
# this device's baseline (exit 1 on a regression, 2 if there is no baseline or the run is
# unusable); GATE_RUN=file gates an existing run instead. `make history`: trend table and
# plots of the runs saved under $(HISTORY_DIR) (HISTORY_ADD=file adds one first).
BASELINES ?= bench/baselines
THRESHOLDS ?= bench/thresholds.toml
HISTORY_DIR ?= $(RESULTS)/storage
GATE_RUN ?=
HISTORY_ADD ?=
GATE_BENCH = $(MAKE) --no-print-directory bench BENCH_ARGS="--benchmark-save-data $(BENCH_ARGS)"
# A regression stands only if a second timing of the case, in a fresh process, shows it too.
GATE_CONFIRM = $(MAKE) --no-print-directory bench RESULTS=$(RESULTS)/confirm \
	BENCH_ARGS="--benchmark-save-data $(BENCH_ARGS) -k {k}"

.PHONY: gate-setup baseline compare history gate-selftest gate-gpu-check

# What the gate's own checks need beyond `setup`: scipy, matplotlib, pyyaml and actionlint.
gate-setup: setup
	$(PY) -m pip install -q -e ".[gate]"

# A baseline is BASELINE_PROCESSES runs of the suite, each in a fresh process: per case the
# fastest process is kept, with its between-process spread (second-fastest over fastest), the
# noise that the gate then allows that case (docs/gate.md). BASELINE_PROCESSES=1: one run.
BASELINE_PROCESSES ?= 3
baseline: setup
	for p in $$(seq $(BASELINE_PROCESSES)); do \
		$(MAKE) --no-print-directory bench RESULTS=$(RESULTS)/baseline-processes/p$$p \
			BENCH_ARGS="--benchmark-save-data $(BENCH_ARGS)" || exit 1; done
	$(PY) -m fastattn.perf fastest-of $(RESULTS)/bench.json $(RESULTS)/baseline-processes/p*/bench.json
	$(PY) -m fastattn.perf baseline $(RESULTS)/bench.json --dir $(BASELINES)

compare: setup
	$(if $(GATE_RUN),,$(GATE_BENCH))
	$(PY) -m fastattn.perf compare --baseline-dir $(BASELINES) --thresholds $(THRESHOLDS) \
		--markdown $(RESULTS)/gate.md --confirm-with '$(GATE_CONFIRM)' \
		--confirm-run $(RESULTS)/confirm/bench.json $(GATE_ARGS) $(or $(GATE_RUN),$(RESULTS)/bench.json)

history: setup
	$(PY) -m fastattn.perf history --storage $(HISTORY_DIR) --out $(RESULTS)/history \
		--thresholds $(THRESHOLDS) $(if $(HISTORY_ADD),--add $(HISTORY_ADD)) $(GATE_ARGS)

# The gate's acceptance on this machine (tools/gate_selftest.sh): two runs of this commit
# compared -> 0, the second x1.2 -> 1, a truncated file -> 2, and the history renders.
# On a CPU (CI) the runs are the fastattn local cases of the smoke set (GATE_SELECT), one
# thread each, half a second of timing per case; each run is 7 processes alternating with the
# other run's, each case keeping its fastest process (a shared VM draws a slow mode per
# process: fastattn/perf/fastest.py), at a 10% threshold (the planted x1.2 is still caught).
GATE_SELECT ?= fastattn and local
gate-selftest: setup
	PY="$(PY)" MAKE="$(MAKE)" OUT=$(RESULTS)/gate-selftest OMP_NUM_THREADS=1 SHAPES=smoke \
		GATE_PROCESSES=7 GATE_THRESHOLD=10% GATE_SELECT="$(GATE_SELECT)" \
		GATE_BENCH_ARGS="--bench-budget 0.5" tools/gate_selftest.sh

# The GPU acceptance: the same with two default runs (all cases, or GATE_GPU_SELECT); with
# GATE_REUSE=1 a run already made is kept, so a call cut short by a time limit can resume.
GATE_GPU_SELECT ?=
gate-gpu-check: setup
	PY="$(PY)" MAKE="$(MAKE)" OUT=$(RESULTS)/gate-gpu-check SHAPES=default \
		GATE_SELECT="$(GATE_GPU_SELECT)" GATE_BENCH_ARGS="$(BENCH_ARGS)" tools/gate_selftest.sh
