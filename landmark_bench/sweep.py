"""The sweep: methods x datasets x shots x seeds, each pretraining once, resumable, rows from run folders.

A fine-tune job is done when its run folder holds ``run.json`` (written atomically, last); it failed when
its ``status.json`` says so. ``results.csv`` is rebuilt from the run folders after every job, one row per
finished job, so a sweep killed at any point and started again neither loses nor repeats a row.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from threading import Condition

import numpy as np
import pandas as pd

from landmark_bench.data.datamodule import parse_shots
from landmark_bench.finetune import finetune, run_dir_name
from landmark_bench.io import write_csv, write_json
from landmark_bench.methods import PROTOCOLS, family_of, get_method, preset_settings
from landmark_bench.pretrain import CHECKPOINT_NAME, DEFAULT_PRETRAINING_DATASETS, pretrain
from landmark_bench.runs import USER_ERRORS, threads_per_process

LAUNCHERS = ("inprocess", "local", "slurm", "submitit-local", "submitit-debug")


@dataclass(frozen=True)
class PretrainJob:
    method: str
    datasets: tuple[str, ...]
    preset: str
    out: str
    overrides: dict = field(default_factory=dict, compare=False)

    @property
    def checkpoint(self) -> Path:
        return Path(self.out) / CHECKPOINT_NAME

    def state(self) -> str:
        return "done" if self.checkpoint.is_file() else read_status(Path(self.out))


@dataclass(frozen=True)
class FinetuneJob:
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


def read_status(folder: Path) -> str:
    try:
        return json.loads((folder / "status.json").read_text())["status"]
    except (OSError, ValueError, KeyError):
        return "pending"


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


def estimate_seconds(job: PretrainJob | FinetuneJob) -> float:
    """The preset's own per-step estimate times the steps, plus a fixed start-up and evaluation cost; a method the
    cost model does not name costs as much as its family's costliest."""
    settings = preset_settings(job.preset, job.overrides)
    estimate, family = settings["estimate"], family_of(job.method)
    if isinstance(job, PretrainJob):
        steps = settings["pretrain"][job.method]["max_steps"]
        step = estimate["pretrain_step"].get(job.method, estimate["pretrain_step_by_family"][family])
        return estimate["startup"] + steps * step
    if family is None:
        return estimate["startup"]
    step = estimate[f"{job.protocol}_step"][family]
    return estimate["startup"] + estimate["evaluation"][family] + settings["finetune"]["max_steps"] * step


def by_priority(pretraining: list[PretrainJob], finetunes: list[FinetuneJob]) -> list:
    """Pretrainings first, those with the longest chain (itself and its fine-tunes) first, then the fine-tunes
    longest first: the longest work starts early and short jobs fill the gaps at the end."""
    chain = {job.method: estimate_seconds(job) for job in pretraining}
    for job in finetunes:
        if job.method in chain:
            chain[job.method] += estimate_seconds(job)
    return [*sorted(pretraining, key=lambda job: chain[job.method], reverse=True),
            *sorted(finetunes, key=estimate_seconds, reverse=True)]


def needs_of(pretraining: list[PretrainJob]):
    """What each job waits for: a fine-tune its method's pretraining, a pretraining nothing."""
    pretraining_of = {job.method: job for job in pretraining}
    return lambda job: pretraining_of.get(job.method) if isinstance(job, FinetuneJob) else None


def estimated_wall_seconds(jobs: list, needs, slots: int) -> float:
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
    return "\n".join(lines)


# --- running jobs ------------------------------------------------------------------------------------


def job_arguments(job: PretrainJob | FinetuneJob, data_dir: str | None, group: str, devices: int) -> list[str]:
    """The ``landmark-bench`` argument list of a job: never a shell string."""
    common = ["--preset", job.preset, "--out", job.out, "--devices", str(devices), "--wandb-group", group]
    if job.overrides:
        common += ["--set", *(f"{key}={value!r}" for key, value in job.overrides.items())]
    if data_dir:
        common += ["--data-dir", str(data_dir)]
    if isinstance(job, PretrainJob):
        return ["pretrain", "--method", job.method, "--datasets", *job.datasets, *common]
    args = ["finetune", "--method", job.method, "--dataset", job.dataset, "--shots", str(job.shots),
            "--seed", str(job.seed), "--protocol", job.protocol, *common]
    return args + (["--pretrained", job.pretrained] if job.pretrained else [])


def execute(job: PretrainJob | FinetuneJob, data_dir: str | None, group: str, devices: int = 1) -> str:
    """Run one job in this process; a user error (data, checkpoint, setting) is recorded in its folder and
    reported in one line, never raised."""
    try:
        if isinstance(job, PretrainJob):
            pretrain(method=job.method, datasets=job.datasets, preset=job.preset, data_dir=data_dir, out=job.out,
                     devices=devices, wandb_group=group, overrides=job.overrides)
        else:
            finetune(method=job.method, dataset=job.dataset, shots=job.shots, seed=job.seed, preset=job.preset,
                     data_dir=data_dir, out=job.out, pretrained=job.pretrained, devices=devices, wandb_group=group,
                     overrides=job.overrides, protocol=job.protocol)
    except USER_ERRORS as error:
        print(f"{Path(job.out).name}: error: {error}", file=sys.stderr)
    return "done" if job.state() == "done" else "failed"


def run_subprocess(job: PretrainJob | FinetuneJob, data_dir: str | None, group: str, slot: str,
                   cpu_slots: int = 1) -> str:
    env = dict(os.environ)
    if slot.startswith("cuda:"):
        env["CUDA_VISIBLE_DEVICES"] = slot.split(":", 1)[1]
    else:  # CPU processes share the cores: more threads than cores makes every one of them crawl
        env["OMP_NUM_THREADS"] = str(threads_per_process(cpu_slots))
    log = Path(job.out) / "job.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as stream:
        subprocess.run([sys.executable, "-m", "landmark_bench.cli", *job_arguments(job, data_dir, group, 1)],
                       env=env, stdout=stream, stderr=subprocess.STDOUT, check=False)
    if job.state() not in ("done", "failed"):  # killed before it could record anything
        write_json(Path(job.out) / "status.json", {"status": "failed", "reason": f"process ended, see {log}"})
    return job.state()


class Runner:
    """Runs a list of jobs: in this process, on local device slots, or through submitit (SLURM)."""

    def __init__(self, launcher: str, data_dir: str | None, group: str, slots: list[str], folder: Path,
                 slurm: dict | None = None, devices: int = 1):
        if launcher not in LAUNCHERS:
            raise ValueError(f"unknown launcher {launcher!r}; valid launchers: {', '.join(LAUNCHERS)}")
        self.launcher, self.data_dir, self.group, self.slots = launcher, data_dir, group, slots
        self.folder, self.slurm, self.devices = folder, slurm or {}, devices

    def run(self, jobs: list, on_finish, needs=lambda job: None) -> None:
        """Run every job not done yet, in the given (priority) order, each once the job it ``needs`` finished.

        A job whose needed job failed in this run is recorded as failed without running. Local slots start
        the first ready job as soon as a slot is free, so fine-tunes that need nothing fill the slots while
        pretrainings run; the other launchers run in waves (what is ready, then what that unblocked).
        """
        pending = [job for job in jobs if job.state() != "done"]
        finished: set[str] = set()

        def blocked(job) -> bool | None:
            """None: may run; True: its needed job failed; False: must wait for it."""
            needed = needs(job)
            if needed is None or needed.state() == "done":
                return None
            return needed.out in finished

        def settle(job, slot: str | None = None) -> None:
            needed = needs(job)
            if blocked(job):
                Path(job.out).mkdir(parents=True, exist_ok=True)
                write_json(Path(job.out) / "status.json",
                           {"status": "failed", "reason": f"pretraining {needed.method} failed, see {needed.out}"})
            elif slot is not None:
                run_subprocess(job, self.data_dir, self.group, slot, len(self.slots))
            else:
                execute(job, self.data_dir, self.group, self.devices)
            on_finish(job)

        if self.launcher == "local":
            changed = Condition()

            def work(slot: str) -> None:
                while True:
                    with changed:
                        while (job := next((j for j in pending if blocked(j) is not False), None)) is None:
                            if not pending:
                                return
                            changed.wait()
                        pending.remove(job)
                    try:
                        settle(job, slot)
                    finally:  # wake the other slots even if this one fails, so none waits forever
                        with changed:
                            finished.add(job.out)
                            changed.notify_all()

            with ThreadPoolExecutor(max_workers=len(self.slots)) as pool:
                list(pool.map(work, self.slots))
            return
        while pending:
            wave = [job for job in pending if blocked(job) is not False]
            pending = [job for job in pending if job not in wave]
            if self.launcher == "inprocess" or not any(blocked(job) is None for job in wave):
                for job in wave:
                    settle(job)
            else:
                for job in wave:
                    if blocked(job):
                        settle(job)
                self._run_submitit([job for job in wave if blocked(job) is None], on_finish)
            finished.update(job.out for job in wave)

    def _run_submitit(self, jobs: list, on_finish) -> None:
        import submitit

        cluster = {"slurm": "slurm", "submitit-local": "local", "submitit-debug": "debug"}[self.launcher]
        executor = submitit.AutoExecutor(folder=self.folder / "submitit", cluster=cluster)
        executor.update_parameters(**({"timeout_min": 240, **self.slurm} if cluster == "slurm" else {"timeout_min": 240}))
        submitted = [(job, executor.submit(execute, job, self.data_dir, self.group, self.devices)) for job in jobs]
        for job, handle in submitted:
            try:
                handle.result()
            except Exception as error:  # the job's own folder records the reason when it got that far
                if job.state() != "failed":
                    write_json(Path(job.out) / "status.json", {"status": "failed", "reason": str(error)[-2000:]})
            on_finish(job)


# --- rows --------------------------------------------------------------------------------------------


def flatten_metrics(metrics: dict) -> dict:
    row = {}
    for split, result in metrics.items():
        for key in ("mre", "mre_std", "ere", "n_images"):
            row[f"{split}_{key}"] = result.get(key)
        for threshold, value in result["sdr"].items():
            row[f"{split}_sdr_{float(threshold)}"] = value
        row["unit"] = result["unit"]
    return row


def pretraining_learned(checkpoint: str | None) -> bool | None:
    """The verdict of the pretraining's health record (``health.json`` beside its checkpoint); None if it has none."""
    if not checkpoint:
        return None
    try:
        return bool(json.loads((Path(checkpoint).parent / "health.json").read_text())["learned"])
    except (OSError, ValueError, KeyError):
        return None


def job_row(job: FinetuneJob) -> dict | None:
    """The result row of a finished job, or None while it is pending."""
    base = {"method": job.method, "protocol": job.protocol, "dataset": job.dataset, "shots": str(job.shots),
            "seed": job.seed, "preset": job.preset, "run_dir": str(Path(job.out).resolve())}
    state = job.state()
    if state == "done":
        record = json.loads((Path(job.out) / "run.json").read_text())
        return {**base, "status": "done", "reason": "", "subset_ids": " ".join(record.get("subset_ids", [])),
                "pretraining_learned": pretraining_learned(job.pretrained),
                "config_hash": record["config_hash"], "code_version": record["code_version"],
                "checkpoint": record.get("best_checkpoint", ""), "pretrained": job.pretrained or "",
                "wall_seconds": record["wall_seconds"], "train_seconds": record["train_seconds"],
                **flatten_metrics(record["metrics"])}
    if state == "failed":
        status = json.loads((Path(job.out) / "status.json").read_text())
        return {**base, "status": "failed", "reason": status.get("reason", "unknown")}
    return None


def reference_rows(dataset: str, data_dir: str | None) -> list[dict]:
    """The dataset's human reference rows (its reader's ``reference_readers``: e.g. ISBI's junior doctor scored
    against its senior doctor), on each test split."""
    from landmark_bench.data.registry import get_reader
    from landmark_bench.evaluation import metric_for, update_from_points

    reader = get_reader(dataset, data_dir)
    rows = []
    for name, (truth, observer) in reader.reference_readers().items():
        metrics = {}
        for split in reader.test_splits:
            records = truth.records(split)
            metric = metric_for(records)
            update_from_points(metric, records, np.stack([record.landmarks for record in observer.records(split)]))
            metrics[split] = metric.compute()
        rows.append({"method": name, "dataset": dataset, "shots": "", "seed": np.nan, "status": "done", "reason": "",
                     **flatten_metrics(metrics)})
    return rows


def write_results(out: Path, finetunes: list[FinetuneJob], data_dir: str | None) -> pd.DataFrame:
    rows = [row for row in map(job_row, finetunes) if row is not None]
    if data_dir:
        for dataset in dict.fromkeys(job.dataset for job in finetunes):
            rows.extend(reference_rows(dataset, data_dir))
    frame = pd.DataFrame(rows)
    write_csv(out / "results.csv", frame)
    return frame


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


def run_sweep(
    *, out: str | Path, methods: list[str], datasets: list[str], shots: list, seeds: list[int], preset: str = "cpu",
    data_dir: str | None = None, launcher: str = "inprocess", slots: list[str] | None = None,
    pretrain_datasets: list[str] | None = None, dry_run: bool = False, slurm: dict | None = None, devices: int = 1,
    collect: bool = False, protocols: list[str] | tuple[str, ...] = ("finetune",), overrides: dict | None = None,
) -> pd.DataFrame | None:
    """Plan, run what is not done yet, rebuild ``results.csv`` and the leaderboard; ``dry_run`` only prints;
    ``collect`` rebuilds ``results.csv`` from the run folders without running anything.

    ``overrides`` (dotted preset keys) reach every job; a sweep folder holds runs of one preset and one set of
    overrides only, so resuming it with other settings is refused rather than mixing runs."""
    out = Path(out)
    overrides = overrides or {}
    check_same_settings(out, preset, overrides)
    pretraining, finetunes = plan(out, methods, datasets, shots, seeds, preset, pretrain_datasets, protocols,
                                  overrides)
    print(describe(pretraining, finetunes, len(slots or ["cpu"]) if launcher == "local" else 1), flush=True)
    if dry_run:
        return None
    if collect:
        return write_results(out, finetunes, data_dir)
    out.mkdir(parents=True, exist_ok=True)
    group = out.resolve().name
    write_json(out / "sweep.json", {"methods": methods, "protocols": list(protocols), "datasets": datasets,
                                    "shots": [str(s) for s in shots], "seeds": seeds, "preset": preset,
                                    "overrides": overrides, "data_dir": data_dir, "launcher": launcher,
                                    "slots": slots,
                                    "pretrain_datasets": list(pretraining[0].datasets) if pretraining else None})
    runner = Runner(launcher, data_dir, group, slots or ["cpu"], out, slurm, devices)
    started = time.perf_counter()
    total = len(pretraining) + len(finetunes)

    parallel = len(slots or ["cpu"]) if launcher == "local" else 1

    def progress(job) -> None:
        left = [j for j in [*pretraining, *finetunes] if j.state() not in ("done", "failed")]
        left_minutes = sum(map(estimate_seconds, left)) / parallel / 60
        print(f"[{total - len(left)}/{total}] {job.state()}: {Path(job.out).name}  "
              f"elapsed {(time.perf_counter() - started) / 60:.1f} min, about {left_minutes:.0f} min left",
              flush=True)
        if isinstance(job, FinetuneJob):
            write_results(out, finetunes, None)

    runner.run(by_priority(pretraining, finetunes), progress, needs=needs_of(pretraining))
    return write_results(out, finetunes, data_dir)
