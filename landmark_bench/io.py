"""Atomic file writes: a temp file in the same folder, then a rename, so a killed process never
leaves half a file behind and readers see the old version or the new one.

Interruption tests stop a process at a named point with ``LANDMARK_BENCH_KILL_AT`` (``reached``) instead of
killing it after a guessed delay."""

from __future__ import annotations

import json
import os
import signal
import socket
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import pandas as pd

KILL_AT = "LANDMARK_BENCH_KILL_AT"
KILL_SIGNAL = "LANDMARK_BENCH_KILL_SIGNAL"
_times_reached: Counter[str] = Counter()


def reached(point: str) -> None:
    """Interruption tests' hook, a no-op unless ``LANDMARK_BENCH_KILL_AT`` is ``point`` or ``point#n`` (its n-th time
    in this process): then the process sends itself SIGKILL, or the signal ``LANDMARK_BENCH_KILL_SIGNAL`` names
    (``USR2``: a preemption, to submitit), so that a test interrupts it exactly there. A point is a file name, reached
    when its atomic write has a complete temp file not renamed yet, or when a run has written that checkpoint."""
    wanted = os.environ.get(KILL_AT)
    if not wanted or wanted.partition("#")[0] != point:
        return
    _times_reached[point] += 1
    if _times_reached[point] == int(wanted.partition("#")[2] or 1):
        os.kill(os.getpid(), getattr(signal, f"SIG{os.environ.get(KILL_SIGNAL, 'KILL')}"))


def temp_writer(temp: Path) -> tuple[int, str] | None:
    """The pid and host of the process whose ``atomic_write`` made ``temp``; None for a name it does not make."""
    before, _, host = temp.name.rsplit(".", 2)[0].rpartition("@")  # .{name}.{pid}@{host}.{random}.tmp
    pid = before.rpartition(".")[2]
    return (int(pid), host) if pid.isdigit() and host else None


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Write through a temp file named after its writer (``temp_writer``), so that a cleaner can tell the temp file
    of a process killed mid-write from one a live process is filling."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    owner = f"{os.getpid()}@{socket.gethostname()}"
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{owner}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temp, 0o644)
        reached(path.name)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda stream: stream.write(text.encode()))


def write_json(path: str | Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_csv(path: str | Path, frame: pd.DataFrame) -> None:
    """Floats with 17 significant digits: a float64 read back is the same float64."""
    atomic_write_text(path, frame.to_csv(index=False, float_format="%.17g"))
