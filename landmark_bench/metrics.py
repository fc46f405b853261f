"""Landmark metrics: radial error, MRE, SDR and expected radial error (ERE), exact under DDP.

Radial errors are measured in each image's original pixel grid and scaled by its pixel spacing
(mm per original pixel; NaN means unknown, and the dataset is then reported in pixels). The metric
keeps every point rather than running sums, so that ``compute`` can drop the samples that
``DistributedSampler`` repeats to pad the last batch and give the numbers of a single device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from landmark_bench.geometry import to_original
from landmark_bench.heatmaps import probability_maps

MM_SDR_THRESHOLDS = (2.0, 2.5, 3.0, 4.0)
PX_SDR_THRESHOLDS = (5.0, 10.0, 20.0, 40.0)


def _spacing_or_one(spacing: Tensor) -> Tensor:
    """Spacing with unknown (NaN) entries replaced by 1, so the result stays in pixels."""
    return torch.where(torch.isfinite(spacing), spacing, torch.ones_like(spacing))


def expected_radial_error(
    logits: Tensor,
    pred_xy: Tensor,
    orig_size: Tensor,
    spacing: Tensor,
    threshold: float = 0.05,
) -> Tensor:
    """(B, L) ERE of McCouat & Voiculescu (CVPR 2022) for (B, L, h, w) heatmap logits.

    Spatial softmax, divided by its maximum, values ``<= threshold`` zeroed, renormalised to sum 1;
    the ERE is the expected distance between each network pixel's centre, mapped to the original
    grid of size ``orig_size`` (B, 2) as (H, W), and ``pred_xy`` (B, L, 2, original pixels), times
    ``spacing`` (B,) (NaN: pixels). Computed in float64.
    """
    batch, _, height, width = logits.shape
    probs = probability_maps(logits.detach().double())
    relative = probs / probs.amax(dim=(-2, -1), keepdim=True)
    relative = torch.where(relative > threshold, relative, torch.zeros_like(relative))
    weight = relative / relative.sum(dim=(-2, -1), keepdim=True)

    # the mapping is axis-aligned: original x depends on the column only, original y on the row only
    device = logits.device
    columns = torch.zeros(batch, width, 2, dtype=torch.float64, device=device)
    columns[..., 0] = torch.arange(width, dtype=torch.float64, device=device)
    rows = torch.zeros(batch, height, 2, dtype=torch.float64, device=device)
    rows[..., 1] = torch.arange(height, dtype=torch.float64, device=device)
    orig_size = torch.as_tensor(orig_size, dtype=torch.float64, device=device)
    column_x = to_original(columns, orig_size, (height, width))[..., 0]  # (B, w)
    row_y = to_original(rows, orig_size, (height, width))[..., 1]  # (B, h)

    pred_xy = pred_xy.detach().double()
    delta_x = column_x.unsqueeze(1) - pred_xy[..., 0:1]  # (B, L, w)
    delta_y = row_y.unsqueeze(1) - pred_xy[..., 1:2]  # (B, L, h)
    distance = (delta_y.unsqueeze(-1) ** 2 + delta_x.unsqueeze(-2) ** 2).sqrt()  # (B, L, h, w)
    expected = (weight * distance).sum(dim=(-2, -1))
    spacing = torch.as_tensor(spacing, dtype=torch.float64, device=device)
    return expected * _spacing_or_one(spacing).unsqueeze(-1)


def wrist_width_spacing(
    landmarks: Tensor | np.ndarray, pair: tuple[int, int] = (0, 4), width_mm: float = 50.0
) -> float:
    """Mm per original pixel for a hand radiograph, such that landmarks ``pair`` are ``width_mm`` apart.

    The Digital Hand Atlas has no physical spacing; the field normalises by the wrist width (the
    pair is a setting because works differ: (0, 4) or (1, 5)).
    """
    points = np.asarray(landmarks, dtype=np.float64)
    first, second = pair
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"landmarks must be (L, 2) xy points, got shape {points.shape}")
    if not (-len(points) <= first < len(points) and -len(points) <= second < len(points)):
        raise ValueError(f"wrist pair {pair} is out of range for {len(points)} landmarks")
    width_px = float(np.linalg.norm(points[first] - points[second]))
    if not np.isfinite(width_px) or width_px <= 0:
        raise ValueError(
            f"wrist pair {pair} is degenerate (distance {width_px} px between {points[first]} and "
            f"{points[second]}); cannot normalise the hand to {width_mm} mm"
        )
    return width_mm / width_px


class PointTable(NamedTuple):
    """De-duplicated per-image results, sorted by sample index, for per-image tables."""

    index: Tensor  # (N,) long
    error: Tensor  # (N, L) radial error in ``unit``
    ere: Tensor  # (N, L) in ``unit``, NaN where not given
    pred: Tensor  # (N, L, 2) predictions, original pixels
    unit: str  # "mm" or "px"


class LandmarkMetrics(Metric):
    """MRE (with std), SDR and ERE over every point seen, identical on one device and under DDP.

    ``update`` takes predictions and targets in original pixels, the sample's spacing (NaN: unknown)
    and its dataset index. States are concatenated, never averaged per rank, and ``compute`` keeps
    one copy of each index (``DistributedSampler`` pads the last batches with repeated samples) and
    sorts by index, so summation order, and therefore every bit of the result, does not depend on
    how samples were split across devices.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(
        self,
        num_landmarks: int,
        sdr_thresholds: Sequence[float] | None = None,
        sdr_thresholds_px: Sequence[float] = PX_SDR_THRESHOLDS,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.num_landmarks = num_landmarks
        mm_thresholds = MM_SDR_THRESHOLDS if sdr_thresholds is None else sdr_thresholds
        self.sdr_thresholds = tuple(float(t) for t in mm_thresholds)
        self.sdr_thresholds_px = tuple(float(t) for t in sdr_thresholds_px)
        self.add_state("index", default=[], dist_reduce_fx="cat")
        self.add_state("radial", default=[], dist_reduce_fx="cat")
        self.add_state("spacing", default=[], dist_reduce_fx="cat")
        self.add_state("pred", default=[], dist_reduce_fx="cat")
        self.add_state("ere", default=[], dist_reduce_fx="cat")

    def update(
        self,
        pred_xy: Tensor,
        target_xy: Tensor,
        spacing: Tensor,
        index: Tensor,
        ere: Tensor | None = None,
    ) -> None:
        """Add a batch: (B, L, 2) predicted and true points in original pixels, (B,) spacing and index.

        ``ere`` is (B, L) from :func:`expected_radial_error`, already in mm where spacing is known.
        Give spacing in float64: float32 0.1 is 0.10000000149 and would shift every mm error.
        """
        batch = pred_xy.shape[0]
        expected = (batch, self.num_landmarks, 2)
        if tuple(pred_xy.shape) != expected or tuple(target_xy.shape) != expected:
            raise ValueError(
                f"pred_xy {tuple(pred_xy.shape)} and target_xy {tuple(target_xy.shape)} must both be {expected}"
            )
        if tuple(spacing.shape) != (batch,) or tuple(index.shape) != (batch,):
            raise ValueError(
                f"spacing {tuple(spacing.shape)} and index {tuple(index.shape)} must both be ({batch},)"
            )
        if ere is None:
            ere = torch.full((batch, self.num_landmarks), torch.nan, dtype=torch.float64, device=pred_xy.device)
        elif tuple(ere.shape) != (batch, self.num_landmarks):
            raise ValueError(f"ere {tuple(ere.shape)} must be ({batch}, {self.num_landmarks})")
        pred_xy = pred_xy.detach().double()
        self.index.append(index.detach().long())
        self.radial.append((pred_xy - target_xy.detach().double()).norm(dim=-1))
        self.spacing.append(spacing.detach().double())
        self.pred.append(pred_xy)
        self.ere.append(ere.detach().double())

    def _unique_sorted(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(index, radial, spacing, pred, ere) with one copy per index, sorted by index."""
        if isinstance(self.index, list) and not self.index:
            raise ValueError("LandmarkMetrics holds no samples: update was never called")
        index = dim_zero_cat(self.index)
        order = torch.sort(index, stable=True).indices
        sorted_index = index[order]
        first_copy = torch.ones_like(sorted_index, dtype=torch.bool)
        first_copy[1:] = sorted_index[1:] != sorted_index[:-1]
        keep = order[first_copy]
        states = (self.radial, self.spacing, self.pred, self.ere)
        return (index[keep], *(dim_zero_cat(state)[keep] for state in states))

    @staticmethod
    def _unit(spacing: Tensor) -> str:
        """The unit: mm if every sample has a spacing, px if none has; a mixture has no single unit."""
        known = torch.isfinite(spacing)
        if bool(known.all()):
            return "mm"
        if not bool(known.any()):
            return "px"
        raise ValueError(
            f"{int(known.sum())} of {len(spacing)} samples have a pixel spacing and the rest do not; "
            "a dataset must be reported entirely in mm or entirely in pixels"
        )

    def _table(self) -> PointTable:
        index, radial, spacing, pred, ere = self._unique_sorted()
        unit = self._unit(spacing)
        error = radial * _spacing_or_one(spacing).unsqueeze(-1)
        return PointTable(index=index, error=error, ere=ere, pred=pred, unit=unit)

    def compute(self) -> dict[str, Any]:
        """A JSON-ready dict: unit, mre, mre_std, sdr {threshold: %}, ere, per-landmark values, n_images.

        ``mre_std`` is the population standard deviation (ddof=0) over all points (images x landmarks).
        ``ere`` and ``per_landmark_ere`` are None when no ERE was given.
        """
        table = self._table()
        errors = table.error
        thresholds = self.sdr_thresholds if table.unit == "mm" else self.sdr_thresholds_px
        ere_given = ~torch.isnan(table.ere)
        if bool(ere_given.any()) and not bool(ere_given.all()):
            raise ValueError("ERE was given for some samples only; give it for every update or for none")
        has_ere = bool(ere_given.all())
        return {
            "unit": table.unit,
            "mre": errors.mean().item(),
            "mre_std": errors.std(correction=0).item(),
            "sdr": {threshold: 100.0 * (errors <= threshold).double().mean().item() for threshold in thresholds},
            "ere": table.ere.mean().item() if has_ere else None,
            "per_landmark_mre": errors.mean(0).tolist(),
            "per_landmark_ere": table.ere.mean(0).tolist() if has_ere else None,
            "n_images": len(table.index),
        }

    def point_table(self) -> PointTable:
        """The de-duplicated points behind :meth:`compute` (gathered from every rank under DDP)."""
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self.sync_on_compute):
            return self._table()
