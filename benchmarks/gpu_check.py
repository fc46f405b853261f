"""`make gpu-check`: every registered method's pretraining, fine-tune and probe run for a few dozen steps on this
machine's accelerator, their steps/s and peak memory, and the sweep's GPU-hours extrapolated from them.

Why: the ``paper`` preset's cost model (``presets.ESTIMATE``) was guessed on machines without a GPU. Run on a GPU
with the unchanged ``paper`` preset, the check writes its measured seconds per step to ``benchmarks/gpu_check.json``,
which the cost model reads from then on (the sweep's dry run says whether its figures are measured or guessed). On
a CPU the same code runs two steps of the ``tiny`` preset: a smoke run whose table says so and replaces nothing.

Each job is built as ``pretrain()`` and ``finetune()`` build it, with the preset's own loader workers, pinned memory,
precision and memory format. Its inputs are phantom images at the preset's resolution, with splits sized like the
real ones (no data folder to decode on a fresh machine; ``--dataset`` takes a real one). Only training steps after a
warm-up are timed, no start-up or checkpointing; a fine-tune's or probe's step also carries its share of
validation (one timed pass every ``val_every`` steps), as in the sweep.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import lightning.pytorch as L
import torch

from benchmarks.common import RESULTS, command_line, markdown_table, report
from landmark_bench.data.datamodule import UnlabeledDataModule
from landmark_bench.data.registry import PhantomReader
from landmark_bench.evaluation import LandmarkEvaluation
from landmark_bench.finetune import few_shot_data, landmark_detector, protocol_settings
from landmark_bench.methods import FAMILIES, PROTOCOLS, family_of, get_method, method_names, preset_settings
from landmark_bench.presets import GPU_CHECK_FILE, parse_assignments
from landmark_bench.pretrain import DEFAULT_PRETRAINING_DATASETS, pretraining_data, pretraining_module
from landmark_bench.runs import code_version
from landmark_bench.sweep.planning import PretrainJob, estimate_seconds, plan

CUDA = torch.cuda.is_available()
# The sweep extrapolated: the paper's grid on ISBI 2015.
SWEEP_DATASET, SHOTS, SEEDS = "isbi2015", (10, 25), (0, 1, 2)
# The phantom sized like the real data, so that loader epochs and validation passes are as long as in the sweep:
# ISBI 2015's train and val splits, and the pretraining corpus (train + val of isbi2015, aasce2019, hand, chest).
PHANTOM_SPLITS = {"num_train": 120, "num_val": 30, "num_test": 1}
PRETRAINING_IMAGES = 643


@dataclass(frozen=True)
class Timing:
    """One job kind of one method: seconds per training step, over how many timed steps, its peak accelerator
    memory (None on a CPU) and, for a fine-tune or probe, its validation's share of each step."""

    seconds: float
    steps: int
    peak_mib: float | None
    validation: float = 0.0

    @property
    def per_step(self) -> float:
        """What one step costs in the sweep: the step and its share of validation."""
        return self.seconds + self.validation


def synchronize() -> None:
    if CUDA:
        torch.cuda.synchronize()


class StepClock(L.Callback):
    """Timestamps the end of every step after ``warmup`` and stops the run after ``steps`` timed steps or
    ``max_seconds``, whichever comes first (the module keeps its own ``max_steps``, so its schedules are the
    sweep's)."""

    def __init__(self, warmup: int, steps: int, max_seconds: float):
        self.warmup, self.steps, self.max_seconds = warmup, steps, max_seconds
        self.batches, self.stamps = 0, []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        self.batches += 1
        if self.batches < self.warmup:
            return
        synchronize()
        self.stamps.append(time.perf_counter())
        timed = len(self.stamps) - 1
        if timed >= self.steps or (timed >= 2 and self.stamps[-1] - self.stamps[0] > self.max_seconds):
            trainer.should_stop = True

    def seconds_per_step(self) -> float:
        """Over the second half of the timed steps: by then the batches the loader workers prefetched during the
        warm-up are used up, so a job bound by its data loading shows its steady rate, not a burst."""
        half = len(self.stamps) // 2
        return (self.stamps[-1] - self.stamps[half]) / (len(self.stamps) - 1 - half)


class ValidationClock(L.Callback):
    """The wall time of a validation pass, from its first batch to the logged metrics (loader start-up excluded:
    the sweep's loaders keep their workers between passes)."""

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0:
            synchronize()
            self.started = time.perf_counter()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        synchronize()
        self.seconds = time.perf_counter() - self.started


def peak_mib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if CUDA else None


def release() -> None:
    """Free the last job's model, loader workers and cached blocks, so each peak is the job's own."""
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def trainer(callbacks: list[L.Callback], precision: str, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="gpu" if CUDA else "cpu", devices=1, precision=precision, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     callbacks=callbacks, **kwargs)


def timed_fit(model: L.LightningModule, datamodule: L.LightningDataModule, precision: str, max_steps: int,
              args: argparse.Namespace) -> tuple[Timing, L.Trainer]:
    """Train until the clock has its steps; no validation (timed apart), no checkpoints."""
    release()
    clock = StepClock(args.warmup, args.steps, args.max_seconds)
    fit = trainer([clock], precision, max_steps=max_steps, max_epochs=-1, num_sanity_val_steps=0,
                  limit_val_batches=0)
    L.seed_everything(0, workers=True, verbose=False)
    fit.fit(model, datamodule=datamodule)
    return Timing(clock.seconds_per_step(), len(clock.stamps) - 1, peak_mib()), fit


def corpus(method: str, cfg: dict, datasets: list[str], data_dir: str | None) -> UnlabeledDataModule:
    """The pretraining loader ``pretrain()`` builds; on the phantom, a corpus as large as the real one."""
    datamodule = pretraining_data(method, cfg, datasets, data_dir)
    if datasets == ["phantom"]:
        datamodule.readers = [PhantomReader(num_train=PRETRAINING_IMAGES, num_val=0, num_test=0)]
    return datamodule


def pretraining(method: str, settings: dict, datasets: list[str], data_dir: str | None, args: argparse.Namespace,
                folder: Path) -> tuple[Timing, str]:
    """Time ``method``'s pretraining; also returns a checkpoint of its few steps, which its fine-tunes load."""
    cfg = settings["pretrain"][method]
    model = pretraining_module(method, settings, datasets)
    timing, fit = timed_fit(model, corpus(method, cfg, datasets, data_dir), cfg.get("precision", "32-true"),
                            cfg["max_steps"], args)
    checkpoint = folder / f"{method}.ckpt"
    fit.save_checkpoint(checkpoint, weights_only=True)
    if hasattr(model, "align_start_step"):  # cdpm_align: its last align_fraction of the steps take four passes
        del model, fit
        aligned = pretraining_module(method, settings, datasets)
        aligned.align_start_step = 0
        align, _ = timed_fit(aligned, corpus(method, cfg, datasets, data_dir), cfg.get("precision", "32-true"),
                             cfg["max_steps"], args)
        share = cfg["align_fraction"]
        peaks = [peak for peak in (timing.peak_mib, align.peak_mib) if peak is not None]
        timing = Timing((1 - share) * timing.seconds + share * align.seconds, timing.steps + align.steps,
                        max(peaks) if peaks else None)
    return timing, str(checkpoint)


def finetuning(method: str, protocol: str, settings: dict, dataset: str, data_dir: str | None,
               checkpoint: str | None, args: argparse.Namespace) -> Timing:
    """Time the detector ``finetune()`` trains under ``protocol``, and one validation pass (the second: a probe
    caches its validation features in the first, as in the sweep)."""
    cfg = protocol_settings(settings, dataset, protocol, method)
    datamodule = few_shot_data(cfg, dataset, data_dir, SHOTS[0], 0, PHANTOM_SPLITS if dataset == "phantom" else None)
    model = landmark_detector(method, protocol, settings, cfg, datamodule, checkpoint)
    timing, _ = timed_fit(model, datamodule, cfg["precision"], cfg["max_steps"], args)
    clock = ValidationClock()
    validate = trainer([LandmarkEvaluation(), clock], cfg["precision"])
    for _ in range(2):
        validate.validate(model, datamodule=datamodule, verbose=False)
    return Timing(timing.seconds, timing.steps, timing.peak_mib, clock.seconds / cfg["val_every"])


def measure(methods: list[str], settings: dict, dataset: str, data_dir: str | None,
            args: argparse.Namespace) -> dict[str, dict[str, Timing | str]]:
    """Each method's timings by job kind (``pretrain``, ``finetune``, ``probe``; none for a reference row). A job
    that fails is recorded by its error and the others still run: one GPU session must tell all it can."""
    datasets = ["phantom"] if dataset == "phantom" else list(DEFAULT_PRETRAINING_DATASETS)
    timings: dict[str, dict[str, Timing | str]] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        for method in methods:
            row: dict[str, Timing | str] = {}
            checkpoint = None
            kinds = [*(["pretrain"] if get_method(method).pretrains else []),
                     *(PROTOCOLS if family_of(method) is not None else [])]
            for kind in kinds:
                try:
                    if kind == "pretrain":
                        row[kind], checkpoint = pretraining(method, settings, datasets, data_dir, args, Path(folder))
                    else:
                        row[kind] = finetuning(method, kind, settings, dataset, data_dir, checkpoint, args)
                except Exception as error:  # noqa: BLE001  # reported in the table, and the check exits non-zero
                    row[kind] = f"{type(error).__name__}: {error}".splitlines()[0][:200]
                release()
            timings[method] = row
            print(f"[{(time.perf_counter() - started) / 60:.1f} min] {method}: " + ", ".join(
                f"{kind} {1 / value.seconds:.2f} steps/s" if isinstance(value, Timing) else f"{kind} FAILED {value}"
                for kind, value in row.items()), file=sys.stderr, flush=True)
    return timings


def measured_estimate(timings: dict[str, dict[str, Timing | str]], estimate: dict) -> dict[str, dict[str, float]]:
    """The measured seconds per step in the cost model's structure: pretraining per method it names, and per
    family for the rest (the family's costliest, as the guessed model has it); fine-tune and probe steps per family,
    its costliest (a family's methods share one network). Failed jobs keep their guesses."""
    def costliest(kind: str) -> dict[str, float]:
        per_family = {family: [row[kind].per_step for method, row in timings.items()
                               if isinstance(row.get(kind), Timing) and family_of(method) == family]
                      for family in FAMILIES}
        return {family: max(seconds) for family, seconds in per_family.items() if seconds}

    return {"pretrain_step": {method: row["pretrain"].per_step for method, row in timings.items()
                              if isinstance(row.get("pretrain"), Timing) and method in estimate["pretrain_step"]},
            "pretrain_step_by_family": costliest("pretrain"),
            "finetune_step": costliest("finetune"), "probe_step": costliest("probe")}


def sweep_seconds(methods: list[str], preset: str, overrides: dict) -> dict[str, dict[str, list[float]]]:
    """Each method's jobs of the sweep (10 and 25 shots, 3 seeds, both protocols) by kind, in seconds, costed by
    the planner's own model with ``overrides`` (the measured step costs among them)."""
    with tempfile.TemporaryDirectory() as folder:
        pretraining, finetunes = plan(Path(folder), methods, [SWEEP_DATASET], list(SHOTS), list(SEEDS), preset,
                                      protocols=PROTOCOLS, overrides=overrides)
        seconds: dict[str, dict[str, list[float]]] = {method: {} for method in methods}
        for job in [*pretraining, *finetunes]:
            kind = "pretrain" if isinstance(job, PretrainJob) else job.protocol
            seconds[job.method].setdefault(kind, []).append(estimate_seconds(job))
    return seconds


def hours(jobs: list[float] | None) -> str:
    """``6 × 0.05 = 0.31``: the jobs of one kind, each and together."""
    if not jobs:
        return "–"
    total = sum(jobs) / 3600
    return f"{total:.2f}" if len(jobs) == 1 else f"{len(jobs)} × {total / len(jobs):.3f} = {total:.2f}"


def table(timings: dict[str, dict[str, Timing | str]], seconds: dict[str, dict[str, list[float]]], unit: str) -> str:
    """One row per method (steps/s, peak memory, extrapolated hours), then the sweep's total."""
    def rate(row: dict[str, Timing | str], kind: str) -> str:
        value = row.get(kind)
        return "–" if value is None else "failed" if isinstance(value, str) else f"{1 / value.seconds:.2f}"

    def peak(row: dict[str, Timing | str], kind: str) -> str:
        value = row.get(kind)
        return ("–" if value is None else "failed" if isinstance(value, str) else
                "n/a" if value.peak_mib is None else f"{value.peak_mib:.0f}")

    kinds = ("pretrain", *PROTOCOLS)
    rows = [[method, *(rate(row, kind) for kind in kinds), " / ".join(peak(row, kind) for kind in kinds),
             *(hours(seconds[method].get(kind)) for kind in kinds),
             f"{sum(map(sum, seconds[method].values())) / 3600:.2f}"] for method, row in timings.items()]
    total = {kind: sum(sum(jobs.get(kind, [])) for jobs in seconds.values()) / 3600 for kind in kinds}
    count = sum(len(jobs) for by_kind in seconds.values() for jobs in by_kind.values())
    rows.append(["**total**", "", "", "", "", *(f"{total[kind]:.2f}" for kind in kinds),
                 f"**{sum(total.values()):.2f}** ({count} jobs)"])
    return markdown_table(["method", "pretrain steps/s", "fine-tune steps/s", "probe steps/s",
                           "peak MiB (pretrain / fine-tune / probe)", f"pretrain {unit}", f"fine-tunes {unit}",
                           f"probes {unit}", f"method total {unit}"], rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="paper" if CUDA else "tiny",
                        help="default: paper on a GPU, tiny (a smoke run) on a CPU")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="preset settings by dotted key, as the CLI's --set (the check file is then not written)")
    parser.add_argument("--methods", nargs="+", default=method_names())
    parser.add_argument("--dataset", default="phantom", help="fine-tuning data; a real one also pretrains on the "
                                                             "real corpus and needs --data-dir")
    parser.add_argument("--data-dir")
    parser.add_argument("--steps", type=int, default=30 if CUDA else 2, help="timed steps per job (at least 2)")
    parser.add_argument("--warmup", type=int, default=5 if CUDA else 1, help="untimed steps first (at least 1)")
    parser.add_argument("--max-seconds", type=float, default=6.0 if CUDA else math.inf,
                        help="stop timing a job after this long (keeps the check within its 8 minutes on a GPU)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the Markdown file the table is appended to")
    args = parser.parse_args(argv)
    if args.steps < 2 or args.warmup < 1:
        parser.error("--steps must be at least 2 (the rate is over the second half of them), --warmup at least 1")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no banner for each of the ~25 Trainers
    overrides = parse_assignments(args.set)
    settings = preset_settings(args.preset, overrides)
    started = time.perf_counter()
    timings = measure(args.methods, settings, args.dataset, args.data_dir, args)
    measured = measured_estimate(timings, settings["estimate"])
    step_overrides = {f"estimate.{key}.{name}": value for key, values in measured.items()
                      for name, value in values.items()}
    seconds = sweep_seconds(args.methods, args.preset, {**overrides, **step_overrides})
    device = torch.cuda.get_device_name(0) if CUDA else "CPU"
    unit = "GPU-h" if CUDA else "CPU-h"
    inputs = ("phantom images at the preset's resolution (splits sized like ISBI 2015's, a pretraining corpus of "
              f"{PRETRAINING_IMAGES} images like the real one): no data decoding" if args.dataset == "phantom"
              else f"{args.dataset} from {args.data_dir}")
    limit = f" (at most {args.max_seconds:g} s)" if math.isfinite(args.max_seconds) else ""
    notes = [f"{args.steps} timed steps{limit} after {args.warmup} warm-up steps per job "
             "kind, the rate over the second half of them; the preset's own precision, memory format, loader workers "
             f"and pinned memory; inputs: {inputs}. Peak memory: `torch.cuda.max_memory_allocated` per job"
             + ("" if CUDA else f" (n/a on a CPU; this process's peak RSS, all jobs: "
                                f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB)") + ".",
             f"Extrapolated: the sweep of {SWEEP_DATASET}, {' and '.join(map(str, SHOTS))} shots, {len(SEEDS)} seeds, "
             f"fine-tune and probe protocols, under preset {args.preset}, costed by the planner's model with these "
             "step times (a fine-tune's or probe's step with its share of validation) and its guessed start-up "
             f"({settings['estimate']['startup']:g} s a job) and evaluation; one {unit[:3]} a job. "
             f"Check wall time {(time.perf_counter() - started) / 60:.1f} min."]
    failures = [f"{method} {kind}: {value}" for method, row in timings.items() for kind, value in row.items()
                if isinstance(value, str)]
    if failures:
        notes.append("Failed (their steps keep the cost model's guesses): " + "; ".join(failures) + ".")
    if CUDA and args.preset == "paper" and not overrides and set(args.methods) >= set(method_names()) and not failures:
        write_check_file(measured, device, GPU_CHECK_FILE)
        notes.append(f"Written to {GPU_CHECK_FILE.name}: the paper preset's cost model (and the sweep's dry run) "
                     "now uses these per-step figures instead of its guesses.")
    else:
        why = ("CPU smoke run: the same code path at tiny sizes, not GPU figures. " if not CUDA else
               "Not a complete run of the unchanged paper preset, so no check file written. ")
        notes.append(why + "Until `make gpu-check` has run on a GPU, the paper preset's GPU-hours (dry run, cost "
                           "model) are an estimate: guessed, not measured.")
    title = (f"GPU check, preset {args.preset}, {device}" if CUDA else
             f"GPU check: CPU smoke run, preset {args.preset} (not GPU figures)")
    report(title, table(timings, seconds, unit), "\n\n".join(notes), path=args.out)
    if failures:
        sys.exit(1)


def write_check_file(measured: dict[str, dict[str, float]], device: str, path: Path) -> None:
    """The measured paper per-step seconds, with where and when, for ``presets.cost_estimate``."""
    check = {"preset": "paper", "per_step_seconds": measured,
             "measured": {"device": device, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
                          "commit": code_version(), "command": command_line()}}
    path.write_text(json.dumps(check, indent=2) + "\n")


if __name__ == "__main__":
    main()
