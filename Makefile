# rescomp: `make demo` runs a small real experiment end to end, `make test` the test suite.
# Both first run `make install`, which (re)creates .venv/ from pyproject.toml when missing or stale.
SHELL := /bin/bash
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo bench baselines clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

test: install
	$(BIN)/pytest -q

# ResNet-20 on CIFAR-10 (the offline copy in ../shared/data if present, else torchvision's download),
# a few minutes on a 2-core CPU; writes results/demo/.
demo: install
	$(BIN)/rescomp train configs/demo/resnet20.yaml
	$(BIN)/rescomp report demo

# Training throughput: the usual DataLoader recipe vs rescomp's loop; writes results/bench/.
bench: install
	$(BIN)/python scripts/bench_train.py

# The 200-epoch baselines later tables compare against (hours on a CPU: run on a GPU).
baselines: install
	for c in configs/baselines/*.yaml; do $(BIN)/rescomp train $$c || exit $$?; done
	$(BIN)/rescomp report baselines

clean:
	rm -rf $(VENV) runs .pytest_cache
