# Everything installs into .venv from the package registry; nothing else is assumed on the machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
DEMO := data/demo
SEED ?= 0

.PHONY: setup data test demo clean

setup: $(INSTALLED)

# Re-installs only when pyproject.toml changes, so `make setup` is fast when nothing changed.
$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

data: $(DEMO)/.built

$(DEMO)/.built: $(INSTALLED) $(wildcard data/*.py)
	$(BIN)/python data/make_demo.py --out $(DEMO) --seed $(SEED)
	touch $@

test: setup data
	$(BIN)/python -m pytest

# Pretrain each of DEMO_RECIPES (image recipes) from its demo config, export it and score it on the held-out
# val split: MAE, and VICReg, whose demo reaches its target on 2 cores (see README.md).
DEMO_RECIPES ?= mae vicreg

demo: setup data
	for recipe in $(DEMO_RECIPES); do \
	  $(BIN)/python recipes/$$recipe/train.py fit --config recipes/$$recipe/configs/demo.yaml && \
	  $(BIN)/python -m core.export runs/$$recipe-demo/checkpoints/last.ckpt --out runs/$$recipe-demo/export && \
	  $(BIN)/python -m core.evaluate runs/$$recipe-demo/export \
	    --train '$(DEMO)/image/train-{000000..000003}.tar' --val '$(DEMO)/image/val-{000000..000001}.tar' || exit 1; \
	done

clean:
	rm -rf $(VENV) $(DEMO) runs
