# rescomp: `make demo` runs a small real experiment end to end, `make test` the test suite.
# Both first run `make install`, which (re)creates .venv/ from pyproject.toml when missing or stale.
SHELL := /bin/bash
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo gpu-prep test-gpu-env bench bench-ddp bench-int8 bench-inductor-shapes bench-layout baselines table-separable table-layer-drop table-taylor \
	table-combined table-deep-compression table-int8 report-int8 report-separable report-layer-drop report-taylor report-combined \
	report-deep-compression rerender clean

# Paper tables run a profile of their configs: paper (the paper's recipe), fast (one GPU, minutes),
# cpu (a 2-core CPU, minutes; the default here, where no GPU is lent).
PROFILE ?= cpu
# A profile's --profile flag and run-folder suffix (none for paper, the configs' own recipe).
pflag = $(if $(filter paper,$(1)),,--profile $(1))
psuf = $(if $(filter paper,$(1)),,-$(1))
PFLAG := $(call pflag,$(PROFILE))
PSUF := $(call psuf,$(PROFILE))
# The int8 backends every network of an int8 table is quantized by, and the run folders they make
# beside the fp32 run (a bash brace list: <run>, <run>-ptq, ...).
INT8_BACKENDS := x86 onnxruntime pt2e
INT8_RUNS := {,-ptq,-ptq-onnxruntime,-ptq-pt2e}
# Where the tables' runs are; `make report-taylor RUNS=elsewhere/runs` re-renders a table from them.
RUNS ?= runs
# A table's independent runs side by side (rescomp jobs): GPUS=0,1,2,3 puts one run on each listed GPU at a
# time, JOBS=N runs N at a time on this machine; neither: one at a time, in order, to this terminal. Each
# target lists its commands in phases (--- ends one), so the training runs that later runs start from are
# made first, once.
JOBS_RUN := $(BIN)/rescomp jobs - $(if $(GPUS),--gpus $(GPUS),$(if $(JOBS),--jobs $(JOBS)))

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

# One pytest-xdist worker per core (at most 4), each with its share of the cores for PyTorch
# (tests/conftest.py); a test that is free goes to whichever worker is. Much of the suite waits on
# subprocesses (torch imports, torchrun, C++ compiles), so two workers on 2 cores take about two thirds
# of one's time. A worker that faulthandler ends (a test stuck in native code, below) is not replaced:
# that test fails with every thread's stack, the other workers finish the rest, and the run fails
# (checked with a sleeping test). `make test PYTEST_ARGS=-q` runs it in one process.
PYTEST_ARGS ?= -q -n auto --maxprocesses 4 --dist worksteal --max-worker-restart 0

# The suite runs on this CPU's own kernels, then again on the AVX2 ones most users' CPUs have
# (oneDNN picks other kernels there; ../shared/UPSTREAM.md). On a CPU without AVX-512 the first pass
# already is the AVX2 pass. A test stuck in native code ends the run with every thread's stack
# (faulthandler_timeout in pyproject.toml) instead of blocking CI.
test: install
	$(BIN)/pytest $(PYTEST_ARGS)
	@if grep -qw avx512f /proc/cpuinfo 2>/dev/null && [ -z "$$ONEDNN_MAX_CPU_ISA" ]; then \
	  echo "again with ONEDNN_MAX_CPU_ISA=AVX2 (the kernels of AVX2-only CPUs):"; \
	  ONEDNN_MAX_CPU_ISA=AVX2 $(BIN)/pytest $(PYTEST_ARGS); \
	else echo "this CPU has no AVX-512 (or ONEDNN_MAX_CPU_ISA is set): the pass above ran the AVX2 kernels"; fi

# ResNet-20 on CIFAR-10 (the offline copy in ../shared/data if present, else torchvision's download),
# trained, then quantized to int8; a few minutes on a 2-core CPU; writes results/demo/.
demo: install
	$(BIN)/rescomp train configs/demo/resnet20.yaml
	$(BIN)/rescomp quantize configs/demo/resnet20.yaml
	$(BIN)/rescomp report demo

# What a lent GPU machine (scripts/gpu_check.sh; Python 3.12, no network) needs from here: wheels of the
# dependencies its image lacks, in .whl/, and the CIFAR-10 copy, in data/ (both git-ignored).
GPU_WHEELS := pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 \
	yacs==0.1.8 termcolor==3.3.0 torch-pruning==1.6.1 torchao==0.18.0
GPU_SOURCES := fvcore==0.1.5.post20221221 iopath==0.1.10  # published as sources only: built here (pure Python)
gpu-prep: install
	rm -rf .whl && mkdir -p .whl data
	$(BIN)/pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
	  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)
	$(BIN)/pip wheel --quiet --disable-pip-version-check --no-deps -w .whl $(GPU_SOURCES)
	@test -f data/cifar10-jpeg.tar.gz || cp ../shared/data/cifar10-jpeg.tar.gz data/ \
	  || echo "no CIFAR-10 copy in ../shared/data: the GPU check's benchmarks will use synthetic data"
	@du -sh .whl data

# The GPU machine's software, on this CPU: Python 3.12 with the versions its image holds (the device tool's
# KINDS.md: torch 2.11.0, torchvision 0.26.0, numpy 2.5.2, onnx 1.23.1, onnxruntime 1.30.0), the wheels
# gpu-prep carries there, and rescomp on PYTHONPATH, as scripts/gpu_check.sh runs it. The suite in
# .venv-gpu/ (about 5 GB: PyPI's torch is a CUDA build; needs the network and python3.12) shows what
# would break on a lease before the lease is spent. CUDA's own tests skip here.
GPU_IMAGE := torch==2.11.0 torchvision==0.26.0 numpy==2.5.2 onnx==1.23.1 onnxscript==0.7.2 onnxruntime==1.30.0 \
  typer rich pyyaml pillow matplotlib tabulate tqdm portalocker "pytest>=9.2,<10" pytest-xdist==3.8.0 tensorboard==2.21.0
PY312 ?= python3.12
test-gpu-env: gpu-prep
	@test -x .venv-gpu/bin/python || $(PY312) -m venv .venv-gpu
	.venv-gpu/bin/pip install --quiet --disable-pip-version-check $(GPU_IMAGE)
	.venv-gpu/bin/pip install --quiet --disable-pip-version-check --no-deps .whl/*.whl
	PYTHONPATH=$(CURDIR) .venv-gpu/bin/python -m pytest $(PYTEST_ARGS)

# Training throughput: the usual DataLoader recipe vs rescomp's loop; writes results/bench/.
bench: install
	$(BIN)/python scripts/bench_train.py

# Is NHWC safe and faster on this CPU? The measurements behind the CPU layout rule (rescomp.hardware).
bench-layout: install
	$(BIN)/python scripts/cpu_layout.py

# The 200-epoch baselines later tables compare against (hours on a CPU: run on a GPU).
baselines: install
	for c in configs/baselines/*.yaml; do echo "rescomp train $$c"; done | $(JOBS_RUN)
	$(BIN)/rescomp report baselines

# Training throughput with 1, 2, 4, ... processes (torchrun + DDP): every GPU of the machine, or Gloo on the CPU.
bench-ddp: install
	$(BIN)/python scripts/bench_ddp.py

# int8 vs fp32 CPU latency of ResNet-56 and ResNet50V2, both timed in one process.
bench-int8: install
	$(BIN)/python scripts/bench_int8.py

# Inductor at batch 64 after batch 1: torch.compile's default (dynamic) against a static graph per batch size
bench-inductor-shapes: install
	$(BIN)/python scripts/bench_inductor_shapes.py

# Kastanos 2020, Tables 1-2 (ResNet50V2 full/spatial/depthwise, fp32 and int8), and the same on ResNet-56.
# Each network is quantized by every int8 backend (torch.ao FX x86, ONNX Runtime, PT2E), calibrated
# on the same 1000 training images, so the table shows which one to ship.
# The six trainings run side by side under GPUS / JOBS; quantizing, which times every backend on the CPU,
# runs one network at a time.
table-separable: install
	for m in resnet50v2 resnet56; do for v in full spatial depthwise; do \
	  echo "rescomp train configs/table-separable/$$m-$$v.yaml $(PFLAG)"; done; done | $(JOBS_RUN)
	for m in resnet50v2 resnet56; do for v in full spatial depthwise; do \
	  for b in $(INT8_BACKENDS); do \
	    $(BIN)/rescomp quantize configs/table-separable/$$m-$$v.yaml $(PFLAG) --set quantize.backend=$$b || exit $$?; \
	  done; done; done
	$(MAKE) report-separable

report-separable: install
	$(BIN)/rescomp report $(RUNS)/resnet50v2-{full,spatial,depthwise}$(PSUF)$(INT8_RUNS) --table table-separable \
	  --baseline Full --notes configs/table-separable/notes.md
	$(BIN)/rescomp report $(RUNS)/resnet56-{full,spatial,depthwise}$(PSUF)$(INT8_RUNS) \
	  --table table-separable-resnet56 --baseline "ResNet-56 Full" --notes configs/table-separable/notes.md

# Issue 11's accuracy question: does int8 stay within 0.5 point of fp32 on every backend, for a trained
# ResNet-56 and ResNet50V2? The Full networks of table-separable, each quantized by every backend. The cpu
# profile's 3 epochs leave networks whose predictions flip under any small change, so on a CPU this target
# takes the cpu-long profile (the whole train set, 9-10 epochs, about 110 minutes a network on one core;
# JOBS=2 trains both side by side); PROFILE=fast or paper uses (or makes) table-separable's own trainings.
INT8_PROFILE := $(if $(filter cpu,$(PROFILE)),cpu-long,$(PROFILE))
INT8_PFLAG := $(call pflag,$(INT8_PROFILE))
INT8_PSUF := $(call psuf,$(INT8_PROFILE))
table-int8: install
	for m in resnet50v2 resnet56; do \
	  echo "rescomp train configs/table-separable/$$m-full.yaml $(INT8_PFLAG)"; done | $(JOBS_RUN)
	for m in resnet50v2 resnet56; do for b in $(INT8_BACKENDS); do \
	  $(BIN)/rescomp quantize configs/table-separable/$$m-full.yaml $(INT8_PFLAG) --set quantize.backend=$$b || exit $$?; \
	done; done
	$(MAKE) report-int8

report-int8: install
	$(BIN)/rescomp report $(RUNS)/{resnet50v2,resnet56}-full$(INT8_PSUF)$(INT8_RUNS) --table table-int8 \
	  --notes configs/table-separable/notes-int8.md

# Residual-block deletion: accuracy vs layers (the method; regular ResNets of each depth from scratch
# and distilled, each row with the epochs it was trained in all), the cost table, the study of k (units
# per step) and n (retraining epochs), the learned w. The study reuses the trained network and varies
# k or n one at a time around the main run's (paper: k = 1/2/4, n = 30/60/120), without baselines.
LD := configs/table-layer-drop/resnet56.yaml
LD_STUDY_K := $(if $(filter cpu,$(PROFILE)),1 5,1 4)
LD_STUDY_N := $(if $(filter cpu,$(PROFILE)),2 4,30 120)
table-layer-drop: install
	{ echo "rescomp train $(LD) $(PFLAG)"; echo "---"; echo "rescomp layer-drop $(LD) $(PFLAG)"; \
	  for k in $(LD_STUDY_K); do echo "rescomp layer-drop $(LD) $(PFLAG) --set layer_drop.k=$$k \
	    --set layer_drop.baselines.scratch=false --set layer_drop.baselines.distill=false"; done; \
	  for n in $(LD_STUDY_N); do echo "rescomp layer-drop $(LD) $(PFLAG) --set layer_drop.retrain_epochs=$$n \
	    --set layer_drop.baselines.scratch=false --set layer_drop.baselines.distill=false"; done; } | $(JOBS_RUN)
	$(MAKE) report-layer-drop

report-layer-drop: install
	$(BIN)/rescomp report $(RUNS)/ld-resnet56$(PSUF)-layerdrop-* --table table-layer-drop \
	  $(if $(filter cpu,$(PROFILE)),--notes configs/table-layer-drop/notes.md)

# Taylor filter pruning (Martineau): Table 2 at 0-30 % in both policies, each network counted again at
# 224x224 with the paper's head; Table 1 (AlexNet: each share in its own run, fast = 2 iterations,
# slow = 10, equal fine-tuning); ResNet-56 with every criterion; and a structural counterfactual
# (uniform vs global allocation on untrained networks, structure.md). The cpu profile trains from
# scratch at 32x32 (AlexNet 64x64) and runs three of the six networks.
TAYLOR_MODELS := $(if $(filter cpu,$(PROFILE)),resnet18 squeezenet1_1 alexnet,vgg16 alexnet resnet18 squeezenet1_1 densenet121 resnet50)
table-taylor: install
	$(BIN)/python scripts/taylor_structure.py
	{ for m in $(TAYLOR_MODELS) resnet56; do echo "rescomp train configs/table-taylor/$$m.yaml $(PFLAG)"; done; echo "---"; \
	  for m in $(TAYLOR_MODELS); do for p in paper coupled; do \
	    echo "rescomp prune configs/table-taylor/$$m.yaml $(PFLAG) --set prune.policy=$$p"; done; done; \
	  for s in fast slow; do echo "rescomp prune configs/table-taylor/alexnet.yaml $(PFLAG) --set prune.schedule=$$s"; done; \
	  for c in taylor mean_activation l1 random; do for p in paper coupled; do \
	    echo "rescomp prune configs/table-taylor/resnet56.yaml $(PFLAG) --set prune.criterion=$$c --set prune.policy=$$p"; \
	  done; done; } | $(JOBS_RUN)
	$(MAKE) report-taylor

report-taylor: install
	$(BIN)/rescomp report $(foreach m,$(TAYLOR_MODELS),$(RUNS)/taylor-$(m)$(PSUF)-prune-*-taylor-custom) --table table-taylor \
	  --notes configs/table-taylor/notes.md
	$(BIN)/rescomp report $(RUNS)/taylor-alexnet$(PSUF)-prune-paper-taylor-{fast,slow} --table table-taylor-alexnet-schedules \
	  --notes configs/table-taylor/notes-alexnet-schedules.md
	$(BIN)/rescomp report $(RUNS)/taylor-resnet56$(PSUF)-prune-* --table table-taylor-resnet56 \
	  --notes configs/table-taylor/notes-resnet56.md

# Issue 12: which compression wins, and which combinations compound. One trained gated ResNet-56, then
# every technique alone and chained (`rescomp run`, one config per chain; the chains share their
# common first stages' folders, so they run one after another even under GPUS / JOBS: side by side, two
# chains would meet in one folder), all on one Pareto table against the trained network.
COMBINED := int8 prune-int8 layerdrop-int8 prune-layerdrop-int8 depthwise-int8 layerdrop-prune-int8 \
	mprune-share binarize binarize-bq
table-combined: install
	for c in $(COMBINED); do $(BIN)/rescomp run configs/table-combined/$$c.yaml $(PFLAG) || exit $$?; done
	$(MAKE) report-combined

report-combined: install
	$(BIN)/rescomp compare table-combined --runs $(RUNS) --profile $(PROFILE) --table table-combined \
	  --baseline combined-resnet56$(PSUF) $(if $(filter cpu,$(PROFILE)),--notes configs/table-combined/notes.md)

# Issue 13: Deep Compression (Han et al. 2015, 2016) as the papers count it, on a network with fully
# connected layers (Caffe's LeNet-5; AlexNet, the slides' network) and on ResNet-56: train, magnitude
# pruning by Han's rule, weight sharing, Huffman coding, the bytes of every storage stage (each a real
# file) and the papers' factors beside ours. SEP-Net binarization and the chains are in table-combined.
DC_MODELS := lenet5 alexnet resnet56
table-deep-compression: install
	{ for m in $(DC_MODELS); do echo "rescomp run configs/table-deep-compression/$$m.yaml $(PFLAG)"; done; echo "---"; \
	  echo "rescomp run configs/table-deep-compression/lenet5.yaml $(PFLAG) --set magnitude_prune.scope=global"; \
	} | $(JOBS_RUN)  # the last: one |w| threshold, from LeNet-5's trained network
	$(MAKE) report-deep-compression

report-deep-compression: install
	$(BIN)/rescomp report $(foreach m,$(DC_MODELS),$(wildcard $(RUNS)/dc-$(m)$(PSUF) $(RUNS)/dc-$(m)$(PSUF)-mprune-*)) \
	  --table table-deep-compression $(if $(filter cpu,$(PROFILE)),--notes configs/table-deep-compression/notes.md)

# Every committed table rendered again from its own table.json, with the notes and baseline its report
# target gives it: after a change to the renderer or to a table's notes, without the runs (the rows and
# their provenance are the ones collected); table-combined from its compare.json.
rerender: install
	$(BIN)/rescomp report results/demo
	$(BIN)/rescomp report results/table-separable --baseline Full --notes configs/table-separable/notes.md
	$(BIN)/rescomp report results/table-separable-resnet56 --baseline "ResNet-56 Full" --notes configs/table-separable/notes.md
	$(BIN)/rescomp report results/table-int8 --notes configs/table-separable/notes-int8.md
	$(BIN)/rescomp report results/table-layer-drop --notes configs/table-layer-drop/notes.md
	$(BIN)/rescomp report results/table-taylor --notes configs/table-taylor/notes.md
	$(BIN)/rescomp report results/table-taylor-alexnet-schedules --notes configs/table-taylor/notes-alexnet-schedules.md
	$(BIN)/rescomp report results/table-taylor-resnet56 --notes configs/table-taylor/notes-resnet56.md
	$(BIN)/rescomp report results/table-deep-compression --notes configs/table-deep-compression/notes.md
	$(BIN)/rescomp compare results/table-combined --table table-combined --notes configs/table-combined/notes.md
	for f in results/bench/int8_latency-*.json; do $(BIN)/python scripts/bench_int8.py --render $$f || exit 1; done
	$(BIN)/python scripts/taylor_structure.py --render results/table-taylor/structure.json

clean:
	rm -rf $(VENV) .venv-gpu runs .pytest_cache
