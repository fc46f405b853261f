"""Training losses kept apart from the LightningModules, so tests can check them on their own."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def guidance_alignment_loss(
    cond_1: list[Tensor], null_1: list[Tensor], cond_2: list[Tensor], null_2: list[Tensor]
) -> tuple[Tensor, Tensor]:
    """CDPM-Align's alignment loss: the guidance direction should not depend on the timestep.

    Each argument holds one decoder feature map (B, C_s, H_s, W_s) per scale s: ``cond_i`` from
    ``f(x_ti, ti, y)`` and ``null_i`` from ``f(x_ti, ti, ∅)``. The guidance at scale s is
    ``g_i = cond_i - null_i``; its cosine between the two timesteps is taken over each sample's flattened
    map, averaged over the batch, and the loss is ``mean_s (1 - cos_s)``.

    Returns the loss and the per-scale mean cosines (S,), the latter for logging.
    """
    if not len(cond_1) == len(null_1) == len(cond_2) == len(null_2) > 0:
        raise ValueError("need the same, non-zero number of scales in all four feature lists")
    cosines = []
    for c1, n1, c2, n2 in zip(cond_1, null_1, cond_2, null_2, strict=True):
        guidance_1 = (c1.float() - n1.float()).flatten(1)
        guidance_2 = (c2.float() - n2.float()).flatten(1)
        cosines.append(F.cosine_similarity(guidance_1, guidance_2, dim=1).mean())
    per_scale_cosine = torch.stack(cosines)
    return (1 - per_scale_cosine).mean(), per_scale_cosine
