"""Pretrain with VICReg: python recipes/vicreg/train.py fit --config recipes/vicreg/configs/demo.yaml"""

from core.cli import run
from recipes.vicreg.model import VICReg

if __name__ == "__main__":
    run(VICReg)
