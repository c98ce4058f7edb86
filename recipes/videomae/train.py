"""Pretrain a video masked autoencoder: python recipes/videomae/train.py fit --config recipes/videomae/configs/demo.yaml"""

from core.cli import run
from recipes.videomae.model import VideoMAE

if __name__ == "__main__":
    run(VideoMAE)
