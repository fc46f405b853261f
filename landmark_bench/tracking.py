"""Loggers of a run: a CSV log always, and Weights & Biases through Lightning's logger.

W&B is offline unless the user turns it on (``WANDB_MODE=online``), and off with ``WANDB_MODE=disabled``.
Only the run's config is sent: never the environment, so no credential reaches logs, configs or results.
"""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger


def wandb_mode() -> str:
    mode = os.environ.get("WANDB_MODE", "offline")
    if mode not in ("online", "offline", "disabled", "dryrun", "run"):
        raise ValueError(f"WANDB_MODE={mode!r}; use online, offline or disabled")
    return mode


def run_loggers(run_dir: Path, name: str, group: str | None, tags: list[str], config: dict) -> list[Logger]:
    loggers: list[Logger] = [CSVLogger(run_dir, name="logs")]
    if wandb_mode() != "disabled":
        loggers.append(WandbLogger(project=os.environ.get("WANDB_PROJECT", "landmark_bench"), name=name, group=group,
                                   tags=tags, save_dir=str(run_dir), offline=wandb_mode() != "online", config=config,
                                   settings=quiet_settings()))
    return loggers


def quiet_settings():
    """W&B writes its banner and sync hints to its own log file, not the console: a sweep's progress stays legible."""
    import wandb

    return wandb.Settings(silent=True, show_info=False, show_warnings=False)


def finish(loggers: list[Logger]) -> None:
    """Close the W&B run, so that the next run of the same process starts its own."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()


def log_leaderboard(sweep_dir: Path, paths: dict[str, Path]) -> None:
    """The leaderboard as a W&B table, with the figures, in the sweep's group."""
    if wandb_mode() == "disabled":
        return
    import pandas as pd
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")  # the banner goes to the run's log file, as for every run
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "landmark_bench"), group=Path(sweep_dir).resolve().name,
                     job_type="leaderboard", name="leaderboard", dir=str(sweep_dir),
                     mode="online" if wandb_mode() == "online" else "offline")
    try:
        run.log({"leaderboard": wandb.Table(dataframe=pd.read_csv(paths["csv"]))})
        run.log({Path(path).stem: wandb.Image(str(path)) for path in paths.values() if str(path).endswith(".png")})
    finally:
        run.finish()
