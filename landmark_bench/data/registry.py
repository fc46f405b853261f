"""Dataset readers by name, and the procedural phantom as a reader."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from landmark_bench.data import phantom
from landmark_bench.data.readers import (
    Aasce2019Reader,
    ChestReader,
    DatasetReader,
    HandReader,
    Isbi2015Reader,
    Record,
)


@lru_cache(maxsize=4096)
def _phantom(seed: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    image, landmarks = phantom.make_phantom(seed, index)
    image.setflags(write=False)
    landmarks.setflags(write=False)
    return image, landmarks


class PhantomReader(DatasetReader):
    """The procedural phantom: images generated from (seed, index), no data folder needed."""

    name = "phantom"
    needs_data_dir = False
    landmark_names = phantom.LANDMARK_NAMES
    num_landmarks = len(phantom.LANDMARK_NAMES)

    def __init__(self, data_dir: str | Path | None = None, seed: int = 0, num_train: int = 80, num_val: int = 20, num_test: int = 40):
        super().__init__(data_dir)
        self.seed = seed
        first = {"train": 0, "val": num_train, "test": num_train + num_val}
        self.ranges = {split: range(first[split], first[split] + count) for split, count in
                       (("train", num_train), ("val", num_val), ("test", num_test))}

    def _split_records(self, split: str) -> list[Record]:
        return [
            Record(self.name, f"{index:05d}", Path(f"phantom-seed{self.seed}/{index:05d}"), phantom.PHANTOM_IMAGE_SIZE,
                   _phantom(self.seed, index)[1].copy(), phantom.PHANTOM_SPACING_MM)
            for index in self.ranges[split]
        ]

    def load_image(self, record: Record) -> np.ndarray:
        return _phantom(self.seed, int(record.image_id))[0].copy()


DATASETS: dict[str, type[DatasetReader]] = {
    "isbi2015": Isbi2015Reader,
    "aasce2019": Aasce2019Reader,
    "hand": HandReader,
    "chest": ChestReader,
    "phantom": PhantomReader,
}


def register_dataset(reader: type[DatasetReader]) -> type[DatasetReader]:
    """Make a reader known by its ``name`` to every command (usable as a class decorator)."""
    if not getattr(reader, "name", None):
        raise ValueError(f"dataset reader {reader.__name__} needs a 'name'")
    DATASETS[reader.name] = reader
    return reader


def get_reader(name: str, data_dir: str | Path | None = None, **options) -> DatasetReader:
    """The reader for dataset ``name``; unknown names list the valid ones."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}")
    if DATASETS[name].needs_data_dir:
        if data_dir is None:
            raise ValueError(f"dataset {name!r} needs a data folder (--data-dir); only 'phantom' needs none")
        if not Path(data_dir).is_dir():
            raise ValueError(f"data folder {data_dir} does not exist")
    return DATASETS[name](data_dir, **options)
