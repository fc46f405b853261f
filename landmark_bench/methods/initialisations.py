"""The rows that need no pretraining run: the mean-shape reference, the random-init controls of each network
family, and ImageNet weights. A user's own weights are one more :class:`EncoderInitialisation` subclass."""

from __future__ import annotations

import torch.nn as nn

from landmark_bench.methods.base import BackboneSpec, EncoderInitialisation, Initialisation, Reference, register
from landmark_bench.models.imagenet import imagenet_encoder_state
from landmark_bench.models.unet import DEFAULT_BACKBONE_TIMESTEP, DiffusionBackbone, build_unet, make_noise_scheduler


@register
class MeanShape(Reference):
    """The few-shot subset's mean landmark positions for every image: the floor every learned method must beat."""

    name = "mean_shape"


@register
class Scratch(EncoderInitialisation):
    """The encoder detector at random init: the encoder family's control."""

    name = "scratch"


@register
class ImageNet(EncoderInitialisation):
    """Supervised ImageNet weights for the encoder (genuine weights from the package index)."""

    name = "imagenet"

    @classmethod
    def encoder_weights(cls, spec: BackboneSpec) -> dict:
        return imagenet_encoder_state(spec.encoder)


@register
class ScratchUNet(Initialisation):
    """The diffusion UNet detector at random init: the diffusion family's control.

    Run as ``ddpm``'s backbone is (the family schedule's backbone timestep and noise schedule, no condition), so
    it has exactly ``ddpm``'s parameters.
    """

    name = "scratch_unet"
    family = "diffusion"

    @classmethod
    def backbone(cls, spec: BackboneSpec, checkpoint: str | None = None) -> nn.Module:
        if spec.unet is None:
            raise ValueError("method 'scratch_unet' needs the preset's UNet config")
        schedule = spec.diffusion_schedule or {"num_train_timesteps": 1000}
        timestep = schedule.get("backbone_timestep", DEFAULT_BACKBONE_TIMESTEP) if spec.timestep is None \
            else spec.timestep
        return DiffusionBackbone(build_unet(spec.unet), timestep=timestep, noise_input=spec.noise_input,
                                 feature_stride=spec.feature_stride,
                                 noise_scheduler=make_noise_scheduler(schedule))
