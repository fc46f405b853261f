"""Shared bases of the self-supervised baselines.

``EncoderPretrainer`` holds what SimCLR, MoCo v3 and DINO have in common: the suite's encoder
stored as ``self.encoder`` (so checkpoint keys are ``encoder.*`` and load straight into the
detector), its pooled representation, AdamW with linear warmup and cosine decay, the method tag
written into every checkpoint, and the health record: every step's loss is kept (and carried through
checkpoints, so a resumed run still has them) so that the run can show its final loss against the
loss of a model that has learned nothing (``chance_loss``). ``MomentumPretrainer`` adds, as in
solo-learn, the exponential moving average of ``momentum_pairs`` after every optimiser step with a
cosine momentum schedule (lightly's ``cosine_schedule``/``update_momentum``).
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import lightning.pytorch as L
import torch
import torch.nn as nn
from lightly.models.utils import deactivate_requires_grad, get_weight_decay_parameters, update_momentum
from lightly.utils.scheduler import CosineWarmupScheduler, cosine_schedule
from torch import Tensor

from landmark_bench.checkpoints import METHOD_KEY, read_checkpoint, strip_prefix
from landmark_bench.methods.base import BackboneSpec, encoder_architecture
from landmark_bench.methods.views import XRayViews, two_views
from landmark_bench.models.encoder import create_encoder
from landmark_bench.presets import SSL_DEFAULTS

ENCODER_PREFIX = "encoder."
LOSS_HISTORY_KEY = "landmark_bench_loss_history"
# The health record's final loss is the mean over this share of the last steps, and the run has learned when
# that is at most LEARNED_RATIO times the chance loss.
FINAL_FRACTION = 0.1
LEARNED_RATIO = 0.8


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


class EncoderPretrainer(L.LightningModule, ABC):
    """Encoder, representation, optimiser, checkpoint tag and health record shared by the encoder-based methods,
    and their hand-over: fine-tuning starts from ``encoder.*`` in the checkpoint (``backbone``)."""

    name: ClassVar[str]
    family: ClassVar[str] = "encoder"
    pretrains: ClassVar[bool] = True

    @classmethod
    def views_transform(cls, **settings: Any) -> XRayViews:
        """The views of one image (``batch["views"]``); two views by default, ``settings`` as ``views.two_views``."""
        return two_views(**settings)

    @classmethod
    def default_settings(cls, preset: str) -> dict[str, Any]:
        """Pretraining settings of a method with no entry of its own in the preset: the preset's common SSL ones."""
        return copy.deepcopy(SSL_DEFAULTS[preset])

    @classmethod
    def encoder_state_dict(cls, checkpoint_path: str) -> dict[str, Tensor]:
        """The trained encoder of a checkpoint, loadable with ``strict=True`` into ``create_encoder(name)``."""
        return read_encoder_state(checkpoint_path, cls.name)

    @classmethod
    def architecture(cls, spec: BackboneSpec, hyper_parameters: dict | None = None) -> nn.Module:
        """The encoder family's network: the pretraining's hyperparameters do not change its shape."""
        return encoder_architecture(spec)

    @classmethod
    def backbone(cls, spec: BackboneSpec, checkpoint: str | None) -> nn.Module:
        network = cls.architecture(spec)
        network.encoder.load_state_dict(cls.encoder_state_dict(checkpoint), strict=True)
        return network

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
        self.loss_history: list[float] = []  # every step's loss, averaged over ranks
        self.global_batch_size = 0  # images per step over all ranks: sets the chance level of contrastive losses

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

    def track_loss(self, loss: Tensor, batch_size: int) -> None:
        """Log ``train/loss`` and keep it for ``health_record``; ``batch_size`` is this rank's."""
        self.log("train/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch_size)
        self.loss_history.append(float(self.trainer.strategy.reduce(loss.detach(), reduce_op="mean")))
        self.global_batch_size = batch_size * self.trainer.world_size

    @abstractmethod
    def chance_loss(self) -> tuple[float, str]:
        """The loss of a model whose outputs cannot tell the candidates apart, and its formula."""

    def health_record(self, datamodule: L.LightningDataModule) -> dict[str, Any]:
        """Whether the pretraining learned: its final loss (mean of the last steps) against ``chance_loss``."""
        losses = self.loss_history
        if not losses:
            raise RuntimeError(f"{self.name}: no training step recorded, so there is no health record to give")
        chance, formula = self.chance_loss()
        window = max(1, math.ceil(FINAL_FRACTION * len(losses)))
        final = sum(losses[-window:]) / window
        learned = math.isfinite(final) and final <= LEARNED_RATIO * chance
        dataset = getattr(datamodule, "dataset", None)
        return {
            "method": self.name,
            "learned": learned,
            "summary": f"final loss {final:.2f} vs chance {formula} = {chance:.2f} ({final / chance:.0%} of chance)",
            "final_loss": final,
            "chance_loss": chance,
            "chance_formula": formula,
            "learned_if_final_below": LEARNED_RATIO * chance,
            "final_window_steps": window,
            "first_loss": losses[0],
            "min_loss": min(losses),
            "steps": len(losses),
            "global_batch_size": self.global_batch_size,
            "pretraining_images": len(dataset) if dataset is not None else None,
            **self.health_details(),
        }

    def health_details(self) -> dict[str, Any]:
        """Method-specific figures for the health record (e.g. DINO's collapse check); none by default."""
        return {}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[METHOD_KEY] = self.name
        checkpoint[LOSS_HISTORY_KEY] = {"losses": list(self.loss_history), "global_batch_size": self.global_batch_size}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A resumed run goes on from the checkpoint's step: keep the losses up to there.
        history = checkpoint.get(LOSS_HISTORY_KEY, {})
        self.loss_history = list(history.get("losses", []))
        self.global_batch_size = history.get("global_batch_size", 0)


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
            self.log("train/momentum", momentum)
        self._last_momentum_step = self.global_step
