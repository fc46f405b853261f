"""A Markdown table of fine-tune run folders for a selection record: each run's method, its ``--set`` overrides,
best and final validation MRE (the best is what model selection restores), validation SDR at the largest radius,
and training seconds. Validation only: the runs' test figures are not read.

    .venv/bin/python results/selection/run_table.py sweeps/sel-aasce/*/
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(folders: list[str]) -> None:
    print("| method | settings (--set) | best val MRE | final val MRE | final val SDR, largest radius | train s |")
    print("|---|---|---:|---:|---:|---:|")
    for folder in folders:
        run = json.loads((Path(folder) / "run.json").read_text())
        overrides = json.loads((Path(folder) / "config.json").read_text()).get("overrides") or {}
        val = run["metrics"]["val"]
        radius = max(val["sdr"], key=float)
        settings = " ".join(f"{key.split('.')[-1]}={value}" for key, value in overrides.items()) or "preset"
        print(f"| {run['method']} | {settings} | {run['best_val_mre']:.1f} | {val['mre']:.1f} | "
              f"{val['sdr'][radius]:.1f}% at {float(radius):g} {val['unit']} | {run['train_seconds']:.0f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
