"""The landmark detector every method is fine-tuned as, and the mean-shape reference."""

from __future__ import annotations

import math

import lightning.pytorch as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.trainer.states import TrainerFn
from torch.optim.swa_utils import update_bn

from landmark_bench.geometry import to_original
from landmark_bench.heatmaps import (
    decode_heatmaps,
    disc_targets,
    pixel_cross_entropy,
    spatial_softmax_cross_entropy,
)
from landmark_bench.metrics import expected_radial_error

LOSSES = ("softmax_ce", "pixel_ce")
PROTOCOLS = ("finetune", "probe")
PROBE_BATCHNORM = ("train_split", "pretrained")


class _Pyramid(nn.Module):
    """A backbone seen through its feature pyramid: the part of it a probe reads."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        return self.backbone.pyramid(image)


def calibrate_batchnorm(backbone: nn.Module, images: torch.Tensor, chunk_size: int = 32) -> None:
    """Re-estimate the BatchNorm statistics of ``backbone``'s feature pyramid on ``images`` (AdaBN); weights untouched.

    A frozen network in eval mode normalises with its stored statistics, and a random-init control has none: its
    buffers hold the placeholders mean 0, variance 1, which turn its BatchNorm into a no-op, so the control would be
    probed as a different, unnormalised network while each pretrained one uses statistics of its pretraining views.
    Estimating every probed backbone's statistics on the same target images puts them on one footing. Torch averages
    the chunks' statistics with equal weight, so the images are split into chunks of near-equal size. A backbone
    without BatchNorm (the diffusion UNet's GroupNorm) is left as it is.
    """
    chunks = torch.tensor_split(images, max(1, math.ceil(len(images) / chunk_size)))
    with torch.no_grad():
        update_bn(chunks, _Pyramid(backbone).train(backbone.training))  # the backbone's mode is kept


class ProbeHead(nn.Module):
    """A light head over a frozen feature pyramid: what the probe protocol trains.

    Each level is standardised (BatchNorm, so random and pretrained features of any scale start alike),
    projected by a 1x1 convolution, resampled to the fusion size and summed; one ReLU and a 3x3 convolution give
    the heatmap logits, upsampled to the input size. The fusion size is the finest level's, but at most half the
    input size: an encoder's finest level is at stride 2, and a UNet's full-resolution level is average-pooled to
    stride 2 before its projection, so every family's head does the same work at the same resolution (at full
    resolution the UNet's head cost several times the encoder's). A pretrained probe and its random-init control
    differ only by the frozen weights.
    """

    def __init__(self, in_channels: list[int], out_channels: int, hidden: int = 64):
        super().__init__()
        self.levels = nn.ModuleList(
            nn.Sequential(nn.BatchNorm2d(channels), nn.Conv2d(channels, hidden, 1)) for channels in in_channels
        )
        self.out = nn.Conv2d(hidden, out_channels, 3, padding=1)

    @staticmethod
    def _at_most(features: torch.Tensor, fusion: tuple[int, int]) -> torch.Tensor:
        """A level finer than the fusion size, area-averaged down to it; any other level as it is."""
        if math.prod(features.shape[-2:]) <= math.prod(fusion):
            return features
        return F.adaptive_avg_pool2d(features, fusion)

    def forward(self, pyramid: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        finest = max((tuple(features.shape[-2:]) for features in pyramid), key=math.prod)
        fusion = min(finest, (math.ceil(size[0] / 2), math.ceil(size[1] / 2)), key=math.prod)
        fused = sum(
            F.interpolate(level(self._at_most(features, fusion)), size=fusion, mode="bilinear", align_corners=False)
            for level, features in zip(self.levels, pyramid, strict=True)
        )
        logits = self.out(F.relu(fused))
        if tuple(logits.shape[-2:]) == tuple(size):
            return logits
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def warmup_cosine(step: int, warmup_steps: int, max_steps: int) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to zero at ``max_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return 0.5 * (1 + math.cos(math.pi * progress))


class LandmarkDetector(L.LightningModule):
    """A backbone giving dense features and a new output layer giving one heatmap per landmark at the input size.

    ``softmax_ce`` (default): each landmark's heatmap is a distribution over pixels, trained by
    cross-entropy against a Gaussian target. ``pixel_ce``: Di Via et al.'s per-pixel cross-entropy
    across landmark channels plus background against disc targets.

    ``protocol="finetune"`` trains the whole network. ``protocol="probe"`` freezes the backbone (no gradient,
    always in eval mode, so not even BatchNorm statistics move while the head trains; ``finetune`` has set them
    before with :func:`calibrate_batchnorm`) and trains only a :class:`ProbeHead` on the backbone's feature
    pyramid: it measures what pretraining taught rather than what a few images can re-teach. The frozen features
    of the training and validation images are computed once and cached (the probe trains without augmentation,
    so they never change).
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        num_landmarks: int,
        loss: str = "softmax_ce",
        disc_radius: float = 3.0,
        refine_window: int = 2,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        max_steps: int = 500,
        warmup_steps: int = 50,
        channels_last: bool | None = None,
        protocol: str = "finetune",
        probe_channels: int = 64,
    ):
        """``backbone``: (B, 1, H, W) images in [0, 1] to full-resolution features (``out_channels``), with a
        ``pyramid`` of multi-scale features (``pyramid_channels``) for the probe; built by the method registry."""
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"])
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; valid losses: {', '.join(LOSSES)}")
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r}; valid protocols: {', '.join(PROTOCOLS)}")
        self.backbone = backbone
        channels = num_landmarks + (1 if loss == "pixel_ce" else 0)
        self._feature_cache: dict[tuple[str, int], list[torch.Tensor]] = {}
        if protocol == "probe":
            self.backbone.requires_grad_(False)
            self.backbone.eval()
            self.head = ProbeHead(self.backbone.pyramid_channels, channels, probe_channels)
        else:
            self.head = nn.Conv2d(self.backbone.out_channels, channels, 3, padding=1)
        if channels_last is None:  # the backbone's measured preference (benchmarks/RESULTS.md)
            self.hparams.channels_last = channels_last = self.backbone.channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)

    @property
    def probing(self) -> bool:
        return self.hparams.protocol == "probe"

    def train(self, mode: bool = True) -> "LandmarkDetector":
        """A probed backbone stays in eval mode whatever the Trainer asks."""
        super().train(mode)
        if self.probing:
            self.backbone.eval()
        return self

    @torch.no_grad()
    def _frozen_pyramid(self, image: torch.Tensor, split: str | None, index: torch.Tensor | None) -> list[torch.Tensor]:
        """The frozen backbone's feature pyramid, from the cache for images of ``split`` already seen."""
        if split is None or index is None:
            return self.backbone.pyramid(image)
        keys = [(split, int(i)) for i in index]
        missing = [row for row, key in enumerate(keys) if key not in self._feature_cache]
        if missing:
            computed = self.backbone.pyramid(image[missing])
            for position, row in enumerate(missing):
                self._feature_cache[keys[row]] = [level[position] for level in computed]
        return [torch.stack(levels) for levels in zip(*(self._feature_cache[key] for key in keys))]

    def _logits(self, image: torch.Tensor, split: str | None = None, index: torch.Tensor | None = None) -> torch.Tensor:
        """Heatmap logits; under mixed precision the backbone runs in low precision and the head in float32, so the
        sub-pixel decoding reads logits at full precision (bf16 keeps 8 significant bits: a logit near 10 is off by up
        to 0.03, 3% of its softmax weight)."""
        if self.hparams.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        if self.probing:
            pyramid = self._frozen_pyramid(image, split, index)
            with torch.autocast(image.device.type, enabled=False):
                return self.head([level.float() for level in pyramid], image.shape[-2:])
        features = self.backbone(image)
        with torch.autocast(image.device.type, enabled=False):
            logits = self.head(features.float())
        if logits.shape[-2:] == image.shape[-2:]:
            return logits
        # a backbone read at a coarser stride (DiffusionBackbone.feature_stride): the maps at the input size, as the
        # probe head's
        return F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) image in [0, 1] -> (B, L, H, W) landmark heatmap logits."""
        return self._heatmaps(self._logits(image))

    def _heatmaps(self, logits: torch.Tensor) -> torch.Tensor:
        """One map per landmark whose spatial peak is the prediction. ``pixel_ce`` is a per-pixel softmax over the
        channels, blind to a per-pixel shift of all logits, so its raw maps mean nothing across pixels: its maps are
        each landmark class's per-pixel log-probability."""
        return logits.log_softmax(dim=1)[:, 1:] if self.hparams.loss == "pixel_ce" else logits

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self._logits(batch["image"], "train", batch.get("index"))
        if self.hparams.loss == "pixel_ce":
            target = disc_targets(batch["landmarks"], logits.shape[-2:], self.hparams.disc_radius)
            loss = pixel_cross_entropy(logits, target)
        else:
            loss = spatial_softmax_cross_entropy(logits, batch["target"])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss ({loss.item()}) at step {self.global_step}")
        self.log("train/loss", loss, prog_bar=True, batch_size=len(logits))
        return loss

    def infer(self, batch: dict, split: str | None = None, with_ere: bool = True) -> dict[str, torch.Tensor | None]:
        """Predictions in original pixels, their ERE (None without ``with_ere``), and the heatmap logits (``split``:
        cache key of a probe)."""
        logits = self._heatmaps(self._logits(batch["image"], split, batch.get("index")))
        points = decode_heatmaps(logits.float(), self.hparams.refine_window)
        pred = to_original(points, batch["orig_size"], logits.shape[-2:])
        ere = expected_radial_error(logits.float(), pred, batch["orig_size"], batch["spacing"]) if with_ere else None
        return {"pred": pred, "ere": ere, "logits": logits}

    def validation_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor | None]:
        """ERE only in the validation pass that ends a fit (the run's reported validation figures) and outside a fit:
        no model selection reads it, and its float64 map over every pixel of every landmark is the costliest part of
        a pass when there are many landmarks and validation images (AASCE 2019)."""
        trainer = self.trainer
        final = trainer.state.fn != TrainerFn.FITTING or trainer.global_step >= trainer.max_steps
        return self.infer(batch, "val", with_ere=final)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        return self.infer(batch)

    def configure_optimizers(self):
        trained = [parameter for parameter in self.parameters() if parameter.requires_grad]
        optimizer = torch.optim.AdamW(trained, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
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

