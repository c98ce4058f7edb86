"""Pretrain with SimSiam: python recipes/simsiam/train.py fit --config recipes/simsiam/configs/demo.yaml"""

from core.cli import run
from recipes.simsiam.model import SimSiam

if __name__ == "__main__":
    run(SimSiam)
