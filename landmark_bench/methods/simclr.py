"""SimCLR (Chen et al. 2020) on unlabeled X-rays, modelled on lightly's ImageNet ResNet-50 benchmark.

Encoder -> global average pool -> lightly ``SimCLRProjectionHead`` -> lightly ``NTXentLoss`` between
the two views, negatives from the whole batch (gathered across devices under DDP).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from torch import Tensor

from landmark_bench.methods.base import register
from landmark_bench.methods.momentum import EncoderPretrainer
from landmark_bench.methods.views import XRayViews, two_views

@register
class SimCLR(EncoderPretrainer):
    """SimCLR pretraining of the suite's encoder; batches carry ``batch["views"]`` = two ``(B, 1, h, w)`` tensors."""

    name = "simclr"

    @classmethod
    def views_transform(cls, **settings: Any) -> XRayViews:
        """SimCLR's two symmetric views (blur probability 0.5 each); ``settings`` go to ``views.two_views``."""
        return two_views(**{"blur_probs": (0.5, 0.5), **settings})

    def __init__(
        self,
        *,
        max_steps: int,
        encoder: str = "efficientnet_lite0",
        projection_hidden_dim: int = 2048,
        projection_dim: int = 128,
        temperature: float = 0.1,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_steps: int = 0,
    ) -> None:
        super().__init__(
            encoder=encoder, max_steps=max_steps, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps
        )
        self.save_hyperparameters()
        self.projection_head = SimCLRProjectionHead(
            input_dim=self.feature_dim, hidden_dim=projection_hidden_dim, output_dim=projection_dim
        )
        self.criterion = NTXentLoss(temperature=temperature, gather_distributed=True)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        views = batch["views"]
        # Both views in one pass, as in SimCLR: batch-norm statistics span the 2B images.
        projections = self.projection_head(self(torch.cat(views)))
        first, second = projections.chunk(len(views))
        loss = self.criterion(first, second)
        self.track_loss(loss, batch_size=len(first))
        return loss

    def chance_loss(self) -> tuple[float, str]:
        """NT-Xent's candidates for each of the 2B views: its positive and the 2B - 2 other views."""
        candidates = 2 * self.global_batch_size - 1
        return math.log(candidates), f"ln({candidates})"

