"""``landmark-bench predict``: a finished ISBI run applied to a plain folder gives back its own predictions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from landmark_bench.cli import main
from landmark_bench.data.readers import decode_grey
from landmark_bench.finetune import finetune

TRAIN_IDS = [f"{index:03d}" for index in range(1, 9)]  # 6 training and 2 validation images
TEST_IDS = {"Test1Data": ["151", "152", "153"], "Test2Data": ["301", "302"]}
ISBI_SPACING = 0.1
# float32 convolutions may take another kernel for another batch size (the run tests Test1 and Test2 in batches of
# 3 and 2): points then differ by up to ~1e-6 original pixels (1.0e-6 seen on a fresh machine), so the bar is
# 1e-4 px (1e-5 mm): far below anything a CSV reader would see, far above float32 rounding of ~1000-px coordinates
ATOL_PX = 1e-4


def run_cli(*args: object) -> int:
    return main([str(arg) for arg in args])


@pytest.fixture(scope="module")
def isbi(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A few real ISBI 2015 images (linked in the published layout) and a short tiny-preset scratch run on them:
    real images and annotations at a fraction of the full dataset's decoding time."""
    root = tmp_path_factory.mktemp("isbi-subset")
    source = data_dir / "isbi2015"
    for folder, ids in {"TrainingData": TRAIN_IDS, **TEST_IDS}.items():
        (root / "isbi2015" / "RawImage" / folder).mkdir(parents=True)
        for image_id in ids:
            (root / "isbi2015" / "RawImage" / folder / f"{image_id}.jpg").symlink_to(
                source / "RawImage" / folder / f"{image_id}.jpg")
            for doctor in ("400_senior", "400_junior"):
                annotation = root / "isbi2015" / "AnnotationsByMD" / doctor / f"{image_id}.txt"
                annotation.parent.mkdir(parents=True, exist_ok=True)
                annotation.symlink_to(source / "AnnotationsByMD" / doctor / f"{image_id}.txt")
    run = root / "run"
    finetune(method="scratch", dataset="isbi2015", data_dir=str(root), shots=5, seed=0, preset="tiny", out=run,
             overrides={"finetune.max_steps": 6, "finetune.warmup_steps": 1, "finetune.val_every": 3})
    return {"data_dir": root, "run": run, "images": source / "RawImage"}


def test_a_folder_of_renamed_test_images_gives_the_runs_own_predictions(isbi, tmp_path):
    folder = tmp_path / "new images"
    folder.mkdir()
    shutil.copyfile(isbi["images"] / "Test1Data" / "151.jpg", folder / "patient-a.jpg")  # the very file
    grey = {image_id: decode_grey(isbi["images"] / split / f"{image_id}.jpg") for split, image_id in
            (("Test1Data", "152"), ("Test2Data", "301"))}
    Image.fromarray(grey["152"]).save(folder / "patient-b.png")  # lossless copies of the decoded pixels
    Image.fromarray(grey["301"]).save(folder / "patient-c.tif")
    names = {"patient-a": "151", "patient-b": "152", "patient-c": "301"}
    out = tmp_path / "predictions.csv"
    assert run_cli("predict", isbi["run"], "--images", folder, "--spacing", ISBI_SPACING, "--out", out) == 0

    predicted = pd.read_csv(out, dtype={"image_id": str})
    assert list(predicted.columns) == ["image_id", "landmark", "x", "y", "ere", "unit"]
    assert sorted(set(predicted.image_id)) == sorted(names) and set(predicted.unit) == {"mm"}
    predicted["image_id"] = predicted.image_id.map(names)
    keys = ["image_id", "landmark"]
    own = pd.read_csv(isbi["run"] / "predictions.csv", dtype={"image_id": str})
    errors = pd.read_csv(isbi["run"] / "errors.csv", dtype={"image_id": str})
    expected = own.merge(errors[[*keys, "ere"]], on=keys).set_index(keys).loc[predicted.set_index(keys).index]
    np.testing.assert_allclose(predicted[["x", "y"]].to_numpy(), expected[["x", "y"]].to_numpy(), rtol=0, atol=ATOL_PX)
    np.testing.assert_allclose(predicted.ere.to_numpy(), expected.ere.to_numpy(), rtol=0, atol=ATOL_PX * ISBI_SPACING)


def test_a_split_from_the_checkpoint_alone_is_the_runs_test_set_and_its_score(isbi, tmp_path, capsys):
    out = tmp_path / "test.csv"
    assert run_cli("predict", isbi["run"] / "checkpoints" / "best.ckpt", "--dataset", "isbi2015", "--data-dir",
                   isbi["data_dir"], "--split", "test", "--batch-size", 2, "--out", out) == 0
    predicted = pd.read_csv(out, dtype={"image_id": str})
    own = pd.read_csv(isbi["run"] / "predictions.csv", dtype={"image_id": str})
    assert predicted[["image_id", "landmark"]].equals(own[["image_id", "landmark"]])
    np.testing.assert_allclose(predicted[["x", "y"]].to_numpy(), own[["x", "y"]].to_numpy(), rtol=0, atol=ATOL_PX)
    recorded = json.loads((isbi["run"] / "metrics.json").read_text())["test"]
    assert f"MRE    {recorded['mre']:.3f} ± {recorded['mre_std']:.3f} mm" in capsys.readouterr().out


def test_other_sizes_and_formats_give_points_inside_each_image(isbi, tmp_path):
    folder, overlays = tmp_path / "images", tmp_path / "overlays"
    folder.mkdir()
    image = Image.fromarray(decode_grey(isbi["images"] / "Test1Data" / "153.jpg"))
    image.save(folder / "lossy.jpeg", quality=60)
    image.resize((700, 1000)).save(folder / "small.png")
    image.convert("RGB").resize((1500, 1200)).save(folder / "colour wide.tiff")
    sizes = {"lossy": (1935, 2400), "small": (700, 1000), "colour wide": (1500, 1200)}
    out = tmp_path / "predictions.csv"
    assert run_cli("predict", isbi["run"], "--images", folder, "--overlays", overlays, "--out", out) == 0
    predicted = pd.read_csv(out, dtype={"image_id": str})
    assert len(predicted) == 19 * len(sizes) and set(predicted.unit) == {"px"}
    assert np.isfinite(predicted[["x", "y", "ere"]].to_numpy()).all() and (predicted.ere > 0).all()
    width, height = np.array([sizes[image_id] for image_id in predicted.image_id]).T
    assert ((predicted.x >= -0.5) & (predicted.x <= width - 0.5)).all()
    assert ((predicted.y >= -0.5) & (predicted.y <= height - 0.5)).all()
    assert sorted(path.name for path in overlays.iterdir()) == sorted(f"{image_id}.png" for image_id in sizes)


def truncated_png(path: Path) -> None:
    Image.fromarray(np.full((64, 48), 128, dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:-40])


@pytest.mark.parametrize("name, corrupt", [
    ("scan 7.png", truncated_png),
    ("scan 7.jpg", lambda path: path.write_bytes(b"not an image at all")),
])
def test_an_unreadable_image_is_named_and_nothing_is_written(isbi, tmp_path, capsys, name, corrupt):
    folder, out_dir = tmp_path / "images", tmp_path / "out"
    folder.mkdir()
    Image.fromarray(np.zeros((64, 48), dtype=np.uint8)).save(folder / "good.png")
    corrupt(folder / name)
    assert run_cli("predict", isbi["run"], "--images", folder, "--overlays", out_dir / "overlays",
                   "--out", out_dir / "predictions.csv") == 2
    assert str(folder / name) in capsys.readouterr().err
    assert not out_dir.exists()


@pytest.mark.parametrize("source, message", [
    (["--dataset", "phantom"], "trained on the 19 landmarks of 'isbi2015'; 'phantom' has 12 landmarks"),
    (["--images", "no such folder"], "image folder no such folder does not exist"),
])
def test_a_dataset_with_other_landmarks_and_a_missing_folder_are_named(isbi, tmp_path, capsys, source, message):
    assert run_cli("predict", isbi["run"], *source, "--out", tmp_path / "out.csv") == 2
    assert message in capsys.readouterr().err


def test_a_reference_run_and_a_folder_that_is_no_run_are_named(tmp_path, capsys):
    reference = tmp_path / "mean_shape"
    reference.mkdir()
    (reference / "config.json").write_text(json.dumps({"method": "mean_shape", "preset": "tiny"}))
    assert run_cli("predict", reference, "--images", tmp_path, "--out", tmp_path / "out.csv") == 2
    assert "'mean_shape' reference, which has no detector" in capsys.readouterr().err
    assert run_cli("predict", tmp_path / "nothing", "--images", tmp_path, "--out", tmp_path / "out.csv") == 2
    assert "is neither a fine-tune run folder nor a checkpoint in one" in capsys.readouterr().err
