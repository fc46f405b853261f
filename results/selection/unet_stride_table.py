"""The validation table of ``unet_stride.md``: each UNet row's validation MRE and training seconds per seed, at one
shot count, from a sweep's ``results.csv`` (stride 2) against the committed grid's (stride 1). Validation only.

    .venv/bin/python results/selection/unet_stride_table.py sweeps/sel-stride2/results.csv 10
"""

from __future__ import annotations

import statistics
import sys

import pandas as pd

METHODS = ("scratch_unet", "ddpm", "cdpm_align")
COMMITTED = "results/isbi2015/results.csv"


def finetunes(path: str, shots: int) -> pd.DataFrame:
    frame = pd.read_csv(path)
    return frame[(frame.protocol == "finetune") & (frame.shots == shots)].set_index(["method", "seed"])


def main(candidate: str, shots: int) -> None:
    before, after = finetunes(COMMITTED, shots), finetunes(candidate, shots)
    print("| method | seed | val MRE stride 1 (d328fa6) | val MRE stride 2 | train s stride 1 | train s stride 2 |")
    print("|---|---|---|---|---|---|")
    for method in METHODS:
        seeds = sorted(set(before.loc[method].index) & set(after.loc[method].index))
        for seed in seeds:
            old, new = before.loc[(method, seed)], after.loc[(method, seed)]
            print(f"| {method} | {int(seed)} | {old.val_mre:.2f} | {new.val_mre:.2f} | {old.train_seconds:.0f} | "
                  f"{new.train_seconds:.0f} |")
        print(f"| {method} | mean | {statistics.mean(before.loc[(method, s)].val_mre for s in seeds):.2f} | "
              f"{statistics.mean(after.loc[(method, s)].val_mre for s in seeds):.2f} | | |")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
