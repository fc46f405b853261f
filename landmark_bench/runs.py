"""What every run (fine-tune, probe, pretraining) shares: its folder's lifecycle and its provenance.

``status.json`` says ``running`` while the run works, then ``failed`` with the reason and traceback, or
``done``; every file is written atomically, so a killed run leaves whole files or none.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only

from landmark_bench.checkpoints import CheckpointError
from landmark_bench.data.readers import DataError
from landmark_bench.io import reached, write_json

# What a user can get wrong (data, checkpoint, setting) as opposed to a bug: reported in one line, not a traceback.
USER_ERRORS = (DataError, CheckpointError, ValueError, FileNotFoundError, FloatingPointError)

# Under DDP every rank runs the run's code; only rank zero records it.
record_json = rank_zero_only(write_json)


def threads_per_process(processes: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, processes))


def share_cores(accelerator: str, devices: int | str) -> None:
    """CPU DDP ranks split the cores: more threads than cores makes every rank crawl."""
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if on_cpu and isinstance(devices, int) and devices > 1:
        torch.set_num_threads(threads_per_process(devices))


def code_version() -> str:
    """The git commit of the suite (with ``-dirty`` for local changes), or the package version."""
    root = Path(__file__).resolve().parents[1]
    try:
        described = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=root,
                                   capture_output=True, text=True, timeout=10, check=True)
        return described.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"landmark_bench=={version('landmark_bench')}"
        except PackageNotFoundError:  # a copied source tree, run from its root: still runs, says what it cannot tell
            return "unknown (no git checkout, package not installed)"


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


class AnnouncedCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, announcing each checkpoint once written (``reached``: its file name), so that
    an interruption test kills a run right after, say, its fifth ``last.ckpt``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        super().save_checkpoint(checkpoint, path, storage_options)
        reached(Path(path).name)


def clear_stale_temp_files(out: Path) -> None:
    """Temp files of a run killed mid-write; the files they would have replaced are whole."""
    for stale in out.glob(".*.tmp"):
        stale.unlink(missing_ok=True)


@contextmanager
def run_lifecycle(out: Path) -> Iterator[dict]:
    """``status.json``: running, then failed (reason, traceback) if the body raises, else done.

    The body may put figures (e.g. wall and training seconds) in the yielded dict; they go into the done status.
    """
    out.mkdir(parents=True, exist_ok=True)
    clear_stale_temp_files(out)
    record_json(out / "status.json", {"status": "running"})
    started = time.perf_counter()
    figures: dict = {}
    try:
        yield figures
    except BaseException as error:
        record_json(out / "status.json", {"status": "failed", "reason": f"{type(error).__name__}: {error}",
                                         "traceback": traceback.format_exc(),
                                         "wall_seconds": time.perf_counter() - started})
        raise
    record_json(out / "status.json", {"status": "done", **figures})
