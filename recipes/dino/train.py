"""Pretrain with DINO: python recipes/dino/train.py fit --config recipes/dino/configs/demo.yaml"""

from core.cli import run
from recipes.dino.model import DINO

if __name__ == "__main__":
    run(DINO)
