"""The timm encoder shared by every encoder-based method (scratch, imagenet, simclr, moco, dino)."""

from __future__ import annotations

import timm
import torch.nn as nn


def create_encoder(name: str = "efficientnet_lite0", **kwargs) -> nn.Module:
    """A one-channel timm feature pyramid (``features_only``), randomly initialised.

    Every method builds its encoder here so that pretrained state dicts line up key for key.
    """
    return timm.create_model(name, pretrained=False, features_only=True, in_chans=1, **kwargs)
