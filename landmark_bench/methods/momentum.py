"""Shared bases of the self-supervised baselines.

``EncoderPretrainer`` holds what SimCLR, MoCo v3 and DINO have in common: the suite's encoder
stored as ``self.encoder`` (so checkpoint keys are ``encoder.*`` and load straight into the
detector), its pooled representation, AdamW with linear warmup and cosine decay, and the method tag
written into every checkpoint. ``MomentumPretrainer`` adds, as in solo-learn, the exponential moving
average of ``momentum_pairs`` after every optimiser step with a cosine momentum schedule (lightly's
``cosine_schedule``/``update_momentum``).
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import lightning.pytorch as L
import torch
import torch.nn as nn
from lightly.models.utils import deactivate_requires_grad, get_weight_decay_parameters, update_momentum
from lightly.utils.scheduler import CosineWarmupScheduler, cosine_schedule
from torch import Tensor

from landmark_bench.checkpoints import METHOD_KEY, read_checkpoint, strip_prefix
from landmark_bench.models.encoder import create_encoder

ENCODER_PREFIX = "encoder."


def pooled_representation(encoder: nn.Module, images: Tensor) -> Tensor:
    """Global average pool of the encoder's last (deepest) feature map: ``(B, C)``."""
    return encoder(images)[-1].mean(dim=(2, 3))


def momentum_copy(module: nn.Module) -> nn.Module:
    """A frozen deep copy that only ever changes by ``update_momentum``."""
    copied = copy.deepcopy(module)
    deactivate_requires_grad(copied)
    return copied


def read_encoder_state(checkpoint_path: str, method: str) -> dict[str, Tensor]:
    """The ``encoder.*`` weights of a ``method`` checkpoint, keyed as in ``create_encoder(name)``.

    A checkpoint of another method, or one with no ``encoder.*`` keys, raises ``CheckpointError``.
    """
    checkpoint = read_checkpoint(checkpoint_path, expected_method=method)
    return strip_prefix(checkpoint["state_dict"], ENCODER_PREFIX, checkpoint_path)


class EncoderPretrainer(L.LightningModule):
    """Encoder, representation, optimiser and checkpoint tag shared by the encoder-based methods."""

    method: ClassVar[str]

    def __init__(self, encoder: str, max_steps: int, lr: float, weight_decay: float, warmup_steps: int) -> None:
        super().__init__()
        if not 0 <= warmup_steps <= max_steps:
            raise ValueError(f"warmup_steps={warmup_steps} must lie in [0, max_steps={max_steps}]")
        self.encoder = create_encoder(encoder)
        self.feature_dim: int = self.encoder.feature_info.channels()[-1]
        self.max_steps = max_steps
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps

    def on_fit_start(self) -> None:
        """Every schedule (learning rate, momentum, teacher temperature) is laid out over ``max_steps``."""
        if self.trainer.max_steps != self.max_steps:
            raise ValueError(
                f"Trainer(max_steps={self.trainer.max_steps}) differs from the module's max_steps={self.max_steps}"
            )

    def forward(self, images: Tensor) -> Tensor:
        return pooled_representation(self.encoder, images)

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW, no weight decay on norms and biases, per-step linear warmup then cosine decay.

        Frozen parameters (momentum copies, DINO's fixed weight-norm gain) are left out.
        """
        decayed, not_decayed = get_weight_decay_parameters([self])
        optimizer = torch.optim.AdamW(
            [
                {"params": [p for p in decayed if p.requires_grad]},
                {"params": [p for p in not_decayed if p.requires_grad], "weight_decay": 0.0},
            ],
            lr=self.lr,
            weight_decay=self.weight_decay,
        )
        scheduler = CosineWarmupScheduler(optimizer, warmup_epochs=self.warmup_steps, max_epochs=self.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[METHOD_KEY] = self.method


class MomentumPretrainer(EncoderPretrainer, ABC):
    """Momentum (EMA) targets updated after each optimiser step, momentum cosine-scheduled to ``final_momentum``."""

    def __init__(self, base_momentum: float, final_momentum: float, **encoder_pretrainer_kwargs: Any) -> None:
        super().__init__(**encoder_pretrainer_kwargs)
        self.base_momentum = base_momentum
        self.final_momentum = final_momentum
        self._last_momentum_step = 0

    @property
    @abstractmethod
    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """``(online, momentum)`` module pairs; each momentum module follows its online one."""

    def momentum_at(self, optimizer_step: int) -> float:
        """The EMA momentum used after optimiser step ``optimizer_step`` (0-based)."""
        return cosine_schedule(
            step=optimizer_step,
            max_steps=self.max_steps,
            start_value=self.base_momentum,
            end_value=self.final_momentum,
        )

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # With gradient accumulation a batch need not end in an optimiser step: update only after one.
        if self.global_step > self._last_momentum_step:
            momentum = self.momentum_at(self.global_step - 1)
            for online, target in self.momentum_pairs:
                update_momentum(online, target, m=momentum)
            self.log("momentum", momentum)
        self._last_momentum_step = self.global_step
