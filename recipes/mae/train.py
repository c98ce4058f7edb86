"""Pretrain a masked autoencoder: python recipes/mae/train.py fit --config recipes/mae/configs/demo.yaml"""

from core.cli import run
from recipes.mae.model import MAE

if __name__ == "__main__":
    run(MAE)
