"""Settings from the command line: ``--set key=value`` and ``--config FILE`` into the preset."""

from __future__ import annotations

import json

import pytest
import torch

from landmark_bench.cli import main
from landmark_bench.presets import get_preset, parse_assignments


def _finetune(out, *extra: str) -> dict:
    assert main(["finetune", "--method", "scratch", "--preset", "tiny", "--shots", "5", "--out", str(out),
                 *extra]) == 0
    return json.loads((out / "run.json").read_text())


def test_set_reaches_the_module_and_changes_the_config_hash(tmp_path):
    default = _finetune(tmp_path / "default", "--set", "finetune.max_steps=4", "finetune.val_every=2")
    changed = _finetune(tmp_path / "changed", "--set", "finetune.max_steps=4", "finetune.val_every=2",
                        "finetune.lr=0.0123")
    hparams = torch.load(changed["best_checkpoint"], map_location="cpu", weights_only=True)["hyper_parameters"]
    assert hparams["lr"] == 0.0123 and hparams["max_steps"] == 4
    assert changed["finetune"]["lr"] == 0.0123 and changed["overrides"]["finetune.lr"] == 0.0123
    assert changed["config_hash"] != default["config_hash"]
    recorded = json.loads((tmp_path / "changed" / "config.json").read_text())
    assert recorded["overrides"] == {"finetune.max_steps": 4, "finetune.val_every": 2, "finetune.lr": 0.0123}


def test_set_reaches_a_module_keyword_the_preset_leaves_at_its_default(tmp_path, capsys):
    assert "student_temp" not in get_preset("tiny")["pretrain"]["dino"]
    command = ["pretrain", "--method", "dino", "--datasets", "phantom", "--preset", "tiny", "--out", str(tmp_path)]
    assert main([*command, "--set", "pretrain.dino.student_temp=0.2", "pretrain.dino.max_steps=2"]) == 0
    hparams = torch.load(tmp_path / "pretrained.ckpt", map_location="cpu", weights_only=False)["hyper_parameters"]
    assert hparams["student_temp"] == 0.2 and hparams["max_steps"] == 2
    # a typo is still refused, and the module's keywords are among the settings it lists
    assert main([*command, "--set", "pretrain.dino.student_tmp=0.2"]) == 2
    assert "pretrain.dino.student_temp" in capsys.readouterr().err
    # the network and the datasets are the run's, not settings
    assert main([*command, "--set", "pretrain.dino.encoder=resnet18"]) == 2


def test_config_file_gives_the_same_run_as_set(tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text("finetune:\n  max_steps: 4\n  val_every: 2\nfinetune.lr: 0.0123\n")
    from_file = _finetune(tmp_path / "file", "--config", str(config))
    from_set = _finetune(tmp_path / "set", "--set", "finetune.max_steps=4", "finetune.val_every=2",
                         "finetune.lr=0.0123")
    assert from_file["config_hash"] == from_set["config_hash"]


@pytest.mark.parametrize("command", [["finetune", "--method", "scratch"], ["pretrain", "--method", "simclr"],
                                     ["sweep", "--methods", "scratch", "--dry-run"]])
def test_unknown_key_lists_the_valid_ones(command, tmp_path, capsys):
    assert main([*command, "--preset", "tiny", "--out", str(tmp_path / "x"), "--set", "finetune.learning_rate=1"]) == 2
    error = capsys.readouterr().err
    assert "unknown setting 'finetune.learning_rate'" in error and "finetune.lr" in error
    assert not (tmp_path / "x" / "run.json").exists()


def test_values_are_python_literals_else_text():
    assert parse_assignments(["a=5e-4", "b=[160, 128]", "c=None", "d=resnet18", "e=True"]) == {
        "a": 5e-4, "b": [160, 128], "c": None, "d": "resnet18", "e": True}
    with pytest.raises(ValueError, match="key=value"):
        parse_assignments(["finetune.lr"])
    assert get_preset("tiny", {"encoder": "resnet18"})["encoder"] == "resnet18"


def test_sweep_refuses_to_resume_a_folder_with_other_settings(tmp_path, capsys):
    sweep = ["sweep", "--methods", "mean_shape", "--preset", "tiny", "--seeds", "0", "--shots", "5",
             "--out", str(tmp_path)]
    assert main([*sweep, "--set", "finetune.sigma=3.0"]) == 0
    assert json.loads((tmp_path / "sweep.json").read_text())["overrides"] == {"finetune.sigma": 3.0}
    assert main(sweep) == 2
    assert "use another --out" in capsys.readouterr().err


def test_a_size_that_is_not_a_size_is_refused_with_its_value(tmp_path, capsys):
    # YAML's null is not a Python literal, so it arrives as the text "null": an error quoting it, not an unpacking one
    command = ["pretrain", "--method", "ddpm", "--datasets", "phantom", "--preset", "tiny", "--out", str(tmp_path)]
    assert main([*command, "--set", "pretrain.ddpm.crop_size=null"]) == 2
    assert "got 'null'" in capsys.readouterr().err
    assert not (tmp_path / "pretrained.ckpt").exists()
