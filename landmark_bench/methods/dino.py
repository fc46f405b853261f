"""DINO (Caron et al. 2021) on unlabeled X-rays, modelled on lightly's ImageNet ResNet-50 benchmark.

Student: encoder -> lightly ``DINOProjectionHead``, trained on 2 global + N local crops. Teacher: EMA
copies of both, fed the global crops only. lightly ``DINOLoss`` with centering; the teacher
temperature warms up linearly over the first ``teacher_temp_warmup_steps`` and the
last layer of the head stays frozen for the first ``freeze_last_layer_steps`` steps (its gradients
are dropped after backward, as in the reference code).

The output dimension defaults to 2048, not DINO's 65536: that figure is sized for ImageNet's 1.28 M
images, and a few hundred X-rays cannot fill that many prototypes.

The defaults are DINO's for a long run. A run of a few hundred steps needs other settings (the ``cpu``
preset, see ``results/selection/ssl.md``): with momentum 0.99 or more the teacher stays the random
network it started as, whose targets on a fresh encoder are near-uniform, so the student only learns to
copy them and the loss sits at ``ln(output_dim)``. A low loss alone does not prove learning either: a
teacher that gives every image the same few outputs also scores well, which is why the teacher's
entropies are logged (``log_teacher_entropies``) and reported in the health record. DINOv2's two answers to
collapse are settings: Sinkhorn-Knopp centering (``centering="sinkhorn"``) and the KoLeo term (``koleo_weight``).
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightly.loss import DINOLoss, KoLeoLoss
from lightly.loss.swav_loss import sinkhorn
from lightly.models.modules import DINOProjectionHead
from lightly.models.utils import deactivate_requires_grad
from lightly.utils.scheduler import linear_warmup_schedule
from torch import Tensor
from torch.optim import Optimizer

from landmark_bench.methods.base import register
from landmark_bench.methods.momentum import MomentumPretrainer, momentum_copy, pooled_representation
from landmark_bench.methods.views import XRayViews, multi_crop_views

METHOD = "dino"
# Nats by which the batch-mean teacher target must be flatter than the per-image ones for a low loss to count as
# learning: below it, every image gets nearly the same target (a collapse onto a few outputs).
MIN_TARGET_SPREAD = 0.5
CENTERINGS = ("mean", "sinkhorn")


def cross_view_entropy(targets: Tensor, student_out: Tensor, student_temp: float) -> Tensor:
    """DINO's loss for given teacher targets ``(T, B, K)`` and student logits ``(S, B, K)``: the mean
    cross-entropy over every (teacher view, student view) pair but a view with itself."""
    log_probs = F.log_softmax(student_out / student_temp, dim=-1)
    pair_losses = -torch.einsum("tbk,sbk->ts", targets, log_probs)
    pair_losses.fill_diagonal_(0)
    pairs = pair_losses.numel() - min(pair_losses.shape)
    return pair_losses.sum() / (pairs * targets.shape[1])


@register
class DINO(MomentumPretrainer):
    """DINO pretraining; fine-tuning takes the student encoder (``encoder.*``), the one trained by gradient.

    Batches carry ``batch["views"]``: 2 global ``(B, 1, H, H)`` tensors, then the local ``(B, 1, h, h)`` ones.
    """

    name = "dino"

    @classmethod
    def views_transform(cls, **settings: Any) -> XRayViews:
        """DINO's multi-crop (2 global + ``n_local`` local views); ``settings`` go to ``views.multi_crop_views``."""
        return multi_crop_views(**settings)

    def __init__(
        self,
        *,
        max_steps: int,
        encoder: str = "efficientnet_lite0",
        head_hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        output_dim: int = 2048,
        head_batch_norm: bool = False,
        freeze_last_layer_steps: int = 0,
        student_temp: float = 0.1,
        warmup_teacher_temp: float = 0.04,
        teacher_temp: float = 0.07,
        teacher_temp_warmup_steps: int = 0,
        center_momentum: float = 0.9,
        centering: str = "mean",
        koleo_weight: float = 0.0,
        base_momentum: float = 0.996,
        final_momentum: float = 1.0,
        lr: float = 1e-3,
        weight_decay: float = 0.04,
        warmup_steps: int = 0,
    ) -> None:
        if centering not in CENTERINGS:
            raise ValueError(f"dino: centering must be one of {CENTERINGS}, got {centering!r}")
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
        self.projection_head, self.teacher_head = (
            DINOProjectionHead(
                input_dim=self.feature_dim,
                hidden_dim=head_hidden_dim,
                bottleneck_dim=bottleneck_dim,
                output_dim=output_dim,
                batch_norm=head_batch_norm,
                freeze_last_layer=freeze_last_layer_steps,
            )
            for _ in range(2)
        )
        # A weight-normed layer cannot be deep-copied: the teacher head is a twin given the student's weights.
        self.teacher_head.load_state_dict(self.projection_head.state_dict())
        deactivate_requires_grad(self.teacher_head)
        self.teacher_encoder = momentum_copy(self.encoder)
        self.criterion = DINOLoss(output_dim=output_dim, student_temp=student_temp, center_momentum=center_momentum)
        self.koleo = KoLeoLoss()
        self.teacher_entropies: dict[str, float] = {}

    @property
    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.encoder, self.teacher_encoder), (self.projection_head, self.teacher_head)]

    def teacher_temperature(self, step: int) -> float:
        """Linear warm-up from ``warmup_teacher_temp`` to ``teacher_temp``, then constant."""
        return linear_warmup_schedule(
            step=step,
            warmup_steps=self.hparams.teacher_temp_warmup_steps,
            start_value=self.hparams.warmup_teacher_temp,
            end_value=self.hparams.teacher_temp,
        )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        views = batch["views"]
        global_views = torch.cat(views[:2])
        with torch.no_grad():
            teacher_out = self.teacher_head(pooled_representation(self.teacher_encoder, global_views))
        # Global and local crops differ in size: one student pass per size.
        student_global = self(global_views)
        student_out = [self.projection_head(student_global)]
        if len(views) > 2:
            student_out.append(self.projection_head(self(torch.cat(views[2:]))))
        teacher_temp = self.teacher_temperature(self.global_step)
        targets = self.teacher_targets(teacher_out, teacher_temp)
        self.log_teacher_entropies(targets)
        student_out = torch.cat(student_out).chunk(len(views))
        if self.hparams.centering == "sinkhorn":
            loss = cross_view_entropy(
                torch.stack(targets.chunk(2)), torch.stack(student_out), self.hparams.student_temp
            )
        else:
            loss = self.criterion(
                teacher_out=list(teacher_out.chunk(2)), student_out=list(student_out), teacher_temp=teacher_temp
            )
        self.track_loss(loss, batch_size=len(views[0]))
        self.log("train/teacher_temp", teacher_temp)
        if self.hparams.koleo_weight:
            # DINOv2's KoLeo term, per global crop: spreads the student's pooled features over the batch.
            koleo = sum(self.koleo(features) for features in student_global.chunk(2)) / 2
            self.log("train/koleo", koleo)
            loss = loss + self.hparams.koleo_weight * koleo
        return loss

    @torch.no_grad()
    def teacher_targets(self, teacher_out: Tensor, teacher_temp: float) -> Tensor:
        """The teacher's soft targets ``(2B, K)``: DINO's centred, sharpened softmax (``centering="mean"``), or
        DINOv2's Sinkhorn-Knopp centering (``"sinkhorn"``), which spreads every batch evenly over the K outputs, so
        the batch cannot collapse onto a few of them, and sharpens what differs between images instead of
        subtracting a running mean."""
        if self.hparams.centering == "sinkhorn":
            logits = teacher_out.float()
            return sinkhorn(logits - logits.max(), iterations=3, epsilon=teacher_temp, gather_distributed=True)
        return torch.softmax((teacher_out - self.criterion.center[0]) / teacher_temp, dim=-1)

    @torch.no_grad()
    def log_teacher_entropies(self, probs: Tensor) -> None:
        """DINO's two ways to fail, told apart: a loss far below ``ln K`` can also be a collapse onto one output.

        ``teacher_entropy`` (per image, in nats) is low when targets are sharp; ``teacher_batch_entropy``
        (of the batch-mean target) is low when every image gets the same target. Learning: the first low,
        the second high; uniform collapse: both near ``ln K``; one-output collapse: both low.
        """
        mean_probs = probs.mean(dim=0)
        self.teacher_entropies = {
            "teacher_entropy": float(-(probs * probs.clamp_min(1e-12).log()).sum(dim=-1).mean()),
            "teacher_batch_entropy": float(-(mean_probs * mean_probs.clamp_min(1e-12).log()).sum()),
        }
        for name, value in self.teacher_entropies.items():
            self.log(f"train/{name}", value)

    def health_details(self) -> dict[str, Any]:
        """The last step's teacher entropies (see ``log_teacher_entropies``)."""
        return {f"last_{name}": value for name, value in self.teacher_entropies.items()}

    def health_record(self, datamodule: L.LightningDataModule) -> dict[str, Any]:
        """A loss below chance counts only if the teacher's targets differ between images (``MIN_TARGET_SPREAD``)."""
        record = super().health_record(datamodule)
        if self.teacher_entropies:
            spread = self.teacher_entropies["teacher_batch_entropy"] - self.teacher_entropies["teacher_entropy"]
            record.update(target_spread=spread, learned=record["learned"] and spread >= MIN_TARGET_SPREAD)
            record["summary"] += f"; teacher targets spread {spread:.2f} nats between images"
        return record

    def chance_loss(self) -> tuple[float, str]:
        """Cross-entropy against a uniform student over the K outputs, DINO's collapsed plateau."""
        return math.log(self.hparams.output_dim), f"ln({self.hparams.output_dim})"

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        # After backward, before the step: the only place where dropping the gradients freezes the layer.
        # Counted in steps (lightly's argument is named for epochs), as every schedule here.
        self.projection_head.cancel_last_layer_gradients(self.global_step)

