"""Pretrain an audio masked autoencoder: python recipes/audiomae/train.py fit --config recipes/audiomae/configs/demo.yaml"""

from core.cli import run
from recipes.audiomae.model import AudioMAE

if __name__ == "__main__":
    run(AudioMAE)
