"""The one landmark DataModule every method is fine-tuned and evaluated with, and the unlabelled one
every method is pretrained with."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import lightning.pytorch as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from landmark_bench.data.cache import cached_images
from landmark_bench.data.readers import DatasetReader, Record
from landmark_bench.data.registry import get_reader
from landmark_bench.data.transforms import Augment
from landmark_bench.geometry import to_network
from landmark_bench.heatmaps import gaussian_targets

SHOTS_CHOICES = (1, 5, 10, 25, 50, "all")


def as_size(resolution: int | Sequence[int]) -> tuple[int, int]:
    """``128`` -> (128, 128); ``[160, 128]`` -> (160, 128) as (h, w)."""
    if isinstance(resolution, int):
        return resolution, resolution
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
        cache_dir = Path(self.hparams.cache_dir) if self.hparams.cache_dir else None
        for split, records in splits.items():
            images = cached_images(self.reader, records, self.size, cache_dir)
            training = split == "train"
            augment = Augment() if training and self.hparams.augment else None
            self.datasets[split] = LandmarkDataset(images, records, self.hparams.sigma, augment,
                                                   self.hparams.samples_per_epoch if training else None)

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

    def split_dataloader(self, split: str) -> DataLoader:
        return self._loader(self.datasets[split])


class UnlabeledDataset(Dataset):
    """Cached images of several datasets with their dataset index; optional view transform (SSL)."""

    def __init__(self, images: np.ndarray, dataset_index: np.ndarray, transform: Callable | None = None):
        self.images = torch.from_numpy(images)
        self.dataset_index = torch.from_numpy(dataset_index).long()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        item = {"dataset_index": self.dataset_index[index]}
        if self.transform is not None:
            item["views"] = self.transform(Image.fromarray(self.images[index].numpy()))
        else:
            item["image"] = self.images[index][None].float() / 255.0
        return item


class UnlabeledDataModule(L.LightningDataModule):
    """Unlabelled images from the training splits (train + val, never test) of one or several datasets."""

    def __init__(
        self,
        datasets: Sequence[str] = ("phantom",),
        data_dir: str | None = None,
        resolution: int | Sequence[int] = 64,
        batch_size: int = 32,
        transform: Callable | None = None,
        num_workers: int = 0,
        cache_dir: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["transform"])
        self.dataset_names = list(datasets)
        self.size = as_size(resolution)
        self.transform = transform
        self.readers = [get_reader(name, data_dir) for name in self.dataset_names]
        self.dataset: UnlabeledDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        cache_dir = Path(self.hparams.cache_dir) if self.hparams.cache_dir else None
        images, indices = [], []
        for index, reader in enumerate(self.readers):
            cached = cached_images(reader, reader.pretraining_records(), self.size, cache_dir)
            images.append(cached)
            indices.append(np.full(len(cached), index))
        self.dataset = UnlabeledDataset(np.concatenate(images), np.concatenate(indices), self.transform)

    def train_dataloader(self) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(self.dataset, batch_size=self.hparams.batch_size, shuffle=True, drop_last=True,
                          num_workers=workers, persistent_workers=workers > 0,
                          pin_memory=torch.cuda.is_available())
