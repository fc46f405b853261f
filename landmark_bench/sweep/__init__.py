"""The sweep: methods x datasets x shots x seeds, each pretraining once, resumable, rows from run folders.

A fine-tune job is done when its run folder holds ``run.json`` (written atomically, last); it failed when
its ``status.json`` says so. ``results.csv`` is rebuilt from the run folders after every job, one row per
finished job, so a sweep killed at any point and started again neither loses nor repeats a row. Each job is
claimed (``claims``) before it runs, so sweeps started on one folder at once share the work: each runs what no
other live process holds and waits for the rest, and both end with the full results.

``planning`` holds the jobs, what each waits for and the cost model; ``launchers`` runs them; ``results`` turns
run folders into rows; ``claims`` says which process runs which job; ``generalisation`` scores the finished
detectors on other datasets' test splits. This module ties them together.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd

from landmark_bench.io import write_json
from landmark_bench.sweep.claims import Claims, clear_dead_writers_temp_files
from landmark_bench.sweep.generalisation import dataset_readers, write_generalisation
from landmark_bench.sweep.launchers import LAUNCHERS, Schedule, make_launcher, run_subprocess
from landmark_bench.sweep.planning import (
    FinetuneJob, Job, PretrainJob, by_priority, describe, estimate_seconds, estimated_wall_seconds, needs_of, plan,
)
from landmark_bench.sweep.results import write_results

__all__ = ["LAUNCHERS", "FinetuneJob", "PretrainJob", "by_priority", "check_same_settings", "estimate_seconds",
           "estimated_wall_seconds", "needs_of", "plan", "run_subprocess", "run_sweep"]


def check_same_settings(out: Path, preset: str, overrides: dict) -> None:
    """Refuse to resume a sweep folder with another preset or other overrides than it was made with."""
    try:
        recorded = json.loads((out / "sweep.json").read_text())
    except (OSError, ValueError):
        return
    before = (recorded.get("preset"), recorded.get("overrides") or {})
    if before != (preset, json.loads(json.dumps(overrides))):
        raise ValueError(f"sweep folder {out} holds runs made with preset {before[0]!r} and settings {before[1]}; "
                         f"this command asks for preset {preset!r} and settings {overrides}: use another --out")


def collect_results(out: Path, finetunes: list[FinetuneJob], data_dir: str | None,
                    eval_datasets: list[str] | None) -> pd.DataFrame:
    """``results.csv`` from the run folders and, with ``eval_datasets``, ``generalisation_runs.csv``."""
    results = write_results(out, finetunes, data_dir)
    if eval_datasets:
        write_generalisation(out, finetunes, eval_datasets, data_dir)
    return results


def run_sweep(
    *, out: str | Path, methods: list[str], datasets: list[str], shots: list, seeds: list[int], preset: str = "cpu",
    data_dir: str | None = None, launcher: str = "inprocess", slots: list[str] | None = None,
    pretrain_datasets: list[str] | None = None, dry_run: bool = False, slurm: dict | None = None, devices: int = 1,
    collect: bool = False, protocols: list[str] | tuple[str, ...] = ("finetune",), overrides: dict | None = None,
    eval_datasets: list[str] | None = None,
) -> pd.DataFrame | None:
    """Plan, run what is not done yet, rebuild ``results.csv`` and the leaderboard; ``dry_run`` only prints;
    ``collect`` rebuilds ``results.csv`` from the run folders without running anything.

    ``overrides`` (dotted preset keys) reach every job; a sweep folder holds runs of one preset and one set of
    overrides only, so resuming it with other settings is refused rather than mixing runs. ``eval_datasets``: every
    fine-tuned detector is also scored on their test splits (``generalisation_runs.csv``); each must have the landmarks
    of every trained-on dataset, which is checked before anything runs."""
    out = Path(out)
    overrides = overrides or {}
    check_same_settings(out, preset, overrides)
    if eval_datasets:
        dataset_readers(datasets, eval_datasets, data_dir)
    pretraining, finetunes = plan(out, methods, datasets, shots, seeds, preset, pretrain_datasets, protocols,
                                  overrides)
    parallel = len(slots or ["cpu"]) if launcher == "local" else 1
    print(describe(pretraining, finetunes, parallel), flush=True)
    if dry_run:
        return None
    if collect:
        return collect_results(out, finetunes, data_dir, eval_datasets)
    out.mkdir(parents=True, exist_ok=True)
    clear_dead_writers_temp_files(out)  # e.g. of a sweep killed while it wrote results.csv
    group = out.resolve().name
    write_json(out / "sweep.json", {"methods": methods, "protocols": list(protocols), "datasets": datasets,
                                    "shots": [str(s) for s in shots], "seeds": seeds, "preset": preset,
                                    "overrides": overrides, "eval_datasets": eval_datasets, "data_dir": data_dir,
                                    "launcher": launcher, "slots": slots,
                                    "pretrain_datasets": list(pretraining[0].datasets) if pretraining else None})
    runner = make_launcher(launcher, data_dir, group, slots or ["cpu"], slurm, devices)
    started = time.perf_counter()
    total = len(pretraining) + len(finetunes)

    def progress(job: Job) -> None:
        left = [j for j in [*pretraining, *finetunes] if j.state() not in ("done", "failed")]
        left_minutes = sum(map(estimate_seconds, left)) / parallel / 60
        print(f"[{total - len(left)}/{total}] {job.state()}: {Path(job.out).name}  "
              f"elapsed {(time.perf_counter() - started) / 60:.1f} min, about {left_minutes:.0f} min left",
              flush=True)
        if isinstance(job, FinetuneJob):
            write_results(out, finetunes, None)

    with Claims(out / "claims") as claims:
        runner.run(Schedule(by_priority(pretraining, finetunes), needs_of(pretraining), progress, claims))
    return collect_results(out, finetunes, data_dir, eval_datasets)
