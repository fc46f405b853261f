"""Per-dataset and per-family fine-tuning settings: AASCE 2019's tall, narrow spine X-rays get their own resolution,
target width and batch, ISBI 2015 keeps the preset's, each network family may have its own (the cpu augmentation),
``--set`` still changes any of them, and a fine-tune on a few real AASCE images runs and reports pixels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from landmark_bench.cli import main
from landmark_bench.data.readers import Aasce2019Reader
from landmark_bench.data.registry import get_reader
from landmark_bench.finetune import finetune
from landmark_bench.methods import FAMILIES
from landmark_bench.presets import FAMILY_FINETUNE, FINETUNE, PRESETS, finetune_settings, get_preset


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("family", FAMILIES)
def test_aasce_and_isbi_resolve_to_their_own_settings(preset, family, data_dir):
    settings = get_preset(preset)
    isbi, aasce = finetune_settings(settings, "isbi2015", family), finetune_settings(settings, "aasce2019", family)
    assert isbi == {**FINETUNE[preset], **FAMILY_FINETUNE[preset][family]}
    # cpu's augmentation was chosen on ISBI validation only: the spine keeps the magnitudes its grids were made with
    chosen_on_isbi = {"augment_strength", "augment_noise"} if preset == "cpu" else set()
    assert {key for key in aasce if aasce[key] != isbi[key]} == {"resolution", "sigma", "refine_window", "batch_size",
                                                                 *chosen_on_isbi}
    assert (aasce["augment_strength"], aasce["augment_noise"]) == (1.0, 0.0)
    height, width = aasce["resolution"]
    assert height % 8 == 0 and width % 8 == 0  # the diffusion UNet's three halvings
    reader = get_reader("aasce2019", data_dir)
    aspect = np.median([record.size[0] / record.size[1] for split in ("train", "val", "test")
                        for record in reader.records(split)])
    assert height / width == pytest.approx(aspect, rel=0.05)
    assert aasce["refine_window"] >= 3 * aasce["sigma"]  # the window mean stays unbiased (decode_heatmaps)
    assert 0.8 < height * width * aasce["batch_size"] / (np.prod(isbi["resolution"]) * isbi["batch_size"]) < 1.0


def test_cpu_isbi_augmentation_is_each_familys_own():
    """Chosen per family on ISBI validation (results/selection/augmentation.md); a reference row gets the preset's."""
    settings = get_preset("cpu")
    augmentation = {family: (cfg["augment_strength"], cfg["augment_noise"]) for family in (*FAMILIES, None)
                    if (cfg := finetune_settings(settings, "isbi2015", family))}
    assert augmentation == {"encoder": (1.5, 0.03), "diffusion": (2.0, 0.06), None: (2.0, 0.06)}


def test_set_changes_every_dataset_and_family_or_one():
    both = get_preset("cpu", {"finetune.sigma": 3.0, "finetune.lr": 5e-4})
    assert finetune_settings(both, "aasce2019", "encoder")["sigma"] == finetune_settings(both, "isbi2015",
                                                                                         "diffusion")["sigma"] == 3.0
    assert finetune_settings(both, "aasce2019", "diffusion")["lr"] == 5e-4
    # keys the spine and the encoder family set themselves: every dataset and family still changes
    stronger = get_preset("cpu", {"finetune.augment_strength": 1.7, "finetune.augment_noise": 0.01})
    for dataset in ("aasce2019", "isbi2015"):
        for family in FAMILIES:
            cfg = finetune_settings(stronger, dataset, family)
            assert (cfg["augment_strength"], cfg["augment_noise"]) == (1.7, 0.01)
    one = get_preset("cpu", {"dataset_finetune.aasce2019.resolution": [320, 128], "finetune.resolution": [96, 80]})
    assert finetune_settings(one, "aasce2019", "encoder")["resolution"] == [320, 128]  # the dataset's own key wins
    assert finetune_settings(one, "isbi2015", "encoder")["resolution"] == [96, 80]
    # a family's own key, also one its preset does not set; the dataset's own still wins over it
    family = get_preset("tiny", {"family_finetune.diffusion.lr": 7e-4, "family_finetune.diffusion.sigma": 4.0})
    assert finetune_settings(family, "isbi2015", "diffusion")["lr"] == 7e-4
    assert finetune_settings(family, "isbi2015", "encoder")["lr"] == FINETUNE["tiny"]["lr"]
    assert finetune_settings(family, "aasce2019", "diffusion")["sigma"] == 2.5
    with pytest.raises(ValueError, match="dataset_finetune.aasce2019.sigma"):
        get_preset("cpu", {"dataset_finetune.aasce2019.sigmaa": 1.0})
    with pytest.raises(ValueError, match="family_finetune.encoder.sigma"):
        get_preset("cpu", {"family_finetune.encoder.sigmaa": 1.0})


def small_aasce(data_dir: Path, root: Path, counts: dict[str, int]) -> Path:
    """The AASCE 2019 layout with the first ``counts[folder]`` images of each folder (linked) and their label rows."""
    for folder, count in counts.items():
        labels = data_dir / "aasce2019" / "labels" / folder
        rows = zip(labels.joinpath("filenames.csv").read_text().splitlines(),
                   labels.joinpath("landmarks.csv").read_text().splitlines())
        kept = [(name, row) for name, row in rows if name not in Aasce2019Reader.EXCLUDED][:count]
        images, new_labels = root / "aasce2019" / "data" / folder, root / "aasce2019" / "labels" / folder
        images.mkdir(parents=True)
        new_labels.mkdir(parents=True)
        for name, _ in kept:
            (images / name).symlink_to(data_dir / "aasce2019" / "data" / folder / name)
        new_labels.joinpath("filenames.csv").write_text("".join(f"{name}\n" for name, _ in kept))
        new_labels.joinpath("landmarks.csv").write_text("".join(f"{row}\n" for _, row in kept))
    return root


def test_tiny_finetune_on_a_few_real_aasce_images_reports_pixels(data_dir, tmp_path):
    data = small_aasce(data_dir, tmp_path / "data", {"training": 8, "test": 3})
    out = tmp_path / "scratch"
    assert main(["finetune", "--method", "scratch", "--dataset", "aasce2019", "--data-dir", str(data), "--shots", "5",
                 "--preset", "tiny", "--out", str(out), "--set", "finetune.max_steps=4", "finetune.val_every=2",
                 "dataset_finetune.aasce2019.batch_size=2", "family_finetune.encoder.augment_noise=0.02"]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["finetune"]["resolution"] == [128, 48] and record["finetune"]["sigma"] == 2.5
    assert record["finetune"]["batch_size"] == 2 and record["finetune"]["max_steps"] == 4
    assert record["finetune"]["augment_noise"] == 0.02  # the encoder family's own setting reached the run
    others = [finetune(method=method, dataset="aasce2019", data_dir=str(data), shots=5, seed=0, preset="tiny",
                       out=tmp_path / method, overrides={"finetune.max_steps": 2, "finetune.val_every": 2,
                                                         "family_finetune.encoder.augment_noise": 0.02})
              for method in ("mean_shape", "scratch_unet")]  # the reference row, and the diffusion UNet at 128x48
    assert [other["finetune"]["augment_noise"] for other in others] == [0.0, 0.0]  # not of the encoder family
    for metrics in (record["metrics"], *(other["metrics"] for other in others)):
        test = metrics["test"]
        assert test["unit"] == "px" and test["n_images"] == 3 and np.isfinite(test["mre"])
        assert sorted(map(float, test["sdr"])) == [5.0, 10.0, 20.0, 40.0]
    errors = (out / "errors.csv").read_text().splitlines()
    assert len(errors) == 1 + 3 * 68 and errors[1].endswith(",px")
