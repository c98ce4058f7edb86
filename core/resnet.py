"""ResNet backbones (He et al., "Deep Residual Learning for Image Recognition", 2016) from torchvision,
returning pooled features (B, D) instead of class logits."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

RESNETS = {18: torchvision.models.resnet18, 34: torchvision.models.resnet34, 50: torchvision.models.resnet50}


class ResNet(nn.Module):
    """depth: 18, 34 or 50. small_images: the CIFAR stem of SimCLR/BYOL (3x3 stride-1 conv, no max-pool),
    which keeps 32-pixel inputs from shrinking to 1x1 before the last stage. Weights start random: this
    project pretrains, and nothing is downloaded."""

    def __init__(self, depth: int = 50, small_images: bool = False, zero_init_residual: bool = True):
        super().__init__()
        if depth not in RESNETS:
            raise ValueError(f"depth={depth} must be one of {sorted(RESNETS)}")
        self.config = dict(depth=depth, small_images=small_images, zero_init_residual=zero_init_residual)
        net = RESNETS[depth](weights=None, zero_init_residual=zero_init_residual)
        if small_images:
            net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        self.embed_dim = net.fc.in_features
        net.fc = nn.Identity()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, C, H, W) -> (B, D)
