"""Reliability: interrupted work, determinism, checkpoints that must not load, and safe launching."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pandas as pd
import pytest

from landmark_bench.checkpoints import CheckpointError, read_checkpoint
from landmark_bench.cli import main
from landmark_bench.data.datamodule import LandmarkDataModule
from landmark_bench.finetune import finetune
from landmark_bench.sweep import FinetuneJob, PretrainJob, run_subprocess, run_sweep
from landmark_bench.sweep.launchers import Submitit

SWEEP = ["sweep", "--methods", "mean_shape", "--datasets", "phantom", "--shots", "1", "5", "--seeds", "0", "1",
         "--preset", "tiny"]


def test_sweep_killed_at_five_points_keeps_every_row_once(tmp_path, forked):
    """Killed before anything, as a job starts, as one ends (status done, run.json not yet in place), inside the
    results.csv write, and in the middle of the third job; each start goes on from what the last one left."""
    command = [*SWEEP, "--out", str(tmp_path)]
    for point in ("sweep.json", "status.json", "run.json", "results.csv", "metrics.json#2"):
        forked.kill_at(command, point)
        if (tmp_path / "results.csv").exists():  # never a torn file, never a duplicate
            assert not pd.read_csv(tmp_path / "results.csv").duplicated(["method", "shots", "seed"]).any()
        killed_writes = list(tmp_path.glob(".results.csv.*.tmp"))
        assert bool(killed_writes) == (point == "results.csv")  # the next start removed it
    rows = run_sweep(out=tmp_path, methods=["mean_shape"], datasets=["phantom"], shots=[1, 5], seeds=[0, 1],
                     preset="tiny")
    assert len(rows) == 4 and not rows.duplicated(["method", "shots", "seed"]).any() and (rows.status == "done").all()
    assert not list(tmp_path.rglob("*.tmp")) and not list((tmp_path / "claims").iterdir())


def test_killed_pretraining_resumes_from_its_last_checkpoint(tmp_path, forked):
    command = ["pretrain", "--method", "ddpm", "--datasets", "phantom", "--preset", "tiny", "--out", str(tmp_path)]
    forked.kill_at(command, "last.ckpt#5")  # the tiny preset saves it every step
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file() and not (tmp_path / "pretrained.ckpt").exists()
    assert main(command) == 0
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["resumed_from_step"] == 5 and record["steps"] == record["pretrain"]["max_steps"]
    assert read_checkpoint(tmp_path / "pretrained.ckpt", "ddpm")["global_step"] == record["steps"]


def test_pretraining_killed_after_its_checkpoint_before_its_record_is_recorded_not_retrained(tmp_path, forked):
    command = ["pretrain", "--method", "ddpm", "--datasets", "phantom", "--preset", "tiny", "--out", str(tmp_path)]
    forked.kill_at(command, "run.json")
    checkpoint = (tmp_path / "pretrained.ckpt").read_bytes()
    assert not (tmp_path / "run.json").exists() and list(tmp_path.glob(".run.json.*.tmp"))  # the killed write's
    job = PretrainJob("ddpm", ("phantom",), "tiny", str(tmp_path))
    assert job.state() == "pending"  # not done until recorded
    assert main(command) == 0
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["status"] == "done" and record["recorded_after_interruption"]
    assert job.state() == "done" and (tmp_path / "pretrained.ckpt").read_bytes() == checkpoint  # not retrained
    assert not (tmp_path / "checkpoints").exists() and not list(tmp_path.glob(".*.tmp"))


def test_same_command_same_seed_same_metrics(tiny_runs, tmp_path):
    tiny_scratch_run = tiny_runs["scratch"]
    again = finetune(method="scratch", dataset="phantom", shots=10, seed=0, preset="tiny", out=tmp_path)
    first = json.loads((Path(tiny_scratch_run["run_dir"]) / "metrics.json").read_text())
    assert json.loads((tmp_path / "metrics.json").read_text()) == first  # every digit
    assert again["subset_ids"] == tiny_scratch_run["subset_ids"]


def test_subsets_do_not_depend_on_workers(data_dir):
    subsets = []
    for workers in (0, 2):
        datamodule = LandmarkDataModule("chest", str(data_dir), shots=5, seed=4, resolution=16, num_workers=workers)
        datamodule.setup()
        subsets.append(datamodule.subset_ids)
    assert subsets[0] == subsets[1]


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-checkpoint",))


def test_checkpoints_never_execute_pickled_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.ckpt"
    with path.open("wb") as stream:
        pickle.dump({"state_dict": {}, "payload": RunsCode()}, stream)
    with pytest.raises(CheckpointError, match="cannot be read"):
        read_checkpoint(path)
    assert not (tmp_path / "pwned-by-checkpoint").exists()


def test_truncated_and_foreign_checkpoints_fail_clearly(tmp_path, capsys):
    pretrained = tmp_path / "pre"
    assert main(["pretrain", "--method", "ddpm", "--datasets", "phantom", "--preset", "tiny", "--out", str(pretrained)]) == 0
    checkpoint = pretrained / "pretrained.ckpt"
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(checkpoint.read_bytes()[:5000])
    for method, path, message in [("ddpm", truncated, "cannot be read"),
                                  ("cdpm_align", checkpoint, "written by method 'ddpm', not 'cdpm_align'"),
                                  ("simclr", checkpoint, "written by method 'ddpm', not 'simclr'")]:
        out = tmp_path / f"run-{method}-{path.stem}"
        assert main(["finetune", "--method", method, "--pretrained", str(path), "--preset", "tiny", "--out", str(out)]) == 2
        error = capsys.readouterr().err
        assert message in error and str(path) in error
        assert json.loads((out / "status.json").read_text())["status"] == "failed"
        assert not (out / "metrics.json").exists()


def test_jobs_are_launched_with_argument_lists_not_a_shell(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = FinetuneJob("mean_shape", "chest", 5, 0, "tiny", str(tmp_path / "run"))
    assert run_subprocess(job, "$(touch injected); touch injected2", "group", "cpu") == "failed"
    assert not (tmp_path / "injected").exists() and not (tmp_path / "injected2").exists()
    assert "does not exist" in json.loads((tmp_path / "run" / "status.json").read_text())["reason"]


def test_a_job_process_runs_the_sweeps_own_code_not_a_copy_in_its_working_folder(tmp_path, monkeypatch):
    decoy = tmp_path / "landmark_bench"
    decoy.mkdir()
    (decoy / "__init__.py").write_text("raise ImportError('a copy of the package in the working folder')\n")
    monkeypatch.chdir(tmp_path)
    job = FinetuneJob("mean_shape", "phantom", 5, 0, "tiny", str(tmp_path / "run"))
    assert run_subprocess(job, None, "group", "cpu") == "done", (tmp_path / "run" / "job.log").read_text()
    # submitit's job processes too (they unpickle the job, importing the package)
    job = FinetuneJob("mean_shape", "phantom", 5, 0, "tiny", str(tmp_path / "submitit-run"))
    environ = dict(os.environ)
    Submitit(None, "group", 1, "local", {}).submit([job], on_finish=lambda job: None)
    assert job.state() == "done", json.loads((tmp_path / "submitit-run" / "status.json").read_text())
    assert dict(os.environ) == environ


def test_no_credential_reaches_run_files(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "secret-key-0123456789")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    finetune(method="mean_shape", dataset="phantom", shots=5, seed=0, preset="tiny", out=tmp_path)
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert b"secret-key-0123456789" not in path.read_bytes(), path


def test_code_version_of_a_copied_tree_without_git_or_installation(monkeypatch):
    """A source tree copied to a machine without git and run from its root (no installed package) still records
    runs: its code version says what it cannot tell instead of failing at the end of a run."""
    import importlib.metadata
    import subprocess

    from landmark_bench import runs

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(subprocess, "run", no_git)
    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert runs.code_version() == "unknown (no git checkout, package not installed)"
