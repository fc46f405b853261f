"""Safe checkpoint reading: no pickled code runs, and a checkpoint of the wrong method says so."""

from __future__ import annotations

from pathlib import Path

import torch

METHOD_KEY = "landmark_bench_method"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, truncated, or from another method."""


def read_checkpoint(path: str | Path, expected_method: str | None = None) -> dict:
    """Load a Lightning checkpoint with ``weights_only=True`` and check which method wrote it.

    Pretraining modules record their method under ``METHOD_KEY`` in ``on_save_checkpoint``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, not a checkpoint, pickled code
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(error).__name__}: {error})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"checkpoint {path} holds no 'state_dict'; is it a landmark_bench checkpoint?")
    found = checkpoint.get(METHOD_KEY)
    if expected_method is not None and found != expected_method:
        raise CheckpointError(
            f"checkpoint {path} was written by method {found!r}, not {expected_method!r}"
        )
    return checkpoint


def strip_prefix(state_dict: dict, prefix: str, path: str | Path) -> dict:
    """The entries under ``prefix`` with it removed; none at all is an error, never an empty load."""
    selected = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
    if not selected:
        raise CheckpointError(f"checkpoint {path} has no weights under {prefix!r}")
    return selected
