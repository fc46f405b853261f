"""The one landmark DataModule every method is fine-tuned and evaluated with, and the unlabelled one
every method is pretrained with."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning.pytorch as L
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from landmark_bench.data.cache import cached_images
from landmark_bench.data.readers import DatasetReader, Record
from landmark_bench.data.registry import get_reader
from landmark_bench.data.transforms import Augment
from landmark_bench.geometry import to_network
from landmark_bench.heatmaps import gaussian_targets


def as_size(resolution: int | Sequence[int]) -> tuple[int, int]:
    """``128`` -> (128, 128); ``[160, 128]`` -> (160, 128) as (h, w)."""
    def is_side(value: object) -> bool:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0

    if is_side(resolution):
        resolution = (resolution, resolution)
    if isinstance(resolution, str) or not isinstance(resolution, Sequence) or len(resolution) != 2 \
            or not all(is_side(side) for side in resolution):
        raise ValueError(f"a size is a positive integer or [height, width] of positive integers, got {resolution!r}")
    height, width = resolution
    return int(height), int(width)


def parse_shots(shots: int | str) -> int | str:
    """Shots as given on a command line or in a config: a positive integer or ``"all"``."""
    if isinstance(shots, str) and shots.strip().lower() == "all":
        return "all"
    if isinstance(shots, bool):
        raise ValueError(f"shots must be a positive integer or 'all', not {shots!r}")
    try:
        value = int(shots)
    except (TypeError, ValueError):
        raise ValueError(f"shots must be a positive integer or 'all', not {shots!r}") from None
    if value != shots and str(value) != str(shots).strip():
        raise ValueError(f"shots must be a positive integer or 'all', not {shots!r}")
    if value < 1:
        raise ValueError(f"shots must be at least 1, not {value}")
    return value


def few_shot_ids(train_ids: Sequence[str], shots: int | str, seed: int) -> list[str]:
    """The annotated subset: a seeded permutation of the sorted training ids, first ``shots`` kept.

    Depends only on (training ids, shots, seed), never on method, process, workers or devices; for one
    seed the 5-shot subset lies inside the 10-shot one.
    """
    ids = sorted(train_ids)
    shots = parse_shots(shots)
    if shots == "all":
        return ids
    if shots > len(ids):
        raise ValueError(f"shots={shots} is larger than the training split ({len(ids)} images)")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, not {seed!r}")
    order = np.random.default_rng(seed).permutation(len(ids))
    return sorted(ids[index] for index in order[:shots])


class LandmarkDataset(Dataset):
    """Cached images of one split with their landmarks; augmented and with targets when training."""

    def __init__(
        self,
        images: np.ndarray,
        records: list[Record],
        sigma: float,
        augment: Augment | None = None,
        length: int | None = None,
    ):
        self.length = length
        self.images = torch.from_numpy(images)
        self.records = records
        self.size = tuple(images.shape[1:])
        self.sigma, self.augment = sigma, augment
        self.orig_sizes = torch.tensor([record.size for record in records], dtype=torch.long).reshape(-1, 2)
        self.landmarks_orig = torch.from_numpy(np.stack([record.landmarks for record in records])) if records else None
        self.landmarks_net = to_network(self.landmarks_orig, self.orig_sizes, self.size) if records else None
        self.spacing = torch.tensor([record.spacing if record.spacing else float("nan") for record in records],
                                    dtype=torch.float64)

    def __len__(self) -> int:
        """``length`` when set: a few-shot set repeated to fill an epoch (a validation interval)."""
        return self.length or len(self.records)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: value[0] for key, value in self.__getitems__([index]).items()}

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """A whole batch, augmented and given targets at once (the DataLoader's batched fetch).

        It is already a batch, so loaders pass it through ``keep_batch`` instead of collating samples.
        """
        rows = torch.as_tensor(indices, dtype=torch.long) % len(self.records)
        images = self.images[rows][:, None].float() / 255.0
        points = self.landmarks_net[rows].float()
        if self.augment is not None:
            images, points = self.augment.batch(images, points)
        return {
            "image": images,
            "landmarks": points,
            "target": gaussian_targets(points, self.size, self.sigma),
            "landmarks_orig": self.landmarks_orig[rows],
            "orig_size": self.orig_sizes[rows],
            "spacing": self.spacing[rows],
            "index": rows,
        }


def keep_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``collate_fn`` of :class:`LandmarkDataset` loaders: its ``__getitems__`` returns a finished batch."""
    return batch


class LandmarkDataModule(L.LightningDataModule):
    """Few-shot training subset, validation split and the test splits of one dataset."""

    def __init__(
        self,
        dataset: str = "phantom",
        data_dir: str | None = None,
        shots: int | str = 10,
        seed: int = 0,
        resolution: int | Sequence[int] = 128,
        batch_size: int = 8,
        sigma: float = 2.0,
        augment: bool = True,
        augment_strength: float = 1.0,
        augment_noise: float = 0.0,
        samples_per_epoch: int = 256,
        num_workers: int = 0,
        cache_dir: str | None = None,
        reader_options: dict | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.shots = parse_shots(shots)
        self.size = as_size(resolution)
        self.reader: DatasetReader = get_reader(dataset, data_dir, **(reader_options or {}))
        self.datasets: dict[str, LandmarkDataset] = {}
        self.subset_ids: list[str] = []

    @property
    def _cache_dir(self) -> Path | None:
        return Path(self.hparams.cache_dir) if self.hparams.cache_dir else None

    @property
    def test_splits(self) -> tuple[str, ...]:
        """The splits with their own test loader (ISBI: test1, test2; pooled ``test`` is their union)."""
        splits = self.reader.test_splits
        return tuple(split for split in splits if split != "test") or ("test",)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        train = self.reader.records("train")
        self.subset_ids = few_shot_ids([record.image_id for record in train], self.shots, self.hparams.seed)
        chosen = set(self.subset_ids)
        splits = {"train": [record for record in train if record.image_id in chosen], "val": self.reader.records("val")}
        splits.update({split: self.reader.records(split) for split in self.test_splits})
        for split, records in splits.items():
            images = cached_images(self.reader, records, self.size, self._cache_dir)
            training = split == "train"
            augment = (Augment(strength=self.hparams.augment_strength, max_noise=self.hparams.augment_noise)
                       if training and self.hparams.augment else None)
            self.datasets[split] = LandmarkDataset(images, records, self.hparams.sigma, augment,
                                                   self.hparams.samples_per_epoch if training else None)

    def unlabelled_training_images(self) -> torch.Tensor:
        """(N, 1, h, w) images of the whole training split in [0, 1], labels unused: the target-domain images a
        probe's frozen BatchNorm statistics are estimated on (every probed backbone alike)."""
        images = cached_images(self.reader, self.reader.records("train"), self.size, self._cache_dir)
        return torch.from_numpy(images)[:, None].float() / 255.0

    def _loader(self, dataset: Dataset, **kwargs) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(dataset, batch_size=self.hparams.batch_size, num_workers=workers,
                          persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(), collate_fn=keep_batch,
                          **kwargs)

    def train_dataloader(self) -> DataLoader:
        """The few-shot set repeated to ``samples_per_epoch``, shuffled (and sharded under DDP)."""
        return self._loader(self.datasets["train"], shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["val"])

    def test_dataloader(self) -> list[DataLoader]:
        return [self._loader(self.datasets[split]) for split in self.test_splits]


class UnlabeledDataset(Dataset):
    """Cached images of several datasets with their dataset index; optional view transform (SSL) or random crop.

    ``crop_size`` (h, w) cuts one random window per item from the cached image, so a network pretrains on
    patches at the pixel scale of the cache (the fine-tuning resolution) instead of whole images shrunk
    further. Crop positions come from a generator seeded with ``seed`` (in a DataLoader worker: the worker's
    seed, which Lightning's ``seed_everything(workers=True)`` derives from the run seed), so a run's crops are
    reproducible. ``crop_scale`` (lo, hi): the window is ``crop_size`` times a factor drawn uniformly from it (each
    side at most the image's; a factor past the image shows the whole image), resized back to ``crop_size``, so
    the network sees the fine-tuning pixel scale at 1 and the layout of whole images at the top of the range.
    """

    def __init__(
        self,
        images: np.ndarray,
        dataset_index: np.ndarray,
        transform: Callable | None = None,
        crop_size: tuple[int, int] | None = None,
        seed: int = 0,
        crop_scale: tuple[float, float] | None = None,
    ):
        if crop_scale is not None and (crop_size is None or not 1 <= crop_scale[0] <= crop_scale[1]):
            raise ValueError(f"crop_scale must be (lo, hi) with 1 <= lo <= hi, with a crop_size; got {crop_scale}")
        self.crop_scale = crop_scale
        self.images = torch.from_numpy(images)
        self.dataset_index = torch.from_numpy(dataset_index).long()
        self.transform = transform
        self.crop_size = crop_size
        self.seed = seed
        self._generator: torch.Generator | None = None
        self._generator_seed: int | None = None
        if crop_size is not None and (crop_size[0] > images.shape[1] or crop_size[1] > images.shape[2]):
            raise ValueError(f"crop size {crop_size} is larger than the cached images {tuple(images.shape[1:])}")

    def __len__(self) -> int:
        return len(self.images)

    def generator(self) -> torch.Generator:
        """The crop generator of this process: seeded with ``seed`` in the main process, the worker seed in a worker."""
        worker = torch.utils.data.get_worker_info()
        seed = self.seed if worker is None else worker.seed
        if self._generator is None or self._generator_seed != seed:
            self._generator = torch.Generator().manual_seed(seed)
            self._generator_seed = seed
        return self._generator

    def crop(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A ``crop_size`` window of ``image`` (H, W) at a position drawn uniformly from ``generator`` (scaled by a
        drawn ``crop_scale`` factor, then resized to ``crop_size``)."""
        size = height, width = self.crop_size
        if self.crop_scale is not None:
            low, high = self.crop_scale
            factor = low + (high - low) * float(torch.rand((), generator=generator))
            height, width = min(image.shape[0], round(height * factor)), min(image.shape[1], round(width * factor))
        top = int(torch.randint(0, image.shape[0] - height + 1, (), generator=generator))
        left = int(torch.randint(0, image.shape[1] - width + 1, (), generator=generator))
        window = image[top : top + height, left : left + width]
        if window.shape == size:
            return window
        resized = F.interpolate(window[None, None].float(), size=size, mode="bilinear", antialias=True)
        return resized[0, 0].round().clamp(0, 255).to(image.dtype)

    def __getitem__(self, index: int) -> dict:
        item = {"dataset_index": self.dataset_index[index]}
        image = self.images[index]
        if self.crop_size is not None:
            image = self.crop(image, self.generator())
        if self.transform is not None:
            item["views"] = self.transform(Image.fromarray(image.numpy()))
        else:
            item["image"] = image[None].float() / 255.0
        return item

    def fixed_batch(self, crops_per_image: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
        """Every image (``crops_per_image`` crops each, at positions fixed by ``seed``, when cropping) as one
        batch: ``"image"`` (N, 1, h, w) in [0, 1] and ``"dataset_index"`` (N,), for deterministic evaluation."""
        generator = torch.Generator().manual_seed(seed)
        images, indices = [], []
        for index in range(len(self)):
            for _ in range(crops_per_image if self.crop_size is not None else 1):
                image = self.images[index]
                images.append(self.crop(image, generator) if self.crop_size is not None else image)
                indices.append(self.dataset_index[index])
        return {"image": torch.stack(images)[:, None].float() / 255.0, "dataset_index": torch.stack(indices)}


def held_out_mask(count: int, fraction: float) -> np.ndarray:
    """Which of ``count`` images (in sorted-id order) form the held-out slice: ``ceil(fraction * count)`` of
    them, at least one when ``fraction > 0``, chosen by a fixed-seed permutation so every run holds out the same."""
    mask = np.zeros(count, dtype=bool)
    if fraction > 0 and count:
        held = min(count - 1, max(1, int(np.ceil(fraction * count))))
        mask[np.random.default_rng(0).permutation(count)[:held]] = True
    return mask


class UnlabeledDataModule(L.LightningDataModule):
    """Unlabelled images from the training splits (train + val, never test) of one or several datasets.

    ``crop_size``: train on random ``crop_size`` windows of images cached at ``resolution`` (see
    ``UnlabeledDataset``); ``None`` trains on whole cached images. ``crop_scale``: multi-scale training windows
    (the held-out slice keeps plain ``crop_size`` windows, the fine-tuning pixel scale). ``held_out_fraction``: a
    deterministic slice of each dataset's pool (``held_out_mask``) kept out of training as ``self.held_out``, so a
    health check can measure the pretraining objective on images pretraining never saw, without touching a test
    split.
    """

    def __init__(
        self,
        datasets: Sequence[str] = ("phantom",),
        data_dir: str | None = None,
        resolution: int | Sequence[int] = 64,
        batch_size: int = 32,
        transform: Callable | None = None,
        num_workers: int = 0,
        cache_dir: str | None = None,
        crop_size: int | Sequence[int] | None = None,
        held_out_fraction: float = 0.0,
        seed: int = 0,
        crop_scale: Sequence[float] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["transform"])
        if not 0 <= held_out_fraction < 1:
            raise ValueError(f"held_out_fraction must be in [0, 1), got {held_out_fraction}")
        self.dataset_names = list(datasets)
        self.size = as_size(resolution)
        self.crop_size = None if crop_size is None else as_size(crop_size)
        self.transform = transform
        self.readers = [get_reader(name, data_dir) for name in self.dataset_names]
        self.dataset: UnlabeledDataset | None = None
        self.held_out: UnlabeledDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        cache_dir = Path(self.hparams.cache_dir) if self.hparams.cache_dir else None
        images, indices, held_images, held_indices = [], [], [], []
        for index, reader in enumerate(self.readers):
            records = sorted(reader.pretraining_records(), key=lambda record: record.image_id)
            cached = cached_images(reader, records, self.size, cache_dir)
            held = held_out_mask(len(cached), self.hparams.held_out_fraction)
            images.append(cached[~held])
            indices.append(np.full(int((~held).sum()), index))
            held_images.append(cached[held])
            held_indices.append(np.full(int(held.sum()), index))
        crop_scale = None if self.hparams.crop_scale is None else tuple(self.hparams.crop_scale)
        self.dataset = UnlabeledDataset(np.concatenate(images), np.concatenate(indices), self.transform,
                                        self.crop_size, self.hparams.seed, crop_scale)
        self.held_out = UnlabeledDataset(np.concatenate(held_images), np.concatenate(held_indices), None,
                                         self.crop_size, self.hparams.seed)

    def train_dataloader(self) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(self.dataset, batch_size=self.hparams.batch_size, shuffle=True, drop_last=True,
                          num_workers=workers, persistent_workers=workers > 0,
                          pin_memory=torch.cuda.is_available())
