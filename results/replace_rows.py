"""Replace one method's rows of a committed grid (its results.csv and per_image_mre.csv) by those of a newer sweep,
so that a method re-run with new settings joins the grid whose other rows did not change (the newer sweep may hold
other datasets and shot counts: only the grid's own (dataset, protocol, shots, seed) runs are taken); then
`landmark-bench leaderboard GRID --out GRID` rebuilds the tables from the files alone.

Refuses (and writes nothing) when the newer sweep lacks one of the grid's (dataset, protocol, shots, seed) runs of the
method or one that is not done, so a half-finished sweep cannot leave a grid with missing rows.

With `--robustness NEW.md` it replaces the method's rows of the grid's `robustness.md` and `.csv` instead, by those of
a newer `landmark-bench robustness` output (NEW.md and NEW.csv) that scored the same runs, and refuses likewise when
the row counts differ."""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

RUN_KEYS = ["dataset", "protocol", "shots", "seed"]  # read as text, like every column: the files keep their bytes


def replace(grid: Path, newer: Path, method: str) -> None:
    old_results, new_results = (pd.read_csv(path, dtype=str, keep_default_na=False) for path in (grid / "results.csv", newer / "results.csv"))
    wanted = old_results.loc[old_results.method == method, RUN_KEYS]
    fresh = new_results[(new_results.method == method) & (new_results.status == "done")]
    missing = wanted.merge(fresh[RUN_KEYS], how="left", indicator=True).query("_merge == 'left_only'")
    if not len(wanted) or len(missing):
        raise SystemExit(f"{newer / 'results.csv'}: no finished {method} run for "
                         f"{missing[RUN_KEYS].to_dict('records') or 'any row of the grid'}; nothing written")
    aligned = wanted.merge(fresh, on=RUN_KEYS, how="left")  # in the grid's order of the method's runs
    per_image_old = pd.read_csv(grid / "per_image_mre.csv", dtype=str, keep_default_na=False)
    per_image_new = pd.read_csv(newer / "leaderboard" / "per_image_mre.csv", dtype=str, keep_default_na=False)
    per_image_new = per_image_new[per_image_new.method == method].merge(wanted, on=RUN_KEYS)
    results = old_results.copy()
    results.loc[old_results.method == method, :] = aligned[old_results.columns].to_numpy()
    per_image = pd.concat([per_image_old[per_image_old.method != method], per_image_new[per_image_old.columns]])
    results.to_csv(grid / "results.csv", index=False)
    per_image.to_csv(grid / "per_image_mre.csv", index=False)
    print(f"{grid}: {len(aligned)} {method} runs and {len(per_image_new)} per-image rows from {newer}")


def replace_robustness(grid: Path, newer_markdown: Path, method: str) -> None:
    old_rows, new_rows = (pd.read_csv(path, dtype=str, keep_default_na=False)
                          for path in (grid / "robustness.csv", newer_markdown.with_suffix(".csv")))
    fresh = new_rows[new_rows.method == method]
    old_lines, new_lines = ((grid / "robustness.md").read_text().splitlines(), newer_markdown.read_text().splitlines())
    row_starts = (f"| {method} |", f"| {method} (not learned) |")  # the Markdown rows of the method, labelled or not
    slots = [i for i, line in enumerate(old_lines) if line.startswith(row_starts)]
    fresh_lines = [line for line in new_lines if line.startswith(row_starts)]
    if len(fresh) != (old_rows.method == method).sum() or len(fresh_lines) != len(slots) or not slots:
        raise SystemExit(f"{newer_markdown}: {len(fresh)} {method} rows and {len(fresh_lines)} table lines against the "
                         f"grid's {(old_rows.method == method).sum()} and {len(slots)}; nothing written")
    old_rows.loc[old_rows.method == method, :] = fresh[old_rows.columns].to_numpy()
    for slot, line in zip(slots, fresh_lines):
        old_lines[slot] = line
    old_rows.to_csv(grid / "robustness.csv", index=False)
    (grid / "robustness.md").write_text("\n".join(old_lines) + "\n")
    print(f"{grid}: {len(fresh)} {method} robustness rows and {len(slots)} table lines from {newer_markdown}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("grid", type=Path, help="a committed grid folder (results.csv, per_image_mre.csv)")
    parser.add_argument("newer", type=Path, help="a sweep folder that re-ran the method (its leaderboard/ built)")
    parser.add_argument("--method", required=True)
    parser.add_argument("--robustness", action="store_true",
                        help="NEWER is a robustness table (NEW.md beside NEW.csv): replace the grid's robustness rows")
    args = parser.parse_args()
    (replace_robustness if args.robustness else replace)(args.grid, args.newer, args.method)


if __name__ == "__main__":
    main()
