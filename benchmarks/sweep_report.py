"""Per-run figures of a finished sweep for RESULTS.md: every fine-tune and probe (MRE, SDR, ERE, wall and
training time), every pretraining (wall time and its health record: did it learn?), the time per stage, and
the dry run's estimate against the measured time."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from benchmarks.common import markdown_table, report
from landmark_bench.sweep import FinetuneJob, PretrainJob, estimate_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("sweep_dir")
    parser.add_argument("--split", default="test")
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    sweep = Path(args.sweep_dir)
    rows = pd.read_csv(sweep / "results.csv")
    if "protocol" not in rows:
        rows["protocol"] = "finetune"
    rows["protocol"] = rows.protocol.fillna("finetune")
    runs = rows[rows.method != "inter_observer"].sort_values(["dataset", "shots", "protocol", "method", "seed"])
    split, unit = args.split, runs.unit.dropna().iloc[0]
    sdr = sorted(column for column in runs.columns if column.startswith(f"{split}_sdr_"))
    table = markdown_table(
        ["method", "protocol", "dataset", "shots", "seed", "status", f"{split} MRE ({unit})",
         *[f"SDR {column.rsplit('_', 1)[1]}" for column in sdr], f"ERE ({unit})", "val MRE", "train s", "wall s"],
        [[row.method, row.protocol, row.dataset, row.shots, int(row.seed), row.status, f"{row[f'{split}_mre']:.3f}",
          *[f"{row[column]:.1f}" for column in sdr],
          "–" if pd.isna(row[f"{split}_ere"]) else f"{row[f'{split}_ere']:.3f}", f"{row.val_mre:.3f}",
          f"{row.train_seconds:.1f}", f"{row.wall_seconds:.1f}"] for _, row in runs.iterrows()],
    )
    settings = json.loads((sweep / "sweep.json").read_text())
    pretraining, measured_pretrain, estimated = [], 0.0, 0.0
    for folder in sorted((sweep / "pretrain").glob("*")):
        record = json.loads((folder / "run.json").read_text())
        job = PretrainJob(record["method"], tuple(record["datasets"]), record["preset"], str(folder))
        measured_pretrain += record["wall_seconds"]
        estimated += estimate_seconds(job)
        health = record.get("health") or {}
        pretraining.append([record["method"], record["steps"], f"{record['wall_seconds'] / 60:.2f}",
                            f"{estimate_seconds(job) / 60:.2f}",
                            {True: "yes", False: "**no**"}.get(health.get("learned"), "–"), health.get("summary", "–")])
    for _, row in runs.iterrows():
        estimated += estimate_seconds(FinetuneJob(row.method, row.dataset, row.shots, int(row.seed), row.preset, "",
                                                  protocol=row.protocol))
    finished = max(json.loads((Path(run) / "run.json").read_text())["finished_at"] for run in runs.run_dir)
    sweep_wall = (finished - (sweep / "sweep.json").stat().st_mtime) / 60
    stages = markdown_table(["stage", "jobs", "summed job time (min)"], [
        ["pretraining", len(pretraining), f"{measured_pretrain / 60:.1f}"],
        *[[f"{protocol} + evaluation", int((runs.protocol == protocol).sum()),
           f"{runs.wall_seconds[runs.protocol == protocol].sum() / 60:.1f}"] for protocol in runs.protocol.unique()],
        ["dry-run estimate of all jobs (current cost model)", len(pretraining) + len(runs), f"{estimated / 60:.1f}"],
    ])
    stages += (f"\n\nSweep wall time, from `sweep.json` being written to the last fine-tune finishing: "
               f"{sweep_wall:.1f} min (launcher `{settings['launcher']}`"
               + (f", slots {' '.join(settings['slots'])})." if settings.get("slots") else ")."))
    body = (f"Fine-tune runs ({split} split):\n\n{table}\n\nPretraining runs:\n\n"
            + markdown_table(["method", "steps", "wall (min)", "dry-run estimate (min)", "learned", "health"],
                             pretraining)
            + f"\n\nTime per stage (summed over jobs; jobs ran with launcher `{settings['launcher']}`):\n\n{stages}")
    report(f"Sweep {sweep.name}: {', '.join(settings['methods'])} on {', '.join(settings['datasets'])}", body,
           append=not args.no_append)


if __name__ == "__main__":
    main()
