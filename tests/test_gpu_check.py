"""`make gpu-check`: its CPU smoke run end to end, and the sweep's dry run of the paper preset, whose GPU-hours are
called guessed until a GPU run wrote measured step costs, and follow those costs once it has."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from landmark_bench import presets
from landmark_bench.cli import main
from landmark_bench.methods import family_of, get_method, method_names

REPO = Path(__file__).resolve().parents[1]
# The package's own methods: other test modules register toy methods in this process, which the check's own
# subprocess does not know.
OWN_METHODS = [name for name in method_names() if get_method(name).__module__.startswith("landmark_bench.")]
PAPER_SWEEP = ["sweep", "--preset", "paper", "--methods", *OWN_METHODS, "--protocols", "finetune", "probe",
               "--datasets", "isbi2015", "--shots", "10", "25", "--seeds", "0", "1", "2", "--dry-run"]


def table_rows(text: str) -> dict[str, list[str]]:
    """The Markdown table's rows by their first cell."""
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ")]
    return {row[0]: row[1:] for row in rows}


def test_cpu_smoke_run_times_every_method(tmp_path):
    out = tmp_path / "RESULTS.md"
    check_file = presets.GPU_CHECK_FILE
    before = check_file.stat().st_mtime if check_file.exists() else None
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}  # the CPU path even on a GPU machine
    subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(out)], cwd=REPO, env=env, check=True,
                   timeout=300)
    text = out.read_text()
    assert "CPU smoke run" in text and "guessed, not measured" in text and "commit " in text
    rows = table_rows(text)
    header = rows.pop("method")
    columns = {name: index for index, name in enumerate(header)}
    for method in OWN_METHODS:
        row = rows[method]
        kinds = [*(["pretrain"] if get_method(method).pretrains else []),
                 *(["fine-tune", "probe"] if family_of(method) else [])]
        for kind in kinds:
            assert math.isfinite(float(row[columns[f"{kind} steps/s"]])) and float(row[columns[f"{kind} steps/s"]]) > 0
        assert float(row[columns["method total CPU-h"]]) > 0, method
    total = rows["**total**"][columns["method total CPU-h"]]
    assert float(total.split("**")[1]) > 0 and "107 jobs" in total
    after = check_file.stat().st_mtime if check_file.exists() else None
    assert after == before  # a CPU run replaces no paper figure


def test_paper_dry_run_gpu_hours_guessed_then_measured(tmp_path, monkeypatch, capsys):
    check_file = tmp_path / "gpu_check.json"
    monkeypatch.setattr(presets, "GPU_CHECK_FILE", check_file)
    assert main([*PAPER_SWEEP, "--out", str(tmp_path / "sweep")]) == 0
    printed = capsys.readouterr().out
    assert "preset paper: about 9.7 GPU-hours" in printed
    assert "an estimate: the per-step costs are guessed, not measured" in printed

    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks.gpu_check import write_check_file

    write_check_file({"pretrain_step": {name: 0.2 for name in ("ddpm", "cdpm_align", "simclr", "moco", "dino")},
                      "pretrain_step_by_family": {"encoder": 0.2, "diffusion": 0.2},
                      "finetune_step": {"encoder": 0.01, "diffusion": 0.02},
                      "probe_step": {"encoder": 0.001, "diffusion": 0.002}}, "Test GPU", check_file)
    assert main([*PAPER_SWEEP, "--out", str(tmp_path / "sweep")]) == 0
    printed = capsys.readouterr().out
    # pretrainings 2 x (30 + 50000 x 0.2) + 3 x (30 + 5000 x 0.2); 6 jobs a protocol: mean_shape 30 s, encoder
    # 60 + 40 (fine-tune), 60 + 4 (probe) for 5 methods, diffusion 90 + 80 and 90 + 8 for 3: 33074 s
    assert "preset paper: about 9.2 GPU-hours" in printed and "measured by `make gpu-check` on Test GPU" in printed
    assert "guessed" not in printed.replace("evaluation guessed", "")

    check_file.write_text("{not json")
    with pytest.raises(ValueError, match="cannot be read"):
        presets.get_preset("paper")
    assert presets.get_preset("cpu")["estimate"] == presets.ESTIMATE["cpu"]  # other presets never read it
