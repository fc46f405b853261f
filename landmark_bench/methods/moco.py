"""MoCo v3 (Chen, Xie & He 2021) on unlabeled X-rays, for a convolutional encoder.

Online branch: encoder -> 3-layer projector (BN in every layer) -> 2-layer predictor; momentum
branch: EMA copies of encoder and projector. Loss: symmetric InfoNCE between each view's query and
the momentum key of the other view, negatives = the other keys of the batch (no queue), scaled by
``2 * temperature`` as in the reference code.

lightly 1.6 has no ``MoCoV3*Head`` classes: the projector is lightly's ``MoCoProjectionHead`` in its
documented v3 form (``num_layers=3, batch_norm=True``) and the predictor lightly's
``BYOLPredictionHead`` (Linear-BN-ReLU-Linear, MoCo v3's predictor). lightly's ``NTXentLoss`` is not
used: it adds query-query negatives and key anchors, which is SimCLR's loss, not MoCo v3's.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from lightly.models.modules import BYOLPredictionHead, MoCoProjectionHead
from lightly.utils import dist
from torch import Tensor

from landmark_bench.methods.base import register
from landmark_bench.methods.momentum import MomentumPretrainer, momentum_copy, pooled_representation
from landmark_bench.methods.views import XRayViews, two_views


def mocov3_contrastive_loss(queries: Tensor, keys: Tensor, temperature: float) -> Tensor:
    """InfoNCE of MoCo v3: query ``i`` must pick key ``i`` among the keys of the (global) batch."""
    queries = F.normalize(queries, dim=1)
    keys = F.normalize(keys, dim=1)
    if dist.world_size() > 1:
        keys = torch.cat(dist.gather(keys))
    logits = queries @ keys.T / temperature
    labels = torch.arange(len(queries), device=queries.device) + dist.rank() * len(queries)
    return F.cross_entropy(logits, labels) * (2 * temperature)


@register
class MoCoV3(MomentumPretrainer):
    """MoCo v3 pretraining; fine-tuning takes the online encoder (``encoder.*``), as MoCo v3 evaluates."""

    name = "moco"

    @classmethod
    def views_transform(cls, **settings: Any) -> XRayViews:
        """MoCo v3's asymmetric two views (blur probability 1.0 / 0.1); ``settings`` go to ``views.two_views``."""
        return two_views(**{"blur_probs": (1.0, 0.1), **settings})

    def __init__(
        self,
        *,
        max_steps: int,
        encoder: str = "efficientnet_lite0",
        projection_hidden_dim: int = 4096,
        projection_dim: int = 256,
        prediction_hidden_dim: int = 4096,
        temperature: float = 0.2,
        base_momentum: float = 0.99,
        final_momentum: float = 1.0,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_steps: int = 0,
    ) -> None:
        super().__init__(
            encoder=encoder,
            max_steps=max_steps,
            lr=lr,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            base_momentum=base_momentum,
            final_momentum=final_momentum,
        )
        self.save_hyperparameters()
        self.projection_head = MoCoProjectionHead(
            input_dim=self.feature_dim,
            hidden_dim=projection_hidden_dim,
            output_dim=projection_dim,
            num_layers=3,
            batch_norm=True,
        )
        self.prediction_head = BYOLPredictionHead(
            input_dim=projection_dim, hidden_dim=prediction_hidden_dim, output_dim=projection_dim
        )
        self.momentum_encoder = momentum_copy(self.encoder)
        self.momentum_projection_head = momentum_copy(self.projection_head)
        self.temperature = temperature

    @property
    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.encoder, self.momentum_encoder), (self.projection_head, self.momentum_projection_head)]

    def query(self, images: Tensor) -> Tensor:
        return self.prediction_head(self.projection_head(self(images)))

    @torch.no_grad()
    def key(self, images: Tensor) -> Tensor:
        return self.momentum_projection_head(pooled_representation(self.momentum_encoder, images))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        first_view, second_view = batch["views"]
        # One pass per view, as in MoCo v3: batch-norm statistics never mix the two views.
        first_query, second_query = self.query(first_view), self.query(second_view)
        first_key, second_key = self.key(first_view), self.key(second_view)
        loss = mocov3_contrastive_loss(first_query, second_key, self.temperature) + mocov3_contrastive_loss(
            second_query, first_key, self.temperature
        )
        self.track_loss(loss, batch_size=len(first_view))
        return loss

    def chance_loss(self) -> tuple[float, str]:
        """Two directions, each ``2 * temperature * ln(B)``: cross-entropy over the B keys, scaled as in MoCo v3."""
        batch, temperature = self.global_batch_size, self.temperature
        return 4 * temperature * math.log(batch), f"4 * {temperature:g} * ln({batch})"

