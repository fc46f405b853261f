"""The landmark detector every method is fine-tuned as, and the mean-shape reference."""

from __future__ import annotations

import math

import lightning.pytorch as L
import torch
import torch.nn as nn

from landmark_bench.geometry import to_original
from landmark_bench.heatmaps import (
    decode_heatmaps,
    disc_targets,
    pixel_cross_entropy,
    spatial_softmax_cross_entropy,
)
from landmark_bench.metrics import expected_radial_error

LOSSES = ("softmax_ce", "pixel_ce")


def warmup_cosine(step: int, warmup_steps: int, max_steps: int) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to zero at ``max_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return 0.5 * (1 + math.cos(math.pi * progress))


class LandmarkDetector(L.LightningModule):
    """A backbone giving full-resolution features and a new output layer giving one heatmap per landmark.

    ``softmax_ce`` (default): each landmark's heatmap is a distribution over pixels, trained by
    cross-entropy against a Gaussian target. ``pixel_ce``: Di Via et al.'s per-pixel cross-entropy
    across landmark channels plus background against disc targets.
    """

    def __init__(
        self,
        *,
        num_landmarks: int,
        method: str = "scratch",
        encoder: str = "efficientnet_lite0",
        pretrained: str | None = None,
        dataset: str | None = None,
        diffusion_timestep: int | None = None,
        loss: str = "softmax_ce",
        disc_radius: float = 3.0,
        refine_window: int = 2,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        max_steps: int = 500,
        warmup_steps: int = 50,
        decoder_channels: tuple[int, ...] = (64, 32, 24, 16, 16),
        channels_last: bool | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; valid losses: {', '.join(LOSSES)}")
        from landmark_bench.methods import build_backbone  # the registry imports this module

        self.backbone = build_backbone(method, encoder=encoder, pretrained=pretrained, dataset=dataset,
                                       diffusion_timestep=diffusion_timestep, decoder_channels=decoder_channels)
        channels = num_landmarks + (1 if loss == "pixel_ce" else 0)
        self.head = nn.Conv2d(self.backbone.out_channels, channels, 3, padding=1)
        if channels_last is None:  # the backbone's measured preference (benchmarks/RESULTS.md)
            self.hparams.channels_last = channels_last = self.backbone.channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def _logits(self, image: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        return self.head(self.backbone(image))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) image in [0, 1] -> (B, L, H, W) landmark heatmap logits."""
        logits = self._logits(image)
        return logits[:, 1:] if self.hparams.loss == "pixel_ce" else logits

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self._logits(batch["image"])
        if self.hparams.loss == "pixel_ce":
            target = disc_targets(batch["landmarks"], logits.shape[-2:], self.hparams.disc_radius)
            loss = pixel_cross_entropy(logits, target)
        else:
            loss = spatial_softmax_cross_entropy(logits, batch["target"])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss ({loss.item()}) at step {self.global_step}")
        self.log("train/loss", loss, prog_bar=True, batch_size=len(logits))
        return loss

    def infer(self, batch: dict) -> dict[str, torch.Tensor]:
        """Predictions in original pixels, their ERE, and the heatmap logits."""
        logits = self(batch["image"])
        points = decode_heatmaps(logits.float(), self.hparams.refine_window)
        pred = to_original(points, batch["orig_size"], logits.shape[-2:])
        ere = expected_radial_error(logits.float(), pred, batch["orig_size"], batch["spacing"])
        return {"pred": pred, "ere": ere, "logits": logits}

    def validation_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        return self.infer(batch)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        return self.infer(batch)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, self.hparams.warmup_steps, self.hparams.max_steps)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class MeanShapeReference(L.LightningModule):
    """Predicts the few-shot subset's mean landmark positions (relative to the image) for every image.

    The floor every learned method must beat; it has no heatmap, so no ERE.
    """

    def __init__(self, mean_points: list[list[float]], network_size: tuple[int, int]):
        super().__init__()
        self.save_hyperparameters()
        self.register_buffer("mean_points", torch.tensor(mean_points, dtype=torch.float64))

    @classmethod
    def from_training_set(cls, landmarks_net: torch.Tensor, network_size: tuple[int, int]) -> "MeanShapeReference":
        return cls(landmarks_net.double().mean(0).tolist(), tuple(network_size))

    def infer(self, batch: dict) -> dict[str, torch.Tensor]:
        points = self.mean_points.expand(len(batch["orig_size"]), -1, -1)
        pred = to_original(points, batch["orig_size"], self.hparams.network_size)
        return {"pred": pred, "ere": None, "logits": None}

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        return self.infer(batch)

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        return self.infer(batch)

