"""Pretrain with BYOL: python recipes/byol/train.py fit --config recipes/byol/configs/demo.yaml"""

from core.cli import run
from recipes.byol.model import BYOL

if __name__ == "__main__":
    run(BYOL)
