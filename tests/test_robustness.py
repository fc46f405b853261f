"""Robustness: perturbations move the landmarks exactly with the image, are seeded and deterministic, and
``landmark-bench robustness`` scores a sweep's runs on them end to end."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from landmark_bench.cli import build_parser, main
from landmark_bench.data.datamodule import as_size
from landmark_bench.data.perturbations import PERTURBATIONS, PerturbedReader, get_perturbation
from landmark_bench.data.phantom import PHANTOM_IMAGE_SIZE, make_phantom
from landmark_bench.data.registry import get_reader
from landmark_bench.predict import load_detector, network_images
from landmark_bench.robustness import markdown, predict_points, score

IMAGES = [100, 101, 102]  # phantom indices (seed 0)
TOLERANCE_PX = 0.06  # a half-pixel convention slip would be 0.5; resampling a 1.5 px blob costs up to ~0.04
NOISE_TOLERANCE_PX = 0.5  # 8-16 grey levels of noise move a small blob's centroid by up to ~0.4 px


def blob_image(points: np.ndarray, sigma: float = 1.5) -> np.ndarray:
    """The phantom's grid with a bright blob on each of its landmarks: features whose position can be measured."""
    y, x = np.mgrid[:PHANTOM_IMAGE_SIZE[0], :PHANTOM_IMAGE_SIZE[1]].astype(np.float64)
    image = sum(200 * np.exp(-((x - px) ** 2 + (y - py) ** 2) / (2 * sigma**2)) for px, py in points)
    return np.rint(np.clip(image, 0, 255)).astype(np.uint8)


def locate(image: np.ndarray, near: np.ndarray, radius: int = 5) -> np.ndarray:
    """Intensity-weighted xy centroid of the blob in a window around ``near``, over the window border's median."""
    cx, cy = np.rint(near).astype(int)
    window = image[cy - radius:cy + radius + 1, cx - radius:cx + radius + 1].astype(np.float64)
    border = np.concatenate([window[0], window[-1], window[:, 0], window[:, -1]])
    weights = np.clip(window - np.median(border), 0, None)
    y, x = np.mgrid[cy - radius:cy + radius + 1, cx - radius:cx + radius + 1]
    return np.array([(weights * x).sum(), (weights * y).sum()]) / weights.sum()


@pytest.mark.parametrize("name", list(PERTURBATIONS))
def test_phantom_landmark_features_sit_at_the_transformed_coordinates(name):
    perturbation = get_perturbation(name)
    tolerance = NOISE_TOLERANCE_PX if name == "noise" else TOLERANCE_PX
    for index in IMAGES:
        _, landmarks = make_phantom(0, index)
        image = blob_image(landmarks)
        for seed in (0, 1):
            out, moved = perturbation(image, landmarks, seed, f"{index:05d}")
            assert out.dtype == np.uint8 and moved.shape == landmarks.shape
            if perturbation.geometry is None:
                assert out.shape == image.shape and np.array_equal(moved, landmarks)
            else:
                assert not np.allclose(moved, landmarks)  # it did move them
            height, width = out.shape
            assert (moved >= 0.02 * min(height, width)).all() and (moved <= [width - 1, height - 1]).all()
            errors = np.array([locate(out, point) - point for point in moved])
            assert np.abs(errors).max() < tolerance, f"{name} seed {seed} image {index}: errors {errors}"


@pytest.mark.parametrize("name", list(PERTURBATIONS))
def test_same_seed_same_output_other_image_or_seed_other_output(name):
    perturbation = get_perturbation(name)
    image, _ = make_phantom(0, IMAGES[0])
    landmarks = np.array([[120.0, 150.0], [140.0, 170.0]])  # central: no draw is shrunk to fit, none coincide
    first = perturbation(image, landmarks, 0, "00100")
    again = perturbation(image.copy(), landmarks.copy(), 0, "00100")
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    # the same pixels under other ids, or under other seeds: other draws (a crop of whole rows may repeat one)
    for others in ([(0, f"{index:05d}") for index in range(101, 105)], [(seed, "00100") for seed in range(1, 5)]):
        outputs = [perturbation(image, landmarks, seed, image_id)[0] for seed, image_id in others]
        differ = [output.shape != first[0].shape or not np.array_equal(output, first[0]) for output in outputs]
        assert sum(differ) >= 3, f"{name}: {others} give the output of seed 0, image 00100"


def test_a_perturbed_reader_gives_the_perturbations_images_and_points():
    base = get_reader("phantom", num_train=2, num_val=1, num_test=2)
    perturbation = get_perturbation("crop_top")
    reader = PerturbedReader(base, perturbation, seed=3)
    for record, original in zip(reader.records("test"), base.records("test")):
        image, points = perturbation(base.load_image(original), original.landmarks, 3, original.image_id)
        assert np.array_equal(reader.load_image(record), image) and record.size == image.shape
        assert np.allclose(record.landmarks, points) and record.spacing == original.spacing  # a crop keeps mm/pixel


def test_robustness_command_on_a_tiny_sweep(tmp_path, capsys):
    assert main(["sweep", "--methods", "mean_shape", "scratch", "--datasets", "phantom", "--shots", "5", "--seeds",
                 "0", "--preset", "tiny", "--protocols", "finetune", "probe", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    assert main(["robustness", str(tmp_path), "--seeds", "0", "1", "--protocols", "finetune",
                 "--out", str(tmp_path / "robust.md")]) == 0
    text = (tmp_path / "robust.md").read_text()
    assert text in capsys.readouterr().out
    header = next(line for line in text.splitlines() if line.startswith("| method"))
    assert [cell.strip() for cell in header.strip("|").split("|")] == ["method", "protocol", "runs", "clean",
                                                                        *PERTURBATIONS]
    row = next(line for line in text.splitlines() if line.startswith("| scratch | finetune"))
    values = [float(cell) for cell in row.strip("|").split("|")[3:]]
    assert len(values) == 1 + len(PERTURBATIONS) and np.isfinite(values).all()
    assert "mean_shape: no detector" in text
    rows = pd.read_csv(tmp_path / "robust.csv")
    assert len(rows) == 1 + 2 * len(PERTURBATIONS) and set(rows.method) == {"scratch"}
    assert set(rows.protocol) == {"finetune"} and "| scratch | probe" not in text
    assert np.isfinite(rows.mre).all() and (rows.n_images == 40).all()
    results = pd.read_csv(tmp_path / "results.csv").query("protocol == 'finetune'").set_index("method")
    assert rows.set_index("perturbation").mre["clean"] == pytest.approx(results.test_mre["scratch"])
    # clean images through the same batching, inference and scoring give the run's own MRE: the perturbed
    # columns are measured the way the clean one was
    model, config = load_detector(results.run_dir["scratch"])
    records = get_reader("phantom").records("test")
    pixels = network_images(get_reader("phantom"), records, as_size(config["finetune"]["resolution"]), None)
    clean = score(records, predict_points(model, config, pixels, records, "cpu"))
    assert clean["mre"] == pytest.approx(results.test_mre["scratch"], rel=1e-6)
    help_text = build_parser()._subparsers._group_actions[0].choices["robustness"].format_help()
    assert all(name in help_text for name in PERTURBATIONS)  # the --perturbations help names every one
    # on validation (to choose settings): the clean column is the restored checkpoint on the unperturbed images;
    # without --protocols every protocol is scored
    assert main(["robustness", str(tmp_path), "--seeds", "0", "--split", "val", "--perturbations", "zoom_out",
                 "noise", "--out", str(tmp_path / "robust_val.md")]) == 0
    all_val_rows = pd.read_csv(tmp_path / "robust_val.csv")
    assert set(all_val_rows.protocol) == {"finetune", "probe"}
    val_rows = all_val_rows.query("protocol == 'finetune'").set_index("perturbation")
    val_records = get_reader("phantom").records("val")
    assert set(val_rows.split) == {"val"} and (val_rows.n_images == len(val_records)).all()
    val_pixels = network_images(get_reader("phantom"), val_records, as_size(config["finetune"]["resolution"]), None)
    val_clean = score(val_records, predict_points(model, config, val_pixels, val_records, "cpu"))
    assert val_rows.mre["clean"] == pytest.approx(val_clean["mre"], rel=1e-9)
    assert np.isfinite(val_rows.mre).all() and list(val_rows.index) == ["clean", "zoom_out", "noise"]
    assert "perturbed val images" in (tmp_path / "robust_val.md").read_text()


def test_robustness_table_labels_rows_of_pretrainings_that_did_not_learn():
    """As in the leaderboard: a row whose fine-tune started from a pretraining that did not learn says so."""
    rows = [{"dataset": "phantom", "shots": 5, "method": method, "protocol": "finetune", "seed": seed,
             "split": "test", "perturbation": perturbation, "perturbation_seed": 0, "pretraining_learned": learned,
             "unit": "px", "n_images": 40, "mre": 1.0, "mre_std": 0.1, "sdr_2.0": 50.0}
            for method, learned in (("scratch", None), ("simclr", True), ("dino", False))
            for seed in (0, 1) for perturbation in ("clean", "noise")]
    text = markdown(pd.DataFrame(rows), ["noise"], [0], {}, [], "t")
    labels = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ") and "protocol" not in line]
    assert labels == ["scratch", "simclr", "dino (not learned)"] * 2
    assert "(not learned): the run fine-tuned a pretraining" in text
    learned_only = markdown(pd.DataFrame([row for row in rows if row["method"] != "dino"]), ["noise"], [0], {}, [], "t")
    assert "not learned" not in learned_only
