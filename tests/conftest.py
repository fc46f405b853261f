"""Shared fixtures: the real data folder, a per-session image cache, and commands run in a forked process."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from multiprocessing.process import BaseProcess
from pathlib import Path

import pytest

from landmark_bench.io import KILL_AT

REPO = Path(__file__).resolve().parents[1]
DEADLINE_S = 300  # below pytest's own timeout (pyproject.toml), so that a hung command fails its test here


class ForkedCommands:
    """``landmark-bench ARGS`` in forked copies of the test process (no new interpreter: no seconds of imports per
    start), each told by ``LANDMARK_BENCH_KILL_AT`` where to kill itself: interruption tests stop a command at a
    point the code names rather than after a sleep timed for one machine."""

    def start(self, args: list[str], kill_at: str | None = None, log: Path | None = None) -> BaseProcess:
        def command() -> None:
            import torch

            from landmark_bench.cli import main

            torch.set_num_threads(1)  # a forked child cannot use its parent's OpenMP pool (it hangs)
            if kill_at:
                os.environ[KILL_AT] = kill_at
            if log is not None:
                stream = log.open("w", buffering=1)
                for descriptor in (1, 2):
                    os.dup2(stream.fileno(), descriptor)
                sys.stdout = sys.stderr = stream
            sys.exit(main(args))

        process = multiprocessing.get_context("fork").Process(target=command)
        process.start()
        return process

    def wait(self, process: BaseProcess) -> int:
        """The command's exit code (``-SIGKILL`` when it was killed at its point)."""
        process.join(DEADLINE_S)
        if process.exitcode is None:
            process.kill()
            process.join()
            pytest.fail(f"command still running after {DEADLINE_S} s")
        return process.exitcode

    def kill_at(self, args: list[str], point: str) -> None:
        """Run the command to ``point``, where it must die."""
        assert self.wait(self.start(args, point)) == -signal.SIGKILL, f"{args} ended before reaching {point}"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real data (``DATA_DIR``, default ``../shared/data``); the suite is tested on it, never without."""
    path = Path(os.environ.get("DATA_DIR", REPO.parent / "shared" / "data")).resolve()
    if not (path / "isbi2015").is_dir():
        pytest.fail(f"real data not found at {path}: set DATA_DIR to the folder holding isbi2015/, aasce2019/, ...")
    return path


@pytest.fixture(autouse=True, scope="session")
def image_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tests share one image cache, kept out of the user's ~/.cache unless CI points it elsewhere; pytest-xdist's
    workers share it too (in their common temp folder; cache entries are written atomically)."""
    base = tmp_path_factory.getbasetemp()
    path = Path(os.environ.get("LANDMARK_BENCH_CACHE")
                or (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "image-cache")
    path.mkdir(parents=True, exist_ok=True)
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


@pytest.fixture(scope="session")
def forked() -> ForkedCommands:
    return ForkedCommands()
