"""The methods of the leaderboard, by name: one class each, registered once with ``@register`` (see ``base``).

Built in: ``mean_shape``, ``scratch``, ``imagenet``, ``scratch_unet`` (``initialisations.py``), ``simclr``,
``moco``, ``dino`` (encoder self-supervised learning), ``ddpm``, ``cdpm_align`` (diffusion). A user's method is a
subclass of one of the kinds (``Initialisation``/``EncoderInitialisation``, ``EncoderPretrainer``/
``MomentumPretrainer``, ``DDPMPretrain``) decorated with ``@register``; it needs no other edit: its preset
settings and cost estimate default to its family's.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch.nn as nn

# Importing a module registers its methods: in the leaderboard's order.
from landmark_bench.methods import initialisations  # noqa: F401  # isort: skip
from landmark_bench.methods import simclr, moco, dino  # noqa: F401  # isort: skip
from landmark_bench.methods import ddpm, cdpm_align  # noqa: F401  # isort: skip
from landmark_bench.methods.base import (
    CONTROLS,
    FAMILIES,
    METHODS,
    PROTOCOLS,
    BackboneSpec,
    EncoderInitialisation,
    Initialisation,
    Reference,
    control_of,
    family_of,
    get_method,
    method_names,
    register,
)
from landmark_bench.methods.ddpm import DDPMPretrain
from landmark_bench.methods.momentum import EncoderPretrainer, MomentumPretrainer
from landmark_bench.presets import get_preset

__all__ = [
    "CONTROLS", "FAMILIES", "METHODS", "PROTOCOLS", "BackboneSpec", "DDPMPretrain", "EncoderInitialisation",
    "EncoderPretrainer", "Initialisation", "MomentumPretrainer", "Reference", "build_backbone", "control_of",
    "detector_architecture", "detector_backbone", "family_of", "get_method", "method_names", "preset_settings",
    "register",
]


def build_backbone(method: str, *, pretrained: str | None = None, **spec: Any) -> nn.Module:
    """The backbone ``method`` is fine-tuned from: (B, 1, H, W) in [0, 1] -> full-resolution features.

    ``spec``: the fields of :class:`BackboneSpec` (encoder, unet, diffusion_schedule, dataset, timestep, ...).
    """
    method_class = get_method(method)
    if method_class.family is None:
        raise ValueError(f"method {method!r} has no network to fine-tune")
    if method_class.pretrains and pretrained is None:
        raise ValueError(f"method {method!r} needs a pretraining checkpoint (--pretrained CKPT)")
    if not method_class.pretrains and pretrained is not None:
        raise ValueError(f"method {method!r} takes no pretraining checkpoint, but --pretrained {pretrained} was given")
    return method_class.backbone(BackboneSpec(**spec), pretrained)


def detector_spec(protocol: str, settings: dict, cfg: dict, dataset: str) -> dict[str, Any]:
    """The :class:`BackboneSpec` fields of a ``protocol`` job on ``dataset``: a probe reads the UNet's whole
    decoder, a fine-tune at ``cfg["diffusion_feature_stride"]``."""
    return dict(encoder=settings["encoder"], dataset=dataset, timestep=cfg["diffusion_timestep"], unet=settings["unet"],
                diffusion_schedule=settings["pretrain"]["ddpm"], noise_input=cfg["diffusion_noise_input"],
                feature_stride=1 if protocol == "probe" else cfg["diffusion_feature_stride"])


def detector_backbone(method: str, protocol: str, settings: dict, cfg: dict, dataset: str,
                      pretrained: str | None) -> nn.Module:
    """``method``'s backbone as a ``protocol`` job on ``dataset`` builds it, with the weights it starts from."""
    return build_backbone(method, pretrained=pretrained, **detector_spec(protocol, settings, cfg, dataset))


def detector_architecture(method: str, protocol: str, settings: dict, cfg: dict, dataset: str,
                          pretraining_hyper_parameters: dict | None) -> nn.Module:
    """The same network at random init, from the pretraining's hyperparameters instead of its checkpoint: what
    ``predict`` loads a finished detector's weights into."""
    method_class = get_method(method)
    if method_class.family is None:
        raise ValueError(f"method {method!r} has no network to fine-tune")
    return method_class.architecture(BackboneSpec(**detector_spec(protocol, settings, cfg, dataset)),
                                     pretraining_hyper_parameters)


def preset_settings(preset: str, overrides: dict[str, Any] | None = None) -> dict:
    """Preset ``preset`` with a default pretraining entry for every registered method it does not name, then the
    dotted ``overrides`` (which may therefore set a user's method too)."""
    get_preset(preset)  # an unknown preset is named before any method looks it up
    pretraining = method_names(pretrains=True)
    defaults = {name: METHODS[name].default_settings(preset) for name in pretraining}
    open_keys = {f"pretrain.{name}": module_keywords(METHODS[name]) for name in pretraining}
    return get_preset(preset, overrides, pretrain_defaults=defaults, open_keys=open_keys)


def module_keywords(module_class: type) -> set[str]:
    """The settings a pretraining module takes as keyword arguments, its bases' included where it passes
    ``**kwargs`` on: what ``--set pretrain.<method>.<key>`` may give though the preset leaves it at its default.
    The networks and datasets are the run's to give, not settings."""
    keywords: set[str] = set()
    for cls in module_class.__mro__:
        if "__init__" not in vars(cls):
            continue
        parameters = inspect.signature(vars(cls)["__init__"]).parameters.values()
        keywords |= {parameter.name for parameter in parameters if parameter.kind is parameter.KEYWORD_ONLY}
        if not any(parameter.kind is parameter.VAR_KEYWORD for parameter in parameters):
            break
    return keywords - {"unet", "encoder", "dataset_names"}
