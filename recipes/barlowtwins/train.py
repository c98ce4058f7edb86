"""Pretrain with Barlow Twins: python recipes/barlowtwins/train.py fit --config recipes/barlowtwins/configs/demo.yaml"""

from core.cli import run
from recipes.barlowtwins.model import BarlowTwins

if __name__ == "__main__":
    run(BarlowTwins)
