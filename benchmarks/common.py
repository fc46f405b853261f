"""What every benchmark script shares: the machine description and appending to RESULTS.md."""

from __future__ import annotations

import os
import platform
import shlex
import sys
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import torch

from landmark_bench.runs import code_version

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    packages = ", ".join(f"{name} {version(name)}" for name in ("torch", "lightning", "timm", "diffusers", "lightly"))
    return f"{platform.machine()}, {cores} cores, {device}, Python {platform.python_version()}, {packages}"


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def command_line() -> str:
    """This script's command as run from the repository root (the scripts import ``benchmarks.common``, so they
    run as modules, in the venv)."""
    module = "benchmarks." + Path(sys.argv[0]).stem
    return " ".join([".venv/bin/python", "-m", module, *(shlex.quote(arg) for arg in sys.argv[1:])])


def report(title: str, table: str, notes: str = "", append: bool = True, path: Path = RESULTS) -> None:
    """Print the table and append it to ``path`` (RESULTS.md) with the command, commit, machine and date."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = f"\n### {title}\n\n`{command_line()}`  \n{stamp}; commit {code_version()}; {machine()}\n\n{table}\n"
    if notes:
        section += f"\n{notes}\n"
    print(section)
    if append:
        with Path(path).open("a") as stream:
            stream.write(section)
