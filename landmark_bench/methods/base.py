"""What the suite knows of a leaderboard row: one class per method, registered once by its ``name``.

Every method class carries its ``family`` (the network it is fine-tuned as: ``"encoder"``, the timm encoder
with a U-Net decoder; ``"diffusion"``, the diffusers UNet; ``None`` for a reference row with no network) and its
hand-over to fine-tuning, ``backbone(spec, checkpoint)``, and ``architecture(spec, hyper_parameters)``: the same
network at random init from the pretraining's hyperparameters alone, which ``predict`` rebuilds a finished detector
on (its weights are in the detector's checkpoint), so a run folder needs no pretraining checkpoint beside it. The
kinds:

- :class:`Reference`: no network (``mean_shape``).
- :class:`Initialisation`: fine-tuned from weights that need no pretraining run (``scratch``, ``imagenet``,
  ``scratch_unet``, or a user's own weights file read in ``backbone``).
- pretraining methods: LightningModules trained by ``landmark-bench pretrain``, whose checkpoint hands over the
  backbone (``EncoderPretrainer`` / ``MomentumPretrainer`` for self-supervised learning on the encoder,
  ``DDPMPretrain`` for diffusion); ``pretrains = True``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn as nn

from landmark_bench.models.decoder import EncoderBackbone
from landmark_bench.models.encoder import create_encoder

FAMILIES = ("encoder", "diffusion")
PROTOCOLS = ("finetune", "probe")
# Each network family's random-init control: a pretrained row is read as a gain over its own family's control,
# so that the architecture and the pretraining are never mixed in one comparison.
CONTROLS = {"encoder": "scratch", "diffusion": "scratch_unet"}

METHODS: dict[str, type] = {}


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone is built for, from the preset and the run: the encoder name, the UNet config and the
    diffusion schedule of the family, the dataset (a conditional UNet's condition) and the downstream timestep."""

    encoder: str = "efficientnet_lite0"
    unet: dict | None = None
    diffusion_schedule: dict | None = None
    dataset: str | None = None
    timestep: int | None = None
    noise_input: bool = False
    feature_stride: int = 1  # the diffusion UNet's decoder read at this stride (DiffusionBackbone)
    decoder_channels: tuple[int, ...] = (64, 32, 24, 16, 16)


def register(method: type) -> type:
    """Make ``method`` a leaderboard row under its ``name`` (a class decorator)."""
    name = getattr(method, "name", None)
    if not name or getattr(method, "family", "?") not in (*FAMILIES, None):
        raise ValueError(f"method class {method.__name__} needs a 'name' and a 'family' in {FAMILIES} or None")
    METHODS[name] = method
    return method


def get_method(name: str) -> type:
    """The registered method class ``name``; unknown names list the valid ones."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    return METHODS[name]


def method_names(*, pretrains: bool | None = None, family: str | None = None) -> list[str]:
    """Registered names, in registration order, optionally only those that (do not) pretrain or of one family."""
    return [name for name, method in METHODS.items()
            if (pretrains is None or method.pretrains == pretrains) and (family is None or method.family == family)]


def family_of(method: str) -> str | None:
    """``"encoder"`` or ``"diffusion"``: the network a method is fine-tuned as; None for reference rows and for
    names not registered here (a results file may hold rows of a plugin this process did not import)."""
    return METHODS[method].family if method in METHODS else None


def control_of(method: str) -> str | None:
    """The random-init control of ``method``'s family; None for the controls themselves and reference rows."""
    family = family_of(method)
    control = CONTROLS.get(family) if family else None
    return None if control == method else control


class Reference:
    """A row with no network (its predictions come from the training annotations alone)."""

    name: ClassVar[str]
    family: ClassVar[None] = None
    pretrains: ClassVar[bool] = False


class Initialisation:
    """A row fine-tuned from weights that need no pretraining run: ``backbone`` builds and loads them."""

    name: ClassVar[str]
    family: ClassVar[str]
    pretrains: ClassVar[bool] = False

    @classmethod
    def backbone(cls, spec: BackboneSpec, checkpoint: str | None = None) -> nn.Module:
        raise NotImplementedError

    @classmethod
    def architecture(cls, spec: BackboneSpec, hyper_parameters: dict | None = None) -> nn.Module:
        """The backbone's network; its weights need no pretraining run, so it is simply ``backbone``."""
        return cls.backbone(spec)


def encoder_architecture(spec: BackboneSpec) -> EncoderBackbone:
    """The encoder family's network at random init: the timm encoder under the U-Net decoder."""
    return EncoderBackbone(create_encoder(spec.encoder), spec.decoder_channels)


class EncoderInitialisation(Initialisation):
    """The encoder detector with the weights of ``encoder_weights`` (None: random init)."""

    family: ClassVar[str] = "encoder"

    @classmethod
    def encoder_weights(cls, spec: BackboneSpec) -> dict | None:
        return None

    @classmethod
    def architecture(cls, spec: BackboneSpec, hyper_parameters: dict | None = None) -> nn.Module:
        return encoder_architecture(spec)

    @classmethod
    def backbone(cls, spec: BackboneSpec, checkpoint: str | None = None) -> nn.Module:
        network = cls.architecture(spec)
        weights = cls.encoder_weights(spec)
        if weights is not None:
            network.encoder.load_state_dict(weights, strict=True)
        return network
