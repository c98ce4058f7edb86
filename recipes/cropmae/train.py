"""Pretrain a Siamese cropped masked autoencoder: python recipes/cropmae/train.py fit --config recipes/cropmae/configs/demo.yaml"""

from core.cli import run
from recipes.cropmae.model import CropMAE

if __name__ == "__main__":
    run(CropMAE)
