"""How jobs run: in this process, as subprocesses on local device slots, or through submitit (SLURM). The launchers
differ only in where and how many jobs run at once; the order and the dependencies are the schedule's."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from threading import Condition

import submitit

from landmark_bench.finetune import finetune
from landmark_bench.io import write_json
from landmark_bench.pretrain import pretrain
from landmark_bench.runs import USER_ERRORS, threads_per_process
from landmark_bench.sweep.claims import Claims, alive
from landmark_bench.sweep.planning import Job, Needs, PretrainJob

SUBMITIT_CLUSTERS = {"slurm": "slurm", "submitit-local": "local", "submitit-debug": "debug"}
LAUNCHERS = ("inprocess", "local", *SUBMITIT_CLUSTERS)
# Where the running sweep's own package lives: its job processes import it from there, so they run the sweep's
# code even when started in a folder holding another copy (a working tree while the sweep runs from a snapshot).
PACKAGE_ROOT = Path(__file__).resolve().parents[2]
POLL_SECONDS = 1.0  # how often a sweep looks whether jobs another process runs have ended


def job_arguments(job: Job, data_dir: str | None, group: str, devices: int) -> list[str]:
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


def execute(job: Job, data_dir: str | None, group: str, devices: int = 1) -> str:
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


def own_package_environment() -> dict[str, str]:
    """The environment variables under which a new Python process imports this sweep's own package first."""
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")])),
            "PYTHONSAFEPATH": "1"}  # Python >= 3.11: the working folder is not put before it on sys.path


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """``os.environ`` with ``values`` set for the duration, as it was afterwards."""
    saved = dict(os.environ)
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def run_subprocess(job: Job, data_dir: str | None, group: str, slot: str, cpu_slots: int = 1) -> str:
    """Run one job in a process of its own on one device slot, its output in the run folder's ``job.log``; a
    process that dies before recording its end is recorded as failed."""
    env = {**os.environ, **own_package_environment()}
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


class Schedule:
    """The jobs not done yet, in the given (priority) order, each to start once the job it ``needs`` finished;
    shared by the launchers so that a job whose needed job failed in this run is recorded as failed without
    running, whichever launcher runs the sweep.

    A job is claimed before it runs; one that another live process holds (a second sweep on the same folder) is
    set aside and waited for rather than run twice, and what needs it waits with it."""

    def __init__(self, jobs: list[Job], needs: Needs, on_finish: Callable[[Job], None], claims: Claims) -> None:
        self.pending = [job for job in jobs if job.state() != "done"]
        self.needs, self.on_finish, self.claims = needs, on_finish, claims
        self.finished: set[str] = set()
        self.elsewhere: list[Job] = []

    def blocked(self, job: Job) -> bool | None:
        """None: may run; True: its needed job failed; False: must wait for it."""
        needed = self.needs(job)
        if needed is None or needed.state() == "done":
            return None
        return needed.out in self.finished

    def skipped(self, job: Job) -> bool:
        """True, having recorded the job as failed, when the job it needs failed."""
        if not self.blocked(job):
            return False
        needed = self.needs(job)
        Path(job.out).mkdir(parents=True, exist_ok=True)
        write_json(Path(job.out) / "status.json",
                   {"status": "failed", "reason": f"pretraining {needed.method} failed, see {needed.out}"})
        return True

    def claimed(self, job: Job) -> bool:
        """Whether this process is to run the job, holding its claim until ``ended``: not when another live
        process holds it (set aside, and said so), nor when another process finished it since this one planned,
        nor when the job it needs failed (recorded as failed, and ended)."""
        owner = self.claims.claim(job.out)
        if owner is not None:
            print(f"{Path(job.out).name}: running in another process (pid {owner.get('pid')} on host "
                  f"{owner.get('host')}), waiting", flush=True)
            self.elsewhere.append(job)
            return False
        if job.state() == "done":
            self.claims.release(job.out)
            self.finished.add(job.out)
            return False
        if self.skipped(job):
            self.ended(job)
            return False
        return True

    def ended(self, job: Job) -> None:
        """Release the job's claim (its folder records its end by now) and report it."""
        self.claims.release(job.out)
        self.finished.add(job.out)
        self.on_finish(job)

    def run(self, job: Job, work: Callable[[], object]) -> None:
        """Run the job with ``work`` if this process is to; ended even if ``work`` raises, so none waits for it
        forever."""
        if self.claimed(job):
            try:
                work()
            finally:
                self.ended(job)

    def poll(self) -> None:
        """Jobs set aside that their other process ended count as finished here, as it recorded them (done or
        failed); one whose owner died first is pending again, to be taken over."""
        for job in list(self.elsewhere):
            state, owner = job.state(), self.claims.owner(job.out)
            if state != "done" and owner is not None and alive(owner):
                continue
            self.elsewhere.remove(job)
            if state == "done" or (state == "failed" and owner is None):
                self.finished.add(job.out)
            else:
                self.pending.insert(0, job)

    def first_ready(self) -> Job | None:
        """The first pending job that need not wait (it may run, or is to be recorded as failed)."""
        self.poll()
        return next((job for job in self.pending if self.blocked(job) is not False), None)

    def waves(self) -> Iterator[list[Job]]:
        """What is ready, then what that unblocked, until nothing is pending or running in another process."""
        while self.pending or self.elsewhere:
            self.poll()
            wave = [job for job in self.pending if self.blocked(job) is not False]
            if not wave:  # all that is left waits for jobs other processes run
                time.sleep(POLL_SECONDS)
                continue
            self.pending = [job for job in self.pending if job not in wave]
            yield wave


@dataclass
class Launcher(ABC):
    """Where a schedule's jobs run, and how many at once."""

    data_dir: str | None
    group: str

    @abstractmethod
    def run(self, schedule: Schedule) -> None:
        """Run every job of the schedule, reporting each to ``schedule.on_finish`` as it ends."""


@dataclass
class InProcess(Launcher):
    """One job at a time in this process, wave after wave: no start-up cost and nothing to set up."""

    devices: int = 1

    def run(self, schedule: Schedule) -> None:
        for wave in schedule.waves():
            for job in wave:
                schedule.run(job, partial(execute, job, self.data_dir, self.group, self.devices))


@dataclass
class LocalSlots(Launcher):
    """A subprocess on each local device slot (``cuda:0``, ``cpu``, ...): a free slot starts the first ready job,
    so fine-tunes that need nothing fill the slots while pretrainings run."""

    slots: list[str]

    def run(self, schedule: Schedule) -> None:
        changed = Condition()

        def work(slot: str) -> None:
            while True:
                with changed:
                    while (job := schedule.first_ready()) is None:
                        if not schedule.pending and not schedule.elsewhere:
                            return
                        changed.wait(POLL_SECONDS)  # woken by a slot whose job ended, or to poll other processes
                    schedule.pending.remove(job)
                try:
                    schedule.run(job, partial(run_subprocess, job, self.data_dir, self.group, slot, len(self.slots)))
                finally:  # wake the other slots even if this one fails, so none waits forever
                    with changed:
                        changed.notify_all()

        with ThreadPoolExecutor(max_workers=len(self.slots)) as pool:
            list(pool.map(work, self.slots))


class Requeueable(submitit.helpers.Checkpointable):
    """A job as submitit runs it. When the cluster preempts it or its time limit nears, submitit calls ``checkpoint``,
    which resubmits this same job, and requeues it: it goes on from its run's last checkpoint, as the job of a
    restarted sweep does. (A plain function is requeued when preempted, not when it times out.)"""

    def __call__(self, job: Job, data_dir: str | None, group: str, devices: int) -> str:
        return execute(job, data_dir, group, devices)


@dataclass
class Submitit(Launcher):
    """Each wave's ready jobs submitted together through submitit: to SLURM, or to local or debug processes that
    behave the same way. Each job's submitit files (its logs, requeues included) are in its run folder's
    ``submitit/``."""

    devices: int
    cluster: str
    slurm: dict

    def run(self, schedule: Schedule) -> None:
        for wave in schedule.waves():
            ready = [job for job in wave if schedule.claimed(job)]
            if ready:
                self.submit(ready, schedule.ended)

    def submit(self, jobs: list[Job], on_finish: Callable[[Job], None]) -> None:
        submitted = []
        for job in jobs:
            executor = submitit.AutoExecutor(folder=Path(job.out) / "submitit", cluster=self.cluster)
            executor.update_parameters(**{"timeout_min": 240, **(self.slurm if self.cluster == "slurm" else {})})
            # the job's process (local, or sbatch's, which exports the environment) unpickles the job from this
            # sweep's package, not from a copy in its working folder
            with environment(own_package_environment()):
                handle = executor.submit(Requeueable(), job, self.data_dir, self.group, self.devices)
            submitted.append((job, handle))
        for job, handle in submitted:
            try:
                handle.result()
            except Exception as error:  # the job's own folder records the reason when it got that far
                if job.state() != "failed":
                    write_json(Path(job.out) / "status.json", {
                        "status": "failed",
                        "reason": f"submitit job {handle.job_id} failed (logs: {handle.paths.stdout}, "
                                  f"{handle.paths.stderr.name}): {str(error)[-2000:]}"})
            on_finish(job)


def make_launcher(name: str, data_dir: str | None, group: str, slots: list[str], slurm: dict | None = None,
                  devices: int = 1) -> Launcher:
    """The launcher of one of the ``LAUNCHERS`` names."""
    if name == "inprocess":
        return InProcess(data_dir, group, devices)
    if name == "local":
        return LocalSlots(data_dir, group, slots)
    if name in SUBMITIT_CLUSTERS:
        return Submitit(data_dir, group, devices, SUBMITIT_CLUSTERS[name], slurm or {})
    raise ValueError(f"unknown launcher {name!r}; valid launchers: {', '.join(LAUNCHERS)}")
