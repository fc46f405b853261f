"""Reliability figures: bad-input cases, sweeps killed (SIGKILL) and resumed, reruns that differ.

Every bad-input case must end with exit code 2 and a message naming the culprit; every killed sweep,
once rerun, must hold each row exactly once; the same command with the same seed must give the same
metrics to the last digit.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from benchmarks.common import markdown_table, report

CLI = [sys.executable, "-m", "landmark_bench.cli"]


def bad_input_cases(data_dir: str, work: Path) -> list[tuple[str, list[str], str]]:
    truth = work / "truth.csv"
    subprocess.run([*CLI, "annotations", "--dataset", "chest", "--data-dir", data_dir, "--split", "test",
                    "--out", str(truth)], check=True, capture_output=True)
    frame = pd.read_csv(truth, dtype={"image_id": str})
    variants = {"missing": frame.drop(index=0), "duplicate": pd.concat([frame, frame.iloc[[0]]]),
                "unknown": frame.assign(image_id=frame.image_id.where(frame.index != 0, "nope"))}
    cases = []
    for name, variant in variants.items():
        path = work / f"{name}.csv"
        variant.to_csv(path, index=False)
        cases.append((f"predictions CSV with {name} row", [*CLI, "evaluate", "--dataset", "chest", "--data-dir", data_dir,
                                                            "--split", "test", "--predictions", str(path)], str(path)))
    garbage = work / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    finetune = [*CLI, "finetune", "--preset", "tiny", "--out", str(work / "run")]
    cases += [
        ("unknown method", [*finetune, "--method", "resnet"], "valid methods"),
        ("unknown dataset", [*finetune, "--method", "scratch", "--dataset", "mnist"], "valid datasets"),
        ("unknown preset", [*CLI, "finetune", "--method", "scratch", "--preset", "huge"], "valid presets"),
        ("shots larger than the training split", [*finetune, "--method", "scratch", "--dataset", "chest",
                                                  "--data-dir", data_dir, "--shots", "50"], "larger than"),
        ("shots of the wrong type", [*finetune, "--method", "scratch", "--shots", "ten"], "--shots"),
        ("seed of the wrong type", [*finetune, "--method", "scratch", "--seed", "x"], "--seed"),
        ("data folder of the wrong layout", [*finetune, "--method", "scratch", "--dataset", "isbi2015",
                                             "--data-dir", str(work)], "right layout"),
        ("unreadable checkpoint", [*finetune, "--method", "ddpm", "--pretrained", str(garbage)], str(garbage)),
    ]
    return cases


def killed_sweeps(work: Path, kills: int) -> tuple[int, int, int]:
    """(interruptions survived, rows lost, rows duplicated) over ``kills`` SIGKILLs at successive jobs."""
    out = work / "sweep"
    command = [*CLI, "sweep", "--methods", "mean_shape", "--datasets", "phantom", "--shots", "1", "5", "10", "25",
               "--seeds", *map(str, range(max(2, (kills + 3) // 4))), "--preset", "tiny", "--out", str(out)]
    survived = 0
    for point in range(kills):
        started = len(list(out.glob("runs/*/status.json")))
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and len(list(out.glob("runs/*/status.json"))) <= started:
            time.sleep(0.01)
        time.sleep(0.1 * (point % 5))
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            survived += 1
        process.wait()
    subprocess.run(command, check=True, capture_output=True)
    rows = pd.read_csv(out / "results.csv")
    expected = 4 * max(2, (kills + 3) // 4)
    duplicated = int(rows.duplicated(["method", "shots", "seed"]).sum())
    return survived, expected - (len(rows) - duplicated), duplicated


def reruns_differ(work: Path, reruns: int) -> int:
    metrics = []
    for index in range(reruns):
        out = work / f"rerun{index}"
        subprocess.run([*CLI, "finetune", "--method", "scratch", "--dataset", "phantom", "--shots", "5", "--seed", "0",
                        "--preset", "tiny", "--out", str(out)], check=True, capture_output=True)
        metrics.append(json.loads((out / "metrics.json").read_text()))
    return sum(metric != metrics[0] for metric in metrics[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--kills", type=int, default=8)
    parser.add_argument("--reruns", type=int, default=3)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        cases = bad_input_cases(args.data_dir, work)
        clean = 0
        for _, command, culprit in cases:
            result = subprocess.run(command, capture_output=True, text=True)
            clean += result.returncode == 2 and culprit in result.stderr
        survived, lost, duplicated = killed_sweeps(work, args.kills)
        differed = reruns_differ(work, args.reruns)
    table = markdown_table(["check", "tried", "result"], [
        ["bad-input cases ending in exit 2 with the culprit named", len(cases), f"{clean} / {len(cases)}"],
        ["sweeps killed with SIGKILL at successive jobs, then rerun", args.kills, f"{survived} interruptions survived"],
        ["rows lost after the reruns (must be 0)", "", lost],
        ["rows duplicated after the reruns (must be 0)", "", duplicated],
        ["identical reruns (same command and seed) that differed (must be 0)", args.reruns, differed],
    ])
    report("Reliability", table, "Bad-input cases: " + "; ".join(name for name, _, _ in cases) + ".",
           append=not args.no_append)


if __name__ == "__main__":
    main()
