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

demo: setup data
	$(BIN)/python recipes/mae/train.py fit --config recipes/mae/configs/demo.yaml
	$(BIN)/python -m core.export runs/mae-demo/checkpoints/last.ckpt --out runs/mae-demo/export
	$(BIN)/python -m core.evaluate runs/mae-demo/export --train '$(DEMO)/image/train-{000000..000003}.tar' --val '$(DEMO)/image/val-{000000..000001}.tar'

clean:
	rm -rf $(VENV) $(DEMO) runs
