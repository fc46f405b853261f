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
from landmark_bench.methods.ddpm import make_noise_scheduler
from landmark_bench.models.unet import DEFAULT_BACKBONE_TIMESTEP, DiffusionBackbone, build_unet

REFERENCE_METHODS = ("mean_shape",)
ENCODER_METHODS = ("scratch", "imagenet", "simclr", "moco", "dino")
DIFFUSION_METHODS = ("scratch_unet", "ddpm", "cdpm_align")
FINETUNE_METHODS = REFERENCE_METHODS + ENCODER_METHODS + DIFFUSION_METHODS
# Each network family's random-init control: a pretrained row is read as a gain over its own family's control,
# so that the architecture and the pretraining are never mixed in one comparison.
CONTROLS = {"encoder": "scratch", "diffusion": "scratch_unet"}
PROTOCOLS = ("finetune", "probe")

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


def family_of(method: str) -> str | None:
    """``"encoder"`` or ``"diffusion"``: the network a method is fine-tuned as; None for reference rows."""
    if method in ENCODER_METHODS:
        return "encoder"
    if method in DIFFUSION_METHODS:
        return "diffusion"
    return None


def control_of(method: str) -> str | None:
    """The random-init control of ``method``'s family; None for the controls themselves and reference rows."""
    family = family_of(method)
    control = CONTROLS.get(family) if family else None
    return None if control == method else control


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
    unet: dict | None = None,
    diffusion_schedule: dict | None = None,
    noise_input: bool = False,
) -> nn.Module:
    """The backbone ``method`` is fine-tuned from: (B, 1, H, W) in [0, 1] -> full-resolution features.

    ``scratch_unet`` is the diffusion family's control: the preset's ``unet`` config at random init, run as
    ``ddpm``'s backbone is (the ``diffusion_schedule``'s backbone timestep and noise schedule, no condition),
    so it has exactly ``ddpm``'s parameters.
    """
    check_method(method, ENCODER_METHODS + DIFFUSION_METHODS)
    if method in PRETRAINING and pretrained is None:
        raise ValueError(f"method {method!r} needs a pretraining checkpoint (--pretrained CKPT)")
    if method not in PRETRAINING and pretrained is not None:
        raise ValueError(f"method {method!r} takes no pretraining checkpoint, but --pretrained {pretrained} was given")
    if method == "scratch_unet":
        if unet is None:
            raise ValueError("method 'scratch_unet' needs the preset's UNet config (unet=...)")
        schedule = diffusion_schedule or {"num_train_timesteps": 1000}
        timestep = schedule.get("backbone_timestep", DEFAULT_BACKBONE_TIMESTEP) if diffusion_timestep is None \
            else diffusion_timestep
        return DiffusionBackbone(build_unet(unet), timestep=timestep, noise_input=noise_input,
                                 noise_scheduler=make_noise_scheduler(schedule))
    if method in DIFFUSION_METHODS:
        return method_module(method).build_backbone(pretrained, dataset, diffusion_timestep, noise_input=noise_input)
    model = create_encoder(encoder)
    if method == "imagenet":
        from landmark_bench.models.imagenet import imagenet_encoder_state

        model.load_state_dict(imagenet_encoder_state(encoder), strict=True)
    elif method in PRETRAINING:
        model.load_state_dict(method_module(method).encoder_state_dict(pretrained), strict=True)
    return EncoderBackbone(model, decoder_channels)
