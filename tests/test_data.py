"""Readers on the real data, bad input, the cache, few-shot subsets and the DataModules."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from landmark_bench.data.cache import cache_folder, cached_images
from landmark_bench.data.datamodule import LandmarkDataModule, UnlabeledDataModule, few_shot_ids, parse_shots
from landmark_bench.data.readers import ISBI_LANDMARK_NAMES, Aasce2019Reader, DataError, Isbi2015Reader, decode_grey
from landmark_bench.data.registry import get_reader
from landmark_bench.data.transforms import Augment, pixel_to_normalised, warp
from landmark_bench.finetune import few_shot_data
from landmark_bench.presets import get_preset

EXPECTED = {  # dataset: (images present, landmarks)
    "isbi2015": (400, 19),
    "aasce2019": (608, 68),  # 609 published, one excluded by name (annotation outside its image)
    "hand": (9, 37),
    "chest": (10, 6),
}


@pytest.mark.parametrize("dataset", list(EXPECTED))
def test_every_real_image_loads_with_its_landmarks_in_bounds(data_dir, dataset):
    reader = get_reader(dataset, data_dir)
    splits = [split for split in reader.splits if not (split == "test" and "test1" in reader.splits)]
    records = [record for split in splits for record in reader.records(split)]
    images, landmarks = EXPECTED[dataset]
    assert len(records) == images
    assert len({record.image_id for record in records}) == images  # splits are disjoint
    for record in records:
        height, width = record.size
        assert record.landmarks.shape == (landmarks, 2)
        assert (record.landmarks >= -0.5).all() and (record.landmarks[:, 0] <= width - 0.5).all()
        assert (record.landmarks[:, 1] <= height - 0.5).all()
    # every image decodes (through the cache, at a small size) to its header's size
    cached = cached_images(reader, records, (32, 32))
    assert cached.shape == (images, 32, 32) and cached.std() > 10


def test_isbi_splits_anatomy_and_ground_truth(data_dir):
    reader = Isbi2015Reader(data_dir)
    sizes = {split: len(reader.records(split)) for split in reader.splits}
    assert sizes == {"train": 120, "val": 30, "test1": 150, "test2": 100, "test": 250}
    assert reader.landmark_names == ISBI_LANDMARK_NAMES and len(ISBI_LANDMARK_NAMES) == 19
    test1_ids = [record.image_id for record in reader.records("test1")]
    assert test1_ids[0] == "151" and test1_ids[-1] == "300"
    sella, nasion, menton = (ISBI_LANDMARK_NAMES.index(name) for name in ("sella", "nasion", "menton"))
    for split in ("train", "val", "test"):
        for record in reader.records(split):
            assert record.spacing == 0.1
            # menton is the lowest (largest y) of sella, nasion and menton; nasion is in front of sella
            assert record.landmarks[menton, 1] > max(record.landmarks[sella, 1], record.landmarks[nasion, 1])
            assert record.landmarks[nasion, 0] > record.landmarks[sella, 0]
    senior = Isbi2015Reader(data_dir, ground_truth="senior").records("test1")
    junior = Isbi2015Reader(data_dir, ground_truth="junior").records("test1")
    mean = reader.records("test1")
    np.testing.assert_allclose(mean[0].landmarks, (senior[0].landmarks + junior[0].landmarks) / 2)
    assert not np.array_equal(senior[0].landmarks, junior[0].landmarks)
    with pytest.raises(ValueError, match="ground_truth"):
        Isbi2015Reader(data_dir, ground_truth="resident")


def test_excluded_aasce_image_is_named_not_silently_skipped(data_dir):
    assert "sunhl-1th-25-Jul-2016-49 A AP.jpg" in Aasce2019Reader.EXCLUDED
    ids = {record.image_id for split in ("train", "val") for record in Aasce2019Reader(data_dir).records(split)}
    assert "sunhl-1th-25-Jul-2016-49 A AP" not in ids and len(ids) == 480


def test_hand_spacing_normalises_wrist_width(data_dir):
    for pair in [(0, 4), (1, 5)]:
        reader = get_reader("hand", data_dir, wrist_pair=pair)
        for record in reader.records("train"):
            width = np.linalg.norm(record.landmarks[pair[0]] - record.landmarks[pair[1]]) * record.spacing
            assert width == pytest.approx(50.0)


def test_few_shot_subsets_are_seeded_nested_and_process_independent():
    ids = [f"{index:03d}" for index in range(1, 121)]
    five, ten = few_shot_ids(ids, 5, seed=1), few_shot_ids(ids, 10, seed=1)
    assert len(five) == 5 and set(five) < set(ten)
    assert few_shot_ids(list(reversed(ids)), 10, seed=1) == ten  # listing order does not matter
    assert few_shot_ids(ids, 10, seed=2) != ten
    assert few_shot_ids(ids, "all", seed=0) == ids
    code = "from landmark_bench.data.datamodule import few_shot_ids; print(few_shot_ids([f'{i:03d}' for i in range(1, 121)], 10, seed=1))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert other.strip() == str(ten)
    with pytest.raises(ValueError, match="larger than the training split"):
        few_shot_ids(ids, 121, seed=0)
    for bad in ("ten", 0, -5, 2.5, True):
        with pytest.raises(ValueError, match="shots"):
            parse_shots(bad)
    with pytest.raises(ValueError, match="seed must be an integer"):
        few_shot_ids(ids, 5, seed="1")


def test_cache_is_read_instead_of_decoding(data_dir, monkeypatch):
    reader = get_reader("chest", data_dir)
    records = reader.records("train")
    first = cached_images(reader, records, (48, 40))
    assert sorted(path.stem for path in cache_folder(reader, (48, 40)).glob("*.npy")) == [r.image_id for r in records]

    def no_decoding(record):
        raise AssertionError("decoded an image that was cached")

    monkeypatch.setattr(reader, "load_image", no_decoding)
    np.testing.assert_array_equal(cached_images(reader, records, (48, 40)), first)


def test_augmentation_moves_landmarks_with_the_image():
    generator = torch.Generator().manual_seed(0)
    for trial in range(5):
        image = torch.zeros(1, 80, 64)
        points = torch.tensor([[20.0, 30.0], [45.0, 60.0], [32.0, 12.0]])
        for x, y in points.long().tolist():
            image[0, y - 1 : y + 2, x - 1 : x + 2] = torch.tensor([[0.3, 0.6, 0.3], [0.6, 1.0, 0.6], [0.3, 0.6, 0.3]])
        augment = Augment(max_contrast=0, max_brightness=0, max_gamma=0)
        warped, moved = augment(image, points, generator)
        for x, y in moved.tolist():
            # the warped blob's intensity-weighted centre is where the landmark moved to
            ys, xs = torch.meshgrid(torch.arange(80.0), torch.arange(64.0), indexing="ij")
            near = ((xs - x) ** 2 + (ys - y) ** 2 < 9) * warped[0]
            centre = ((near * xs).sum() / near.sum(), (near * ys).sum() / near.sum())
            assert abs(centre[0] - x) < 0.25 and abs(centre[1] - y) < 0.25
        assert not torch.allclose(moved, points)


def test_augmentation_strength_scales_every_draw_and_noise_leaves_the_landmarks_alone():
    image = torch.rand(1, 40, 32, generator=torch.Generator().manual_seed(3))
    points = torch.tensor([[5.0, 7.0], [20.0, 30.0]])
    still, unmoved = Augment(strength=0)(image, points, torch.Generator().manual_seed(0))
    torch.testing.assert_close(still, image, atol=1e-5, rtol=0)  # strength 0: the identity
    torch.testing.assert_close(unmoved, points)
    # the same draws, twice the magnitude: a pure shift moves every point exactly twice as far
    shift_only = {"max_rotation_deg": 0.0, "max_scale": 0.0}
    _, once = Augment(**shift_only)(image, points, torch.Generator().manual_seed(0))
    _, twice = Augment(strength=2, **shift_only)(image, points, torch.Generator().manual_seed(0))
    assert not torch.allclose(once, points)
    torch.testing.assert_close(twice - points, 2 * (once - points))
    flat = torch.full((8, 1, 40, 32), 0.5)
    noisy, kept = Augment(strength=0, max_noise=0.05).batch(flat, points.repeat(8, 1, 1),
                                                            torch.Generator().manual_seed(0))
    torch.testing.assert_close(kept, points.repeat(8, 1, 1))
    stds = (noisy - 0.5).flatten(1).std(1)
    assert (stds > 0).all() and (stds < 0.055).all() and abs(float((noisy - 0.5).mean())) < 0.005
    with pytest.raises(ValueError, match="strength 5"):
        Augment(strength=5)


def test_the_augmentation_settings_reach_the_training_loader():
    cfg = {**get_preset("tiny")["finetune"], "augment_strength": 1.5, "augment_noise": 0.02}
    augment = few_shot_data(cfg, "phantom", None, 5, 0).datasets["train"].augment
    assert (augment.strength, augment.max_noise) == (1.5, 0.02)


def test_batched_warp_matches_affine_grid():
    """The separable sampling grid is torch's ``affine_grid``; each sample gets its own matrix."""
    generator = torch.Generator().manual_seed(1)
    images, points = torch.rand(3, 1, 40, 32, generator=generator), torch.rand(3, 5, 2, generator=generator) * 30
    matrices = torch.eye(3, dtype=torch.float64).repeat(3, 1, 1)
    matrices[:, :2] += torch.randn(3, 2, 3, generator=generator, dtype=torch.float64) * torch.tensor([0.1, 0.1, 4.0])
    warped, moved = warp(images, points, matrices)
    to_norm = pixel_to_normalised(40, 32)
    theta = (to_norm @ torch.linalg.inv(matrices) @ torch.linalg.inv(to_norm))[:, :2].float()
    expected = F.grid_sample(images, F.affine_grid(theta, [3, 1, 40, 32], align_corners=False), align_corners=False)
    torch.testing.assert_close(warped, expected, atol=1e-5, rtol=0)
    for index in range(3):
        torch.testing.assert_close(moved[index], warp(images[index:index + 1], points[index:index + 1],
                                                      matrices[index:index + 1])[1][0])


def test_landmark_datamodule_batches(data_dir):
    datamodule = LandmarkDataModule("isbi2015", str(data_dir), shots=5, seed=3, resolution=[40, 32], batch_size=4,
                                    samples_per_epoch=8)
    datamodule.setup()
    assert len(datamodule.subset_ids) == 5 and datamodule.test_splits == ("test1", "test2")
    assert set(datamodule.subset_ids) <= {record.image_id for record in datamodule.reader.records("train")}
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["image"].shape == (4, 1, 40, 32) and batch["target"].shape == (4, 19, 40, 32)
    assert torch.allclose(batch["target"].sum((-2, -1)), torch.ones(4, 19), atol=1e-4)
    assert batch["landmarks_orig"].dtype == torch.float64 and batch["orig_size"][0].tolist() == [2400, 1935]
    test2 = next(iter(datamodule.test_dataloader()[1]))
    assert test2["index"].tolist() == [0, 1, 2, 3]
    assert datamodule.datasets["test2"].records[0].image_id == "301"


def test_unlabeled_datamodule_uses_training_splits_only(data_dir):
    datamodule = UnlabeledDataModule(["chest", "hand"], str(data_dir), resolution=24, batch_size=4)
    datamodule.setup()
    counts = np.bincount(datamodule.dataset.dataset_index.numpy())
    assert counts.tolist() == [7, 6]  # chest: 6 train + 1 val; hand: 5 train + 1 val; no test image
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["image"].shape == (4, 1, 24, 24) and batch["dataset_index"].shape == (4,)


# --- bad input: every case names the file (and row) and stops --------------------------------------


@pytest.fixture()
def small_isbi(data_dir, tmp_path) -> Path:
    """A copy of two ISBI training images with their annotations, to break one way or another."""
    root = tmp_path / "isbi2015"
    for image_id in ("001", "002"):
        target = root / "RawImage" / "TrainingData"
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(data_dir / "isbi2015" / "RawImage" / "TrainingData" / f"{image_id}.jpg", target)
        for doctor in ("senior", "junior"):
            folder = root / "AnnotationsByMD" / f"400_{doctor}"
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy(data_dir / "isbi2015" / "AnnotationsByMD" / f"400_{doctor}" / f"{image_id}.txt", folder)
    for split in ("Test1Data", "Test2Data"):
        (root / "RawImage" / split).mkdir(parents=True)
    return tmp_path


def annotation(root: Path, doctor: str = "senior", image_id: str = "002") -> Path:
    return root / "isbi2015" / "AnnotationsByMD" / f"400_{doctor}" / f"{image_id}.txt"


def test_small_copy_loads(small_isbi):
    reader = Isbi2015Reader(small_isbi)
    assert [record.image_id for record in reader.records("train")] == ["001"]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda lines: lines[:-1], "expected 19 landmarks, found 18"),
        (lambda lines: lines + ["10,10"], "expected 19 landmarks, found 20"),
        (lambda lines: ["abc,12"] + lines[1:], "line 1: non-numeric"),
        (lambda lines: ["5000,12"] + lines[1:], "landmark 0 at .* lies outside"),
    ],
)
def test_bad_annotation_names_the_file(small_isbi, edit, message):
    path = annotation(small_isbi)
    path.write_text("\n".join(edit(path.read_text().splitlines())) + "\n")
    with pytest.raises(DataError, match=message) as error:
        Isbi2015Reader(small_isbi).records("val")
    assert str(path) in str(error.value)


def test_missing_annotation_names_the_file(small_isbi):
    annotation(small_isbi, "junior").unlink()
    with pytest.raises(DataError, match="missing"):
        Isbi2015Reader(small_isbi).records("val")


def test_corrupt_and_truncated_images_name_the_file(small_isbi):
    image = small_isbi / "isbi2015" / "RawImage" / "TrainingData" / "002.jpg"
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 3])  # truncated: the header reads, the pixels do not
    reader = Isbi2015Reader(small_isbi)
    (record,) = reader.records("val")
    with pytest.raises(DataError, match="corrupt or truncated") as error:
        reader.load_image(record)
    assert str(image) in str(error.value)
    image.write_bytes(b"this is not a jpeg")
    with pytest.raises(DataError, match="cannot be read") as error:
        Isbi2015Reader(small_isbi).records("val")
    assert str(image) in str(error.value)


def test_wrong_layout_and_missing_folder(small_isbi, tmp_path):
    with pytest.raises(DataError, match="right layout"):
        get_reader("aasce2019", small_isbi)
    with pytest.raises(ValueError, match="does not exist"):
        get_reader("isbi2015", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="valid datasets: isbi2015, aasce2019, hand, chest, phantom"):
        get_reader("mnist", small_isbi)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_sixteen_bit_images_are_stretched_not_clipped(tmp_path: Path, suffix: str) -> None:
    twelve_bit = np.array([[0, 1000], [2000, 4095]], dtype=np.uint16)  # a 12-bit X-ray stored in 16 bits
    path = tmp_path / f"xray{suffix}"
    Image.fromarray(twelve_bit).save(path)
    assert Image.open(path).mode.startswith("I")
    np.testing.assert_array_equal(decode_grey(path), np.rint(twelve_bit / 4095 * 255).astype(np.uint8))
