"""Every registered method builds under every preset and has a cost estimate: the registry, not a hand-written list."""

from __future__ import annotations

import pytest

from landmark_bench.methods import (
    METHODS,
    PROTOCOLS,
    build_backbone,
    get_method,
    method_names,
    preset_settings,
)
from landmark_bench.presets import PRESETS
from landmark_bench.pretrain import RUN_KEYS
from landmark_bench.sweep import FinetuneJob, PretrainJob, estimate_seconds


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_builds_under_every_preset_with_a_cost_estimate(method, preset):
    settings = preset_settings(preset)
    method_class = get_method(method)
    if method_class.pretrains:
        cfg = settings["pretrain"][method]
        kwargs = {key: value for key, value in cfg.items() if key not in RUN_KEYS}
        if method_class.family == "diffusion":
            kwargs.update(unet=settings["unet"], dataset_names=["isbi2015", "hand"])
        else:
            kwargs.update(encoder=settings["encoder"])
            method_class.views_transform(**cfg.get("views", {}))
        assert sum(parameter.numel() for parameter in method_class(**kwargs).parameters()) > 0
        assert estimate_seconds(PretrainJob(method, ("isbi2015",), preset, "unused")) > 0
    elif method_class.family is not None:
        backbone = build_backbone(method, encoder=settings["encoder"], unet=settings["unet"],
                                  diffusion_schedule=settings["pretrain"]["ddpm"])
        assert backbone.out_channels > 0 and backbone.pyramid_channels
    for protocol in PROTOCOLS if method_class.family else ("finetune",):
        assert estimate_seconds(FinetuneJob(method, "isbi2015", 10, 0, preset, "unused", protocol=protocol)) > 0


def test_unknown_method_lists_the_registered_ones():
    with pytest.raises(ValueError, match="valid methods: " + ", ".join(method_names())):
        get_method("byol")
