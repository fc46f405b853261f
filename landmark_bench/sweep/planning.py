"""The sweep's jobs, what each waits for, and what they cost: planned before anything runs, so a dry run can show
the plan, what is done, and the estimated time."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from landmark_bench.data.datamodule import parse_shots
from landmark_bench.finetune import run_dir_name
from landmark_bench.methods import PROTOCOLS, family_of, get_method, preset_settings
from landmark_bench.presets import finetune_settings
from landmark_bench.pretrain import CHECKPOINT_NAME, DEFAULT_PRETRAINING_DATASETS


@dataclass(frozen=True)
class PretrainJob:
    """One method's pretraining, shared by all its fine-tunes and probes; done once its checkpoint and its record
    (``run.json``, written last) exist."""

    method: str
    datasets: tuple[str, ...]
    preset: str
    out: str
    overrides: dict = field(default_factory=dict, compare=False)

    @property
    def checkpoint(self) -> Path:
        return Path(self.out) / CHECKPOINT_NAME

    def state(self) -> str:
        return "done" if (Path(self.out) / "run.json").is_file() else read_status(Path(self.out))


@dataclass(frozen=True)
class FinetuneJob:
    """One fine-tune or probe; done once its run folder holds ``run.json`` (written last)."""

    method: str
    dataset: str
    shots: int | str
    seed: int
    preset: str
    out: str
    pretrained: str | None = None
    protocol: str = "finetune"
    overrides: dict = field(default_factory=dict, compare=False)

    def state(self) -> str:
        return "done" if (Path(self.out) / "run.json").is_file() else read_status(Path(self.out))


Job = PretrainJob | FinetuneJob
Needs = Callable[[Job], "PretrainJob | None"]


def read_status(folder: Path) -> str:
    """The recorded status of a job whose final file is missing; "pending" when it never started, died before
    recording one, or was killed between recording "done" and writing that file."""
    try:
        status = json.loads((folder / "status.json").read_text())["status"]
    except (OSError, ValueError, KeyError):
        return "pending"
    return "pending" if status == "done" else status


def plan(
    out: Path, methods: list[str], datasets: list[str], shots: list[int | str], seeds: list[int], preset: str,
    pretrain_datasets: list[str] | None = None, protocols: list[str] | tuple[str, ...] = ("finetune",),
    overrides: dict | None = None,
) -> tuple[list[PretrainJob], list[FinetuneJob]]:
    """Every pretraining once (shared by all fine-tunes and probes of its method), then every fine-tune and
    probe (reference rows such as ``mean_shape`` have no backbone, so no probe)."""
    overrides = overrides or {}
    preset_settings(preset, overrides)
    for method in methods:
        get_method(method)
    for protocol in protocols:
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r}; valid protocols: {', '.join(PROTOCOLS)}")
    corpus = tuple(pretrain_datasets or (DEFAULT_PRETRAINING_DATASETS if "phantom" not in datasets else datasets))
    pretraining = {method: PretrainJob(method, corpus, preset, str(out / "pretrain" / method), overrides)
                   for method in methods if get_method(method).pretrains}
    finetunes = [
        FinetuneJob(method, dataset, parse_shots(shot), seed, preset,
                    str(out / "runs" / run_dir_name(method, dataset, parse_shots(shot), seed, protocol)),
                    str(pretraining[method].checkpoint) if method in pretraining else None, protocol, overrides)
        for protocol in protocols for dataset in datasets for shot in shots for seed in seeds for method in methods
        if protocol == "finetune" or family_of(method) is not None
    ]
    return list(pretraining.values()), finetunes


def estimate_seconds(job: Job) -> float:
    """The preset's own per-step estimate times the steps, plus a fixed start-up and evaluation cost; a method the
    cost model does not name costs as much as its family's costliest; a fine-tune or probe on a dataset the model
    has measured apart (``dataset_factor``) costs that many times its training and evaluation."""
    settings = preset_settings(job.preset, job.overrides)
    estimate, family = settings["estimate"], family_of(job.method)
    if isinstance(job, PretrainJob):
        steps = settings["pretrain"][job.method]["max_steps"]
        step = estimate["pretrain_step"].get(job.method, estimate["pretrain_step_by_family"][family])
        return estimate["startup"] + steps * step
    if family is None:
        return estimate["startup"]
    steps = finetune_settings(settings, job.dataset, family)["max_steps"]
    factor = estimate.get("dataset_factor", {}).get(job.dataset, {}).get(job.protocol, {}).get(family, 1.0)
    return estimate["startup"] + factor * (estimate["evaluation"][family]
                                           + steps * estimate[f"{job.protocol}_step"][family])


def by_priority(pretraining: list[PretrainJob], finetunes: list[FinetuneJob]) -> list[Job]:
    """Pretrainings first, those with the longest chain (itself and its fine-tunes) first, then the fine-tunes
    longest first: the longest work starts early and short jobs fill the gaps at the end."""
    chain = {job.method: estimate_seconds(job) for job in pretraining}
    for job in finetunes:
        if job.method in chain:
            chain[job.method] += estimate_seconds(job)
    return [*sorted(pretraining, key=lambda job: chain[job.method], reverse=True),
            *sorted(finetunes, key=estimate_seconds, reverse=True)]


def needs_of(pretraining: list[PretrainJob]) -> Needs:
    """What each job waits for: a fine-tune its method's pretraining, a pretraining nothing."""
    pretraining_of = {job.method: job for job in pretraining}
    return lambda job: pretraining_of.get(job.method) if isinstance(job, FinetuneJob) else None


def estimated_wall_seconds(jobs: list[Job], needs: Needs, slots: int) -> float:
    """The local runner's schedule replayed with the estimates: each free slot takes the first ready job."""
    free_at, finish = [0.0] * slots, {}
    pending = [job for job in jobs if job.state() != "done"]
    while pending:
        slot = min(range(slots), key=free_at.__getitem__)
        now = free_at[slot]
        job = next((job for job in pending if needs(job) is None or needs(job).state() == "done"
                    or finish.get(needs(job).out, math.inf) <= now), None)
        if job is None:  # wait for the next needed job to finish
            free_at[slot] = min(t for t in finish.values() if t > now)
            continue
        pending.remove(job)
        free_at[slot] = finish[job.out] = now + estimate_seconds(job)
    return max(free_at)


def describe(pretraining: list[PretrainJob], finetunes: list[FinetuneJob], slots: int = 1) -> str:
    """The plan a line a job, with its state and cost, then the totals: what a dry run prints before spending any."""
    lines, total = [], 0.0
    for job in [*pretraining, *finetunes]:
        state = job.state()
        cost = 0.0 if state == "done" else estimate_seconds(job)
        total += cost
        what = (f"pretrain {job.method} on {'+'.join(job.datasets)}" if isinstance(job, PretrainJob)
                else f"{job.protocol} {job.method} {job.dataset} {job.shots}-shot seed {job.seed}")
        lines.append(f"  [{state:>7}] {what:<55} ~{cost / 60:5.1f} min")
    done = sum(job.state() == "done" for job in [*pretraining, *finetunes])
    wall = estimated_wall_seconds(by_priority(pretraining, finetunes), needs_of(pretraining), slots)
    lines.append(f"{len(pretraining)} pretrainings, {len(finetunes)} fine-tunes and probes, {done} done; "
                 f"estimated remaining job time {total / 60:.1f} min, about {wall / 60:.1f} min of wall time on "
                 f"{slots} slot(s)")
    jobs = [*pretraining, *finetunes]
    gpu_hours = gpu_hours_line(jobs[0], total) if jobs else None
    return "\n".join([*lines, gpu_hours] if gpu_hours else lines)


def gpu_hours_line(job: Job, seconds: float) -> str | None:
    """For a GPU preset, the job time as GPU-hours (one GPU a job) and whether its step costs were measured or
    guessed, so nobody books a cluster on a guess unawares; None for a CPU preset."""
    estimate = preset_settings(job.preset, job.overrides)["estimate"]
    if "gpu_check" not in estimate:
        return None
    measured = estimate["gpu_check"]
    source = (f"per-step costs measured by `make gpu-check` on {measured['device']} ({measured['date']}, commit "
              f"{measured['commit']}; start-up and evaluation guessed)" if measured else
              "an estimate: the per-step costs are guessed, not measured (run `make gpu-check` on a GPU)")
    return f"preset {job.preset}: about {seconds / 3600:.1f} GPU-hours of remaining jobs, one GPU a job; {source}"
