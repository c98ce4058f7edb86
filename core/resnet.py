"""ResNet backbones (He et al., "Deep Residual Learning for Image Recognition", 2016) built from torchvision's
residual blocks, returning pooled features (B, D) instead of class logits."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

# depth: (block, blocks per stage), as in torchvision.
RESNETS = {18: (BasicBlock, [2, 2, 2, 2]), 34: (BasicBlock, [3, 4, 6, 3]), 50: (Bottleneck, [3, 4, 6, 3])}


def stage(block: type[nn.Module], inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """`blocks` residual blocks of width `planes`; the first one changes resolution and width."""
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes * block.expansion, 1, stride=stride, bias=False),
            nn.BatchNorm2d(planes * block.expansion),
        )
    layers = [block(inplanes, planes, stride, downsample)]
    layers += [block(planes * block.expansion, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class ResNet(nn.Module):
    """depth: 18, 34 or 50. small_images: the CIFAR stem of SimCLR/BYOL (3x3 stride-1 conv, no max-pool),
    which keeps 32-pixel inputs from shrinking to 1x1 before the last stage. width: channels of the stem
    and first stage (64 in the paper; stages double it), smaller for CPU-sized demos. zero_init_residual:
    the last BatchNorm of each block starts at zero, so every block starts as the identity (Goyal et al.
    2017). Weights start random: this project pretrains, and nothing is downloaded."""

    def __init__(self, depth: int = 50, small_images: bool = False, zero_init_residual: bool = True, width: int = 64):
        super().__init__()
        if depth not in RESNETS:
            raise ValueError(f"depth={depth} must be one of {sorted(RESNETS)}")
        if width < 1:
            raise ValueError(f"width={width} must be positive")
        self.config = dict(depth=depth, small_images=small_images, zero_init_residual=zero_init_residual, width=width)
        block, blocks = RESNETS[depth]
        if small_images:
            self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
            )
        stages, inplanes = [], width
        for i, n in enumerate(blocks):
            stages.append(stage(block, inplanes, width * 2**i, n, stride=1 if i == 0 else 2))
            inplanes = width * 2**i * block.expansion
        self.stages = nn.Sequential(*stages)
        self.embed_dim = inplanes
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        # torchvision's initialisation.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))  # (B, 3, H, W) -> (B, D, H / s, W / s)
        return x.mean(dim=(2, 3))  # global average pool: (B, D)
