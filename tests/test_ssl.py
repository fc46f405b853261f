"""Self-supervised baselines (SimCLR, MoCo v3, DINO): views, learning, checkpoint hand-over."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as L
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset

from landmark_bench.checkpoints import CheckpointError
from landmark_bench.methods import dino, moco, simclr
from landmark_bench.models.encoder import create_encoder

# A small timm encoder keeps the tests fast; the methods treat every create_encoder name alike.
TEST_ENCODER = "resnet10t"
IMAGE_SIZE = 48
N_IMAGES = 16
TRAIN_STEPS = 30
# Milder views than the presets' so that a few dozen steps from random weights clearly learn.
MILD_VIEWS = {"rotation_prob": 0.0, "brightness": 0.2, "contrast": 0.2, "blur_sigmas": (0.1, 0.5)}
TWO_VIEW_SETTINGS = {"size": 32, "scale": (0.7, 1.0), **MILD_VIEWS}
MULTI_CROP_SETTINGS = {
    "global_size": 32,
    "global_scale": (0.7, 1.0),
    "local_size": 16,
    "local_scale": (0.3, 0.6),
    "n_local": 2,
    **MILD_VIEWS,
}


def phantom(index: int, size: int = IMAGE_SIZE) -> Image.Image:
    """A synthetic greyscale image whose identity survives crops and jitter: a grating of its own
    orientation and frequency under a bright ellipse ("bone") on a dark background."""
    angle = np.pi * (index % 8) / 8
    frequency = 0.5 + 0.4 * (index // 8 % 2)
    rows, cols = np.mgrid[0:size, 0:size]
    grating = 0.5 + 0.5 * np.sin(frequency * (cols * np.cos(angle) + rows * np.sin(angle)))
    image = Image.fromarray((40 + 120 * grating).astype(np.uint8), mode="L")
    rng = np.random.default_rng(index)
    left, top = rng.integers(0, size // 2, 2)
    ImageDraw.Draw(image).ellipse([left, top, left + size // 3, top + size // 2], fill=230)
    return image


class PhantomViews(Dataset):
    """Stands in for the unlabeled DataModule: ``{"views": [...], "dataset_index": ...}`` per image."""

    def __init__(self, transform, n_images: int = N_IMAGES) -> None:
        self.images = [phantom(seed) for seed in range(n_images)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"views": self.transform(self.images[index]), "dataset_index": 0}


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def build(method: str) -> tuple[L.LightningModule, object]:
    """A small configuration of ``method`` and its views, sized for CPU tests."""
    if method == "simclr":
        model = simclr.SimCLR(
            encoder_name=TEST_ENCODER, projection_hidden_dim=128, projection_dim=64, temperature=0.2, lr=3e-3
        )
        return model, simclr.views_transform(**TWO_VIEW_SETTINGS)
    if method == "moco":
        model = moco.MoCoV3(
            encoder_name=TEST_ENCODER,
            projection_hidden_dim=128,
            prediction_hidden_dim=128,
            projection_dim=64,
            base_momentum=0.9,
            lr=3e-3,
        )
        return model, moco.views_transform(**TWO_VIEW_SETTINGS)
    model = dino.DINO(
        encoder_name=TEST_ENCODER,
        head_hidden_dim=128,
        bottleneck_dim=64,
        output_dim=128,
        base_momentum=0.9,
        lr=3e-3,
    )
    return model, dino.views_transform(**MULTI_CROP_SETTINGS)


def train(method: str, tmp_path: Path) -> tuple[L.LightningModule, L.Trainer, list[float]]:
    L.seed_everything(0, verbose=False)
    model, transform = build(method)
    recorder = LossRecorder()
    trainer = L.Trainer(
        max_steps=TRAIN_STEPS,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
        default_root_dir=tmp_path,
    )
    loader = DataLoader(PhantomViews(transform), batch_size=8, shuffle=True, drop_last=True)
    trainer.fit(model, loader)
    return model, trainer, recorder.losses


@pytest.fixture(scope="module", params=["simclr", "moco", "dino"])
def trained(request, tmp_path_factory):
    """Each method trained once; every checkpoint test reuses the run."""
    tmp_path = tmp_path_factory.mktemp(request.param)
    model, trainer, losses = train(request.param, tmp_path)
    checkpoint_path = tmp_path / f"{request.param}.ckpt"
    trainer.save_checkpoint(checkpoint_path)
    return request.param, model, losses, checkpoint_path


METHOD_MODULES = {"simclr": simclr, "moco": moco, "dino": dino}
