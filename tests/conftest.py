"""Shared fixtures: the real data folder and a per-session image cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real data (``DATA_DIR``, default ``../shared/data``); the suite is tested on it, never without."""
    path = Path(os.environ.get("DATA_DIR", REPO.parent / "shared" / "data")).resolve()
    if not (path / "isbi2015").is_dir():
        pytest.fail(f"real data not found at {path}: set DATA_DIR to the folder holding isbi2015/, aasce2019/, ...")
    return path


@pytest.fixture(autouse=True, scope="session")
def image_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tests share one image cache, kept out of the user's ~/.cache unless CI points it elsewhere."""
    path = Path(os.environ.get("LANDMARK_BENCH_CACHE") or tmp_path_factory.mktemp("cache"))
    os.environ["LANDMARK_BENCH_CACHE"] = str(path)
    os.environ["WANDB_MODE"] = "disabled"  # the W&B test turns it on (offline) for itself
    return path


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory, image_cache: Path) -> dict[str, dict]:
    """mean_shape and scratch fine-tuned under the tiny preset on the phantom (10 shots, seed 0)."""
    from landmark_bench.finetune import finetune

    out = tmp_path_factory.mktemp("tiny-runs")
    return {method: finetune(method=method, dataset="phantom", shots=10, seed=0, preset="tiny", out=out / method)
            for method in ("mean_shape", "scratch")}
