"""A U-Net decoder over a timm feature pyramid: the encoder methods' full-resolution backbone."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

# ImageNet's RGB statistics averaged to one grey channel: what the ImageNet weights expect, and a
# harmless standardisation for every other encoder-based method.
GREY_MEAN, GREY_STD = 0.449, 0.226


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class EncoderBackbone(nn.Module):
    """timm encoder (``features_only``) + U-Net decoder, returning features at input resolution.

    Skip connections keep the fine detail landmarks need; the last block works at full resolution
    so a heatmap peak can be placed to a network pixel before sub-pixel refinement.
    """

    channels_last = True
    """oneDNN runs this network's convolutions faster on NHWC: 2.66 vs 2.35 steps/s on 2 CPU cores (benchmarks/RESULTS.md)."""

    def __init__(self, encoder: nn.Module, decoder_channels: Sequence[int] = (64, 32, 24, 16, 16)):
        super().__init__()
        self.encoder = encoder
        skips = list(encoder.feature_info.channels())[::-1]  # deepest first
        if len(decoder_channels) != len(skips):
            raise ValueError(f"decoder_channels needs {len(skips)} entries, one per encoder stage")
        blocks, channels = [], skips[0]
        for skip, out in zip([*skips[1:], 0], decoder_channels):
            blocks.append(conv_block(channels + skip, out))
            channels = out
        self.blocks = nn.ModuleList(blocks)
        self.out_channels = channels
        self.pyramid_channels: list[int] = skips

    def pyramid(self, image: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's feature maps, deepest first: what pretraining taught (the decoder is new)."""
        return self.encoder((image - GREY_MEAN) / GREY_STD)[::-1]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) image in [0, 1] -> (B, out_channels, H, W) features."""
        features = self.pyramid(image)
        x = features[0]
        for block, skip in zip(self.blocks, [*features[1:], None]):
            size = skip.shape[-2:] if skip is not None else image.shape[-2:]
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], 1) if skip is not None else x)
        return x
