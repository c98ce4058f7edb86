"""Every config of every recipe parses against its recipe's LightningCLI (typos in keys fail here)."""

import contextlib
import glob
import importlib
import inspect
import io
import os

import lightning as L
import pytest

from core.cli import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "recipes/*/configs/*.yaml")))


def recipe_module_class(config: str) -> type[L.LightningModule]:
    name = os.path.basename(os.path.dirname(os.path.dirname(config)))
    module = importlib.import_module(f"recipes.{name}.model")
    classes = [c for _, c in inspect.getmembers(module, inspect.isclass) if issubclass(c, L.LightningModule) and c.__module__ == module.__name__]
    assert len(classes) == 1, f"recipes/{name}/model.py should define one LightningModule, found {classes}"
    return classes[0]


def test_every_recipe_has_a_demo_config():
    recipes = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "recipes/*")) if os.path.isdir(p) and not p.endswith("__pycache__")}
    with_demo = {os.path.basename(os.path.dirname(os.path.dirname(c))) for c in CONFIGS if c.endswith("demo.yaml")}
    assert recipes and recipes <= with_demo


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: os.path.relpath(c, ROOT))
def test_config_parses(config, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        run(recipe_module_class(config), args=["fit", "--config", config, "--print_config"])
    assert exit_info.value.code in (0, None), out.getvalue()
    assert "model:" in out.getvalue() and "data:" in out.getvalue()
