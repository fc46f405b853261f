"""Readers for each dataset's published layout, and the records every method sees.

A reader lists :class:`Record` s (image path, original size, landmarks, spacing) per split without
decoding images; :meth:`DatasetReader.load_image` decodes one. Every annotation is validated when the
records are listed, so bad input stops in the main process with the file and row named.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from landmark_bench.metrics import wrist_width_spacing


class DataError(ValueError):
    """Bad input data: the message names the file (and row) at fault."""


ISBI_LANDMARK_NAMES = [
    "sella", "nasion", "orbitale", "porion", "subspinale", "supramentale", "pogonion", "menton",
    "gnathion", "gonion", "lower_incisal_incision", "upper_incisal_incision", "upper_lip",
    "lower_lip", "subnasale", "soft_tissue_pogonion", "posterior_nasal_spine",
    "anterior_nasal_spine", "articulare",
]


@dataclass(frozen=True)
class Record:
    """One annotated image, everything but the pixels."""

    dataset: str
    image_id: str
    path: Path
    size: tuple[int, int]  # original (H, W)
    landmarks: np.ndarray = field(repr=False)  # (L, 2) xy in original pixels
    spacing: float | None  # mm per original pixel, None: report pixels


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except FileNotFoundError:
        raise DataError(f"image file {path} is missing") from None
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(f"image file {path} cannot be read: {error}") from None
    return height, width


# One-channel modes deeper than 8 bits (16-bit PNG/TIFF exports, 32-bit integer or float TIFF).
HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def decode_grey(path: Path) -> np.ndarray:
    """Decode an image fully to (H, W) uint8; truncated or corrupt files raise :class:`DataError`.

    An image deeper than 8 bits is stretched from its own minimum to its maximum, since X-ray exports use only part
    of the 16-bit range (often 12 bits) and PIL's own conversion would clip everything above 255 to white.
    """
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in HIGH_DEPTH_MODES:
                values = np.asarray(image, dtype=np.float64)
                low, high = values.min(), values.max()
                scaled = (values - low) / (high - low) * 255 if high > low else np.zeros_like(values)
                return np.rint(scaled).astype(np.uint8)
            return np.asarray(image.convert("L"))
    except FileNotFoundError:
        raise DataError(f"image file {path} is missing") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"image file {path} is corrupt or truncated: {error}") from None


def check_landmarks(points: np.ndarray, size: tuple[int, int], expected: int, where: str) -> np.ndarray:
    """Validate count, finiteness and bounds of (L, 2) points; ``where`` names the file/row."""
    if points.shape != (expected, 2):
        raise DataError(f"{where}: expected {expected} landmarks, found {points.shape[0]}")
    if not np.isfinite(points).all():
        raise DataError(f"{where}: non-finite landmark coordinates")
    height, width = size
    outside = (points[:, 0] < -0.5) | (points[:, 0] > width - 0.5) | (points[:, 1] < -0.5) | (points[:, 1] > height - 0.5)
    if outside.any():
        index = int(np.flatnonzero(outside)[0])
        raise DataError(
            f"{where}: landmark {index} at {points[index].tolist()} lies outside the {width}x{height} image"
        )
    return points


def parse_numbers(text: str, where: str) -> list[float]:
    try:
        return [float(value) for value in text.replace(",", " ").split()]
    except ValueError:
        raise DataError(f"{where}: non-numeric value in {text.strip()!r}") from None


def require_dir(path: Path, dataset: str, hint: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{dataset}: expected folder {path} ({hint}); is the data folder of the right layout?")
    return path


def carve_validation(ids: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic (train, val): the last ``fraction`` of the sorted ids, at least one, is validation."""
    ids = sorted(ids)
    num_val = max(1, round(len(ids) * fraction))
    return ids[:-num_val], ids[-num_val:]


class DatasetReader:
    """Base reader: subclasses set the class attributes and implement :meth:`_split_records`."""

    name: str
    num_landmarks: int
    landmark_names: list[str]
    splits: tuple[str, ...] = ("train", "val", "test")
    test_splits: tuple[str, ...] = ("test",)  # the splits reported (pooled last where several)
    needs_data_dir: bool = True  # False for datasets generated in code

    def __init__(self, data_dir: str | Path | None):
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self._records: dict[str, list[Record]] = {}

    def records(self, split: str) -> list[Record]:
        """The records of ``split``, sorted by image id."""
        if split not in self.splits:
            raise ValueError(f"{self.name} has no split {split!r}; valid splits: {', '.join(self.splits)}")
        if split not in self._records:
            self._records[split] = sorted(self._split_records(split), key=lambda record: record.image_id)
        return self._records[split]

    def pretraining_records(self) -> list[Record]:
        """Unlabelled images for pretraining: the published training split (train + val), never test."""
        return self.records("train") + self.records("val")

    def load_image(self, record: Record) -> np.ndarray:
        image = decode_grey(record.path)
        if image.shape != record.size:
            raise DataError(f"image file {record.path} changed size: {image.shape} vs header {record.size}")
        return image

    def reference_readers(self) -> dict[str, tuple["DatasetReader", "DatasetReader"]]:
        """Human reference rows of the leaderboard: name -> (ground-truth reader, reader whose points are scored).

        None by default; ISBI 2015 scores its junior doctor against its senior doctor.
        """
        return {}

    def _split_records(self, split: str) -> list[Record]:
        raise NotImplementedError


class Isbi2015Reader(DatasetReader):
    """ISBI 2015 cephalometric challenge: 150 training, 150 Test1, 100 Test2 images at 0.1 mm/pixel."""

    name = "isbi2015"
    num_landmarks = 19
    landmark_names = ISBI_LANDMARK_NAMES
    splits = ("train", "val", "test1", "test2", "test")
    test_splits = ("test1", "test2", "test")
    spacing_mm = 0.1
    folders = {"trainval": "TrainingData", "test1": "Test1Data", "test2": "Test2Data"}

    def __init__(self, data_dir: str | Path, ground_truth: str = "mean", val_fraction: float = 0.2):
        super().__init__(data_dir)
        if ground_truth not in ("mean", "senior", "junior"):
            raise ValueError(f"ground_truth must be mean, senior or junior, not {ground_truth!r}")
        self.ground_truth = ground_truth
        self.val_fraction = val_fraction
        self.root = require_dir(self.data_dir / "isbi2015", self.name, "ISBI 2015 layout")

    def reference_readers(self) -> dict[str, tuple[DatasetReader, DatasetReader]]:
        return {"inter_observer": (Isbi2015Reader(self.data_dir, "senior", self.val_fraction),
                                   Isbi2015Reader(self.data_dir, "junior", self.val_fraction))}

    def _folder_ids(self, key: str) -> list[str]:
        folder = require_dir(self.root / "RawImage" / self.folders[key], self.name, "RawImage/<split>Data")
        return sorted(path.stem for path in folder.glob("*.jpg"))

    def _split_records(self, split: str) -> list[Record]:
        if split == "test":
            return self.records("test1") + self.records("test2")
        if split in ("train", "val"):
            train_ids, val_ids = carve_validation(self._folder_ids("trainval"), self.val_fraction)
            ids, folder = (train_ids if split == "train" else val_ids), self.folders["trainval"]
        else:
            ids, folder = self._folder_ids(split), self.folders[split]
        return [self._record(image_id, self.root / "RawImage" / folder / f"{image_id}.jpg") for image_id in ids]

    def doctor_landmarks(self, image_id: str, doctor: str, size: tuple[int, int]) -> np.ndarray:
        path = self.root / "AnnotationsByMD" / f"400_{doctor}" / f"{image_id}.txt"
        if not path.is_file():
            raise DataError(f"annotation file {path} is missing")
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        rows = [parse_numbers(line, f"{path} line {number}") for number, line in enumerate(lines, 1)]
        if any(len(row) != 2 for row in rows):
            bad = next(number for number, row in enumerate(rows, 1) if len(row) != 2)
            raise DataError(f"{path} line {bad}: expected 'x,y'")
        points = np.asarray(rows, dtype=np.float64).reshape(-1, 2)
        return check_landmarks(points, size, self.num_landmarks, str(path))

    def _record(self, image_id: str, path: Path) -> Record:
        size = image_size(path)
        doctors = ["senior", "junior"] if self.ground_truth == "mean" else [self.ground_truth]
        landmarks = np.mean([self.doctor_landmarks(image_id, doctor, size) for doctor in doctors], axis=0)
        return Record(self.name, image_id, path, size, landmarks, self.spacing_mm)


class Aasce2019Reader(DatasetReader):
    """AASCE 2019 spine ("boostnet" layout): 68 vertebra corners, normalised CSV rows, no spacing."""

    name = "aasce2019"
    num_landmarks = 68
    landmark_names = [f"vertebra{v:02d}_{corner}" for v in range(17) for corner in ("tl", "tr", "bl", "br")]
    folders = {"trainval": "training", "test": "test"}
    # Published annotations that lie outside their image; excluded by name (and said so in the README),
    # never skipped silently.
    EXCLUDED = {"sunhl-1th-25-Jul-2016-49 A AP.jpg": "landmark 17 lies 57 px below the image (y/H = 1.0245)"}

    def __init__(self, data_dir: str | Path, val_fraction: float = 0.2):
        super().__init__(data_dir)
        self.val_fraction = val_fraction
        self.root = require_dir(self.data_dir / "aasce2019", self.name, "boostnet layout: data/, labels/")

    def _folder_records(self, folder: str) -> list[Record]:
        labels = require_dir(self.root / "labels" / folder, self.name, "labels/<split>")
        names_path, landmarks_path = labels / "filenames.csv", labels / "landmarks.csv"
        for path in (names_path, landmarks_path):
            if not path.is_file():
                raise DataError(f"{self.name}: {path} is missing")
        names = [line.strip() for line in names_path.read_text().splitlines() if line.strip()]
        rows = [line for line in landmarks_path.read_text().splitlines() if line.strip()]
        if len(rows) != len(names):
            raise DataError(f"{landmarks_path}: {len(rows)} rows but {len(names)} names in {names_path}")
        records = []
        for number, (name, row) in enumerate(zip(names, rows), 1):
            if name in self.EXCLUDED:
                continue
            where = f"{landmarks_path} row {number} ({name})"
            values = np.asarray(parse_numbers(row, where), dtype=np.float64)
            if values.size != 2 * self.num_landmarks:
                raise DataError(f"{where}: expected {2 * self.num_landmarks} values, found {values.size}")
            path = self.root / "data" / folder / name
            size = image_size(path)
            points = np.stack([values[: self.num_landmarks] * size[1], values[self.num_landmarks:] * size[0]], 1)
            check_landmarks(points, size, self.num_landmarks, where)
            records.append(Record(self.name, Path(name).stem, path, size, points, None))
        return records

    def _split_records(self, split: str) -> list[Record]:
        if split == "test":
            return self._folder_records(self.folders["test"])
        records = self._folder_records(self.folders["trainval"])
        train_ids, val_ids = carve_validation([record.image_id for record in records], self.val_fraction)
        keep = set(train_ids if split == "train" else val_ids)
        return [record for record in records if record.image_id in keep]


class PresentImagesReader(DatasetReader):
    """Datasets of which only some images are present: splits over the sorted images present.

    The last quarter (rounded up) is test, then one fifth of the rest (at least one) validation.
    """

    image_glob: str

    def _present(self) -> list[Path]:
        paths = sorted(self.root.glob(self.image_glob))
        if not paths:
            raise DataError(f"{self.name}: no images matching {self.root / self.image_glob}")
        return paths

    def _split_records(self, split: str) -> list[Record]:
        paths = self._present()
        num_test = math.ceil(len(paths) / 4)
        rest, test = paths[: len(paths) - num_test], paths[len(paths) - num_test:]
        train_ids, val_ids = carve_validation([path.stem for path in rest], 0.2)
        chosen = {"test": test, "train": [p for p in rest if p.stem in train_ids], "val": [p for p in rest if p.stem in val_ids]}
        return [self._record(path) for path in chosen[split]]

    def _record(self, path: Path) -> Record:
        raise NotImplementedError


class HandReader(PresentImagesReader):
    """Digital Hand Atlas with Payer et al.'s 37 landmarks; mm by wrist-width normalisation."""

    name = "hand"
    num_landmarks = 37
    landmark_names = [f"hand{index:02d}" for index in range(37)]
    image_glob = "jpg/*.jpg"

    def __init__(self, data_dir: str | Path, wrist_pair: tuple[int, int] = (0, 4), wrist_width_mm: float = 50.0):
        super().__init__(data_dir)
        self.root = require_dir(self.data_dir / "hand", self.name, "jpg/ and labels/all.csv")
        self.wrist_pair, self.wrist_width_mm = tuple(wrist_pair), wrist_width_mm
        self._rows: dict[str, tuple[int, str]] | None = None

    def _label_rows(self) -> dict[str, tuple[int, str]]:
        if self._rows is None:
            path = self.root / "labels" / "all.csv"
            if not path.is_file():
                raise DataError(f"{self.name}: annotation file {path} is missing")
            self._rows = {}
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if line.strip():
                    self._rows[line.split(",", 1)[0].strip()] = (number, line)
        return self._rows

    def _record(self, path: Path) -> Record:
        labels = self.root / "labels" / "all.csv"
        if path.stem not in self._label_rows():
            raise DataError(f"{labels}: no row for image {path}")
        number, line = self._label_rows()[path.stem]
        where = f"{labels} row {number} (id {path.stem})"
        values = parse_numbers(line, where)[1:]
        if len(values) != 2 * self.num_landmarks:
            raise DataError(f"{where}: expected {self.num_landmarks} landmarks, found {len(values) / 2:g}")
        size = image_size(path)
        points = check_landmarks(np.asarray(values, dtype=np.float64).reshape(-1, 2), size, self.num_landmarks, where)
        spacing = wrist_width_spacing(points, self.wrist_pair, self.wrist_width_mm)
        return Record(self.name, path.stem, path, size, points, spacing)


class ChestReader(PresentImagesReader):
    """Shenzhen chest X-rays with Zhu et al.'s 6 landmarks, normalised coordinates, pixels."""

    name = "chest"
    num_landmarks = 6
    landmark_names = [f"chest{index}" for index in range(6)]
    image_glob = "pngs/*.png"

    def __init__(self, data_dir: str | Path):
        super().__init__(data_dir)
        self.root = require_dir(self.data_dir / "chest", self.name, "pngs/ and labels/")

    def _record(self, path: Path) -> Record:
        labels = self.root / "labels" / f"{path.stem}.txt"
        if not labels.is_file():
            raise DataError(f"annotation file {labels} is missing (image {path})")
        lines = [line for line in labels.read_text().splitlines() if line.strip()]
        header = parse_numbers(lines[0], f"{labels} line 1") if lines else []
        if header != [self.num_landmarks]:
            raise DataError(f"{labels} line 1: expected the landmark count {self.num_landmarks}, found {lines[:1]}")
        rows = [parse_numbers(line, f"{labels} line {number}") for number, line in enumerate(lines[1:], 2)]
        if len(rows) != self.num_landmarks or any(len(row) != 2 for row in rows):
            raise DataError(f"{labels}: expected {self.num_landmarks} lines 'x y', found {len(rows)}")
        size = image_size(path)
        points = np.asarray(rows, dtype=np.float64) * np.array([size[1], size[0]])
        return Record(self.name, path.stem, path, size, check_landmarks(points, size, self.num_landmarks, str(labels)), None)
