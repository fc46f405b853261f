"""The sweep: end to end on the phantom, killed and resumed, on two local slots, through submitit, W&B offline."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import submitit

from landmark_bench.cli import main
from landmark_bench.io import KILL_AT, KILL_SIGNAL
from landmark_bench.methods import family_of
from landmark_bench.presets import ESTIMATE
from landmark_bench.sweep import by_priority, estimate_seconds, estimated_wall_seconds, needs_of, plan, run_sweep

SWEEP = ["--methods", "mean_shape", "scratch", "--datasets", "phantom", "--shots", "5", "--seeds", "0", "1",
         "--preset", "tiny"]


def assert_rows_exactly_once(out: Path) -> pd.DataFrame:
    rows = pd.read_csv(out / "results.csv")
    assert len(rows) == 4 and not rows.duplicated(["method", "dataset", "shots", "seed"]).any()
    assert (rows.status == "done").all(), rows[["method", "seed", "status", "reason"]]
    return rows


def test_tiny_sweep_end_to_end_with_leaderboard(tmp_path, capsys):
    assert main(["sweep", *SWEEP, "--out", str(tmp_path), "--dry-run"]) == 0
    assert "0 done; estimated remaining job time" in capsys.readouterr().out and not (tmp_path / "results.csv").exists()
    assert main(["sweep", *SWEEP, "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "## phantom, Test, 5 shots (mm)" in printed and "leaderboard.tex" in printed
    rows = assert_rows_exactly_once(tmp_path)
    for column in ("subset_ids", "config_hash", "code_version", "checkpoint", "wall_seconds", "test_mre", "test_ere",
                   "test_sdr_2.0"):
        assert rows[column].notna().all() or column in ("test_ere", "checkpoint"), column
    by_method = rows.groupby("method").test_mre.mean()
    assert by_method["scratch"] * 3 < by_method["mean_shape"]
    # the restored checkpoint's validation MRE (logged in float32), never worse than the pass that ended training;
    # none for mean_shape
    trained = rows[rows.method == "scratch"]
    assert (trained.best_val_mre <= trained.val_mre * (1 + 1e-6)).all()
    assert rows.loc[rows.method == "mean_shape", "best_val_mre"].isna().all()
    for run in trained.itertuples():
        assert run.best_val_mre == json.loads((Path(run.run_dir) / "run.json").read_text())["best_val_mre"]
    assert rows.groupby("seed").subset_ids.nunique().eq(1).all()  # same images for every method
    board = pd.read_csv(tmp_path / "leaderboard" / "leaderboard.csv")
    assert set(board.method) == {"mean_shape", "scratch"}
    assert (tmp_path / "leaderboard" / "mre_vs_shots_phantom.png").stat().st_size > 0
    assert main(["sweep", *SWEEP, "--out", str(tmp_path), "--dry-run"]) == 0
    assert "4 done; estimated remaining job time 0.0 min, about 0.0 min of wall time" in capsys.readouterr().out


def test_sigkilled_sweep_resumes_with_every_row_once(tmp_path, forked):
    forked.kill_at(["sweep", *SWEEP, "--out", str(tmp_path)], "best.ckpt")  # in the middle of the first training
    assert not (tmp_path / "results.csv").exists() or len(pd.read_csv(tmp_path / "results.csv")) < 4
    run_sweep(out=tmp_path, methods=["mean_shape", "scratch"], datasets=["phantom"], shots=[5], seeds=[0, 1],
              preset="tiny")
    assert_rows_exactly_once(tmp_path)


def test_two_local_slots_run_jobs_concurrently(tmp_path):
    results = run_sweep(out=tmp_path, methods=["mean_shape"], datasets=["phantom"], shots=[5], seeds=[0, 1],
                        preset="tiny", launcher="local", slots=["cpu", "cpu"])
    assert len(results) == 2 and (results.status == "done").all()
    spans = sorted((record["started_at"], record["finished_at"]) for record in
                   (json.loads((Path(run) / "run.json").read_text()) for run in results.run_dir))
    assert any(start < previous_end for (_, previous_end), (start, _) in zip(spans, spans[1:])), spans


def test_submitit_job_preempted_mid_pretraining_is_requeued_and_resumes(tmp_path, monkeypatch):
    """Preempted as SLURM does it (submitit's signal) right after its fifth checkpoint, the pretraining is requeued
    and goes on from that checkpoint; the sweep ends with every row once and each job's logs in its run folder."""
    monkeypatch.setenv(KILL_AT, "last.ckpt#5")  # requeued, it resumes at step 5 and saves three more: preempted once
    monkeypatch.setenv(KILL_SIGNAL, "USR2")
    results = run_sweep(out=tmp_path, methods=["ddpm"], datasets=["phantom"], shots=[5], seeds=[0], preset="tiny",
                        launcher="submitit-local")
    assert len(results) == 1 and (results.status == "done").all()
    pretraining = tmp_path / "pretrain" / "ddpm"
    record = json.loads((pretraining / "run.json").read_text())
    assert record["resumed_from_step"] == 5 and record["steps"] == record["pretrain"]["max_steps"]
    log = "".join(path.read_text() for path in (pretraining / "submitit").glob("*_log.*"))
    assert "this job is preempted" in log and "Requeued job" in log, log
    for run in [pretraining, *map(Path, results.run_dir)]:
        assert list((run / "submitit").glob("*_0_log.out")), run


def test_submitit_job_killed_outright_is_recorded_failed_with_its_logs(tmp_path, monkeypatch):
    """A job that dies without a word (killed, out of memory) is recorded failed, saying where its logs are."""
    monkeypatch.setenv(KILL_AT, "config.json")  # written by the job, never by the sweep
    monkeypatch.setattr(submitit.core.core.Job, "_results_timeout_s", 0)  # no result is coming: no wait for one
    results = run_sweep(out=tmp_path, methods=["mean_shape"], datasets=["phantom"], shots=[5], seeds=[0],
                        preset="tiny", launcher="submitit-local")
    (reason,) = results.reason
    assert (results.status == "failed").all() and "has not produced any output" in reason, reason
    assert Path(reason.partition("logs: ")[2].partition(",")[0]).is_file(), reason


@pytest.mark.parametrize("launcher", ["inprocess", "local"])
def test_failed_job_is_recorded_and_the_sweep_goes_on(tmp_path, launcher):
    results = run_sweep(out=tmp_path, methods=["mean_shape", "simclr"], datasets=["phantom"], shots=[5], seeds=[0],
                        preset="tiny", pretrain_datasets=["no_such_dataset"], launcher=launcher)
    by_method = results.set_index("method")
    assert by_method.loc["mean_shape", "status"] == "done"
    assert by_method.loc["simclr", "status"] == "failed" and "pretraining simclr failed" in by_method.loc["simclr", "reason"]


def test_wandb_offline_run_holds_metrics_and_leaderboard(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert main(["sweep", "--methods", "mean_shape", "--datasets", "phantom", "--shots", "5", "--seeds", "0",
                 "--preset", "tiny", "--out", str(tmp_path)]) == 0
    run_files = list((tmp_path / "runs").glob("*/wandb/offline-run-*/run-*.wandb"))
    board_files = list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert run_files and board_files
    assert b"test/mre" in run_files[0].read_bytes()
    assert b"leaderboard" in board_files[0].read_bytes() and b"table-file" in board_files[0].read_bytes()
    config = json.loads((tmp_path / "runs" / "mean_shape-phantom-5shot-seed0" / "config.json").read_text())
    assert not any("WANDB_API_KEY" in json.dumps(value) for value in config.values())


@pytest.mark.parametrize("launcher", ["kubernetes"])
def test_unknown_launcher_is_named(tmp_path, capsys, launcher):
    assert main(["sweep", *SWEEP, "--out", str(tmp_path), "--launcher", launcher]) == 2
    assert "valid launchers: inprocess, local, slurm" in capsys.readouterr().err


def test_local_slots_fill_while_pretraining_and_fine_tunes_wait_for_it(tmp_path):
    results = run_sweep(out=tmp_path, methods=["mean_shape", "simclr"], datasets=["phantom"], shots=[5],
                        seeds=[0, 1], preset="tiny", launcher="local", slots=["cpu", "cpu"])
    assert len(results) == 4 and (results.status == "done").all()
    pretrained_at = (tmp_path / "pretrain" / "simclr" / "pretrained.ckpt").stat().st_mtime
    started = {Path(run).name: json.loads((Path(run) / "run.json").read_text())["started_at"]
               for run in results.run_dir}
    assert all(start > pretrained_at for name, start in started.items() if name.startswith("simclr")), started
    assert any(start < pretrained_at for name, start in started.items() if name.startswith("mean_shape")), started


def test_a_dataset_timed_apart_costs_its_measured_factor_in_the_dry_run(tmp_path):
    """AASCE 2019's jobs (68 landmarks, 96 validation images) take longer than ISBI's at the same steps and pixels
    per step: the cpu cost model scales their training and evaluation by the factor measured per protocol and
    family, and leaves the start-up as it is."""
    estimate = ESTIMATE["cpu"]
    protocols = ["finetune", "probe"]
    _, isbi = plan(tmp_path, ["scratch", "ddpm"], ["isbi2015"], [10], [0], "cpu", protocols=protocols)
    _, aasce = plan(tmp_path, ["scratch", "ddpm"], ["aasce2019"], [10], [0], "cpu", protocols=protocols)
    assert len(isbi) == len(aasce) == 4
    for on_isbi, on_aasce in zip(isbi, aasce):
        factor = estimate["dataset_factor"]["aasce2019"][on_isbi.protocol][family_of(on_isbi.method)]
        assert factor > 1
        assert estimate_seconds(on_aasce) - estimate["startup"] == pytest.approx(
            factor * (estimate_seconds(on_isbi) - estimate["startup"]))


def test_dry_run_wall_estimate_replays_the_local_schedule(tmp_path):
    """tiny estimates: simclr pretraining 5.4 s, its fine-tunes 13 s each, mean_shape 5 s each."""
    pretraining, finetunes = plan(tmp_path, ["mean_shape", "simclr"], ["phantom"], [5], [0, 1], "tiny")
    jobs, needs = by_priority(pretraining, finetunes), needs_of(pretraining)
    assert estimated_wall_seconds(jobs, needs, 1) == pytest.approx(5.4 + 2 * 13 + 2 * 5)
    # slot 0: pretraining, then a simclr fine-tune at 5.4 s; slot 1: both mean_shape runs (the fine-tunes wait),
    # then the other simclr fine-tune at 10 s
    assert estimated_wall_seconds(jobs, needs, 2) == pytest.approx(10 + 13)
