"""Atomic file writes: a temp file in the same folder, then a rename, so a killed process never
leaves half a file behind and readers see the old version or the new one."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import pandas as pd


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temp, 0o644)
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
