# Everything installs into .venv from the package registry; nothing else is assumed on the machine.
PYTHON ?= python3
# The interpreter asked for, as it names itself: a .venv made by another (an earlier PYTHON=...) is made again.
PYTHON_ID := $(shell $(PYTHON) -c 'import sys; print(sys.executable, sys.version.split()[0])' 2>/dev/null)
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
DEMO := data/demo
SEED ?= 0

.PHONY: setup data test demo clean FORCE

setup: $(INSTALLED)

# Rewritten only when the interpreter asked for changes, so that it re-installs then and only then.
$(VENV)/.python: FORCE
	@mkdir -p $(VENV)
	@echo '$(PYTHON_ID)' | cmp -s - $@ || echo '$(PYTHON_ID)' > $@

# Re-installs only when pyproject.toml or the interpreter changes, so `make setup` is fast when nothing changed.
# The venv is made again when it has no pip (made where python3-venv was missing: installing that afterwards
# would not mend it) or was made by another interpreter.
$(INSTALLED): pyproject.toml $(VENV)/.python
	$(BIN)/python -m pip --version >/dev/null 2>&1 && cmp -s $(VENV)/.python $(VENV)/.made-by || { \
	  rm -rf $(VENV) && $(PYTHON) -m venv $(VENV) && echo '$(PYTHON_ID)' > $(VENV)/.python && cp $(VENV)/.python $(VENV)/.made-by; }
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

data: $(DEMO)/.built

# Rebuilt when the builder, the shard writer it uses or the seed changes.
$(DEMO)/.built: $(INSTALLED) $(wildcard data/*.py) core/data/write.py $(DEMO)/.seed
	$(BIN)/python data/make_demo.py --out $(DEMO) --seed $(SEED)
	touch $@

$(DEMO)/.seed: FORCE
	@mkdir -p $(DEMO)
	@echo '$(SEED)' | cmp -s - $@ || echo '$(SEED)' > $@

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
