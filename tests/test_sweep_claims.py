"""Sweeps on one folder from several processes: each job claimed once, run once; dead owners' claims taken over."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pandas as pd

from landmark_bench.io import write_json
from landmark_bench.sweep import run_sweep
from landmark_bench.sweep.claims import HOST, STALE_SECONDS, Claims, clear_dead_writers_temp_files

JOBS = {"ddpm", *(f"{method}-phantom-5shot-seed{seed}" for method in ("scratch", "ddpm") for seed in (0, 1))}


def dead_pid() -> int:
    """The pid of a process that has ended (and was reaped)."""
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                           check=True)
    return int(ended.stdout)


def test_two_sweeps_on_one_folder_share_the_work_and_train_each_run_once(tmp_path, forked):
    out, logs = tmp_path / "sweep", [tmp_path / "first.log", tmp_path / "second.log"]
    command = ["sweep", "--methods", "scratch", "ddpm", "--datasets", "phantom", "--shots", "5", "--seeds", "0", "1",
               "--preset", "tiny", "--out", str(out)]
    sweeps = [forked.start(command, log=log) for log in logs]
    codes = [forked.wait(sweep) for sweep in sweeps]
    outputs = [log.read_text() for log in logs]
    assert codes == [0, 0], [output[-3000:] for output in outputs]
    ran = [re.findall(r"\] done: (\S+)", output) for output in outputs]  # a progress line for each job it ran
    assert sorted(ran[0] + ran[1]) == sorted(JOBS), ran
    waits = [re.findall(r"(\S+): running in another process \(pid (\d+) on host (\S+)\), waiting", output)
             for output in outputs]
    assert waits[0] or waits[1], outputs  # the pretraining, at least, was claimed by the one that got there first
    for waited, other in ((waits[0], sweeps[1]), (waits[1], sweeps[0])):
        assert all(job in JOBS and (pid, host) == (str(other.pid), HOST) for job, pid, host in waited), waited
    folders = [out / "pretrain" / "ddpm", *(out / "runs").iterdir()]
    assert {folder.name for folder in folders} == JOBS
    for folder in folders:  # one training: one CSV log version, one start of the run
        assert [path.name for path in (folder / "logs").iterdir()] == ["version_0"], folder
    rows = pd.read_csv(out / "results.csv")
    assert len(rows) == 4 and not rows.duplicated(["method", "shots", "seed"]).any() and (rows.status == "done").all()
    assert not list((out / "claims").iterdir())


def test_claim_of_a_dead_process_is_taken_over_and_its_job_run(tmp_path, capsys):
    run = tmp_path / "runs" / "mean_shape-phantom-5shot-seed0"
    write_json(run / "status.json", {"status": "running"})  # as its sweep left it when it was killed
    claim = Claims(tmp_path / "claims").path(str(run))
    write_json(claim, {"pid": dead_pid(), "host": HOST, "started": "2024-01-01T00:00:00+00:00", "token": "dead"})
    results = run_sweep(out=tmp_path, methods=["mean_shape"], datasets=["phantom"], shots=[5], seeds=[0],
                        preset="tiny")
    assert "running in another process" not in capsys.readouterr().out
    assert len(results) == 1 and (results.status == "done").all()
    assert json.loads((run / "status.json").read_text())["status"] == "done" and not claim.exists()


def test_claims_of_live_owners_hold_and_silent_ones_go_stale(tmp_path):
    claims = Claims(tmp_path / "claims")
    job = str(tmp_path / "runs" / "scratch-phantom-5shot-seed0")
    path = claims.path(job)
    write_json(path, {"pid": os.getpid(), "host": HOST, "started": "now", "token": "live here"})
    assert claims.claim(job)["token"] == "live here"
    write_json(path, {"pid": dead_pid(), "host": "another-host", "started": "now", "token": "live elsewhere"})
    assert claims.claim(job)["token"] == "live elsewhere"  # a pid of another host says nothing here
    silent = time.time() - STALE_SECONDS - 60
    os.utime(path, (silent, silent))  # no heartbeat for longer than the staleness limit
    assert claims.claim(job) is None
    assert json.loads(path.read_text())["pid"] == os.getpid()
    assert Claims(tmp_path / "claims").claim(job)["pid"] == os.getpid()  # held: another sweep of this host waits for it
    claims.release(job)
    assert not list((tmp_path / "claims").iterdir())  # nothing left, not even what a take-over moved aside


def test_a_sweep_start_removes_only_the_temp_files_of_dead_writers(tmp_path):
    """What a sweep killed while writing results.csv left goes; what a live sweep is still writing stays."""
    temps = {owner: tmp_path / f".results.csv.{owner}.k2x8_q0.tmp"
             for owner in (f"{dead_pid()}@{HOST}", f"{os.getpid()}@{HOST}", f"{dead_pid()}@another-host")}
    for temp in temps.values():
        temp.write_text("method,shots\n")
    dead, live, elsewhere = temps.values()
    clear_dead_writers_temp_files(tmp_path)
    assert not dead.exists() and live.exists() and elsewhere.exists()  # a pid of another host says nothing here
    silent = time.time() - STALE_SECONDS - 60
    os.utime(elsewhere, (silent, silent))
    clear_dead_writers_temp_files(tmp_path)
    assert not elsewhere.exists() and live.exists()
