"""The methods of the leaderboard, by name.

One module per pretraining method (``simclr.py``, ``moco.py``, ``dino.py``, ``ddpm.py``,
``cdpm_align.py``) exports its LightningModule, its view transform where it has one, and the hand-over
to fine-tuning (``encoder_state_dict`` for encoder methods, ``build_backbone`` for diffusion methods).
To add a method: write its module, add it to ``PRETRAINING`` and ``ENCODER_METHODS`` or
``DIFFUSION_METHODS``, and give it a preset entry in :mod:`landmark_bench.presets`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch.nn as nn

from landmark_bench.models.decoder import EncoderBackbone
from landmark_bench.models.encoder import create_encoder

REFERENCE_METHODS = ("mean_shape",)
ENCODER_METHODS = ("scratch", "imagenet", "simclr", "moco", "dino")
DIFFUSION_METHODS = ("ddpm", "cdpm_align")
FINETUNE_METHODS = REFERENCE_METHODS + ENCODER_METHODS + DIFFUSION_METHODS

# pretraining method -> (module, LightningModule class)
PRETRAINING: dict[str, tuple[str, str]] = {
    "simclr": ("landmark_bench.methods.simclr", "SimCLR"),
    "moco": ("landmark_bench.methods.moco", "MoCoV3"),
    "dino": ("landmark_bench.methods.dino", "DINO"),
    "ddpm": ("landmark_bench.methods.ddpm", "DDPMPretrain"),
    "cdpm_align": ("landmark_bench.methods.cdpm_align", "CDPMAlignPretrain"),
}


def check_method(name: str, valid: tuple[str, ...] | dict = FINETUNE_METHODS) -> str:
    if name not in valid:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(valid)}")
    return name


def method_module(name: str) -> ModuleType:
    return importlib.import_module(PRETRAINING[check_method(name, PRETRAINING)][0])


def pretraining_class(name: str) -> type:
    module_name, class_name = PRETRAINING[check_method(name, PRETRAINING)]
    return getattr(importlib.import_module(module_name), class_name)


def build_backbone(
    method: str,
    *,
    encoder: str = "efficientnet_lite0",
    pretrained: str | None = None,
    dataset: str | None = None,
    diffusion_timestep: int | None = None,
    decoder_channels: tuple[int, ...] = (64, 32, 24, 16, 16),
) -> nn.Module:
    """The backbone ``method`` is fine-tuned from: (B, 1, H, W) in [0, 1] -> full-resolution features."""
    check_method(method, ENCODER_METHODS + DIFFUSION_METHODS)
    if method in PRETRAINING and pretrained is None:
        raise ValueError(f"method {method!r} needs a pretraining checkpoint (--pretrained CKPT)")
    if method not in PRETRAINING and pretrained is not None:
        raise ValueError(f"method {method!r} takes no pretraining checkpoint, but --pretrained {pretrained} was given")
    if method in DIFFUSION_METHODS:
        return method_module(method).build_backbone(pretrained, dataset, diffusion_timestep)
    model = create_encoder(encoder)
    if method == "imagenet":
        from landmark_bench.models.imagenet import imagenet_encoder_state

        model.load_state_dict(imagenet_encoder_state(encoder), strict=True)
    elif method in PRETRAINING:
        model.load_state_dict(method_module(method).encoder_state_dict(pretrained), strict=True)
    return EncoderBackbone(model, decoder_channels)
