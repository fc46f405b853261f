"""Claims: which process runs which job of a sweep folder, so that sweeps started on one folder at once share the
work instead of each training every run, at the same time, into the same run folder.

A claim is ``claims/<runs|pretrain>.<job>.json`` in the sweep folder, created with ``O_CREAT | O_EXCL`` (of
processes racing for a job, exactly one creates it) and holding the owner's pid, host, start time and a token of
its own. The owner removes it when the job ends, done or failed, and touches it every ``HEARTBEAT_SECONDS`` while
the job runs. A claim whose owner is dead is taken over, so no job stays claimed forever: on the same host when
its pid no longer exists; on any host when it was not touched for ``STALE_SECONDS`` (a sweep that died on another
host, a zombie, a pid reused by another program). The same rules tell which temp files of the sweep folder's own
files (``results.csv``) a killed writer left, to be removed, from those a live sweep is writing.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from contextlib import suppress
from datetime import datetime
from pathlib import Path
from types import TracebackType

from landmark_bench.io import temp_writer

HEARTBEAT_SECONDS = 60.0
STALE_SECONDS = 30 * 60.0  # thirty missed heartbeats: generous against slow shared file systems and clock skew
WRITE_SECONDS = 10.0  # a claim still empty after this long lost its owner between creating and writing it
HOST = socket.gethostname()


def read_claim(path: Path) -> dict | None:
    """The claim's record plus ``age`` (seconds since its owner last touched it); only ``age`` while its owner is
    still writing it; None when the job is not claimed."""
    try:
        age = time.time() - path.stat().st_mtime
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
    except ValueError:
        record = None
    return {**(record if isinstance(record, dict) else {}), "age": age}


def pid_exists(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:  # 0 and negative pids would name process groups
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def alive(record: dict) -> bool:
    """Whether a claim's owner may still be running its job."""
    if "pid" not in record:
        return record["age"] < WRITE_SECONDS
    if record["age"] > STALE_SECONDS:
        return False
    return record.get("host") != HOST or pid_exists(record["pid"])


def clear_dead_writers_temp_files(folder: Path) -> None:
    """Remove the temp files that writers killed mid-write left in a folder several sweeps write to (the sweep
    folder's ``results.csv``), never one that a live writer, here or on another host, is still filling."""
    for temp in folder.glob(".*.tmp"):
        try:
            record = {"age": time.time() - temp.stat().st_mtime}
        except FileNotFoundError:  # renamed into place meanwhile
            continue
        writer = temp_writer(temp)
        if writer is not None:
            record.update(pid=writer[0], host=writer[1])
        if not alive(record):
            temp.unlink(missing_ok=True)


def take_over(path: Path, stale: dict) -> None:
    """Remove a dead owner's claim: moved aside first, so that a claim another process made in its place meanwhile
    is put back rather than removed."""
    aside = path.with_name(f".{path.name}.{uuid.uuid4().hex}.aside")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    moved = read_claim(aside)
    if moved is not None and moved.get("token") != stale.get("token"):
        with suppress(FileExistsError):
            os.link(aside, path)
    aside.unlink(missing_ok=True)


class Claims:
    """This process's claims in one sweep folder; while open (a context manager) it keeps them fresh."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.held: dict[Path, str] = {}  # claim file -> its token
        self.stopped = threading.Event()
        self.heartbeat = threading.Thread(target=self.beat, name="sweep-claims", daemon=True)

    def __enter__(self) -> Claims:
        self.heartbeat.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.stopped.set()
        self.heartbeat.join()

    def beat(self) -> None:
        while not self.stopped.wait(HEARTBEAT_SECONDS):
            for path in tuple(self.held):
                with suppress(OSError):
                    os.utime(path)

    def path(self, job_out: str) -> Path:
        run = Path(job_out)
        return self.folder / f"{run.parent.name}.{run.name}.json"

    def owner(self, job_out: str) -> dict | None:
        """The record of the job's claim (see ``read_claim``); None when it is not claimed."""
        return read_claim(self.path(job_out))

    def claim(self, job_out: str) -> dict | None:
        """None when this process now holds the job (it was free, or its owner was dead); else the live owner's
        record."""
        path = self.path(job_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex
        while True:
            try:
                descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = read_claim(path)
                if owner is not None and alive(owner):
                    return owner
                if owner is not None:
                    take_over(path, owner)
                continue
            with os.fdopen(descriptor, "w") as stream:
                json.dump({"pid": os.getpid(), "host": HOST, "token": token,
                           "started": datetime.now().astimezone().isoformat(timespec="seconds")}, stream)
            self.held[path] = token
            return None

    def release(self, job_out: str) -> None:
        """Remove this process's claim of the job, never one another process took over from it."""
        path = self.path(job_out)
        token = self.held.pop(path, None)
        record = read_claim(path)
        if token is not None and record is not None and record.get("token") == token:
            path.unlink(missing_ok=True)
