"""Leaderboards and figures of a sweep, built from its ``results.csv`` rows only (plus the per-image
errors and overlay arrays the rows point to), so every printed number traces back to a run.

One table per (dataset, test split, shots, protocol): a row per method, MRE/ERE as mean ± std over seeds
of each seed's value, SDR as the mean over seeds, the best value per column marked, and a paired Wilcoxon
signed-rank test of each method against the best-MRE one. A method with fewer finished seeds than
expected is shown as incomplete, never averaged over the seeds that happened to finish: a reviewer
would otherwise compare a 2-seed mean with 3-seed means without knowing it.

Every pretrained row also carries its gain over its own network family's random-init control (the MRE
difference, with a paired Wilcoxon test), so that the pretraining is never confounded with the
architecture; where a sweep ran both protocols (``finetune``: whole network trained; ``probe``: backbone
frozen, light head trained) a side-by-side table puts the two next to each other, since fine-tuning on a
few images can wash out what a probe shows the pretraining taught.

Across datasets: each method's rank per dataset and its mean rank (MREs of different datasets are not on one scale,
ranks are); and, from a sweep run with ``--eval-datasets``, the generalisation table (trained on A, scored on B).
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy.stats import wilcoxon  # noqa: E402

from landmark_bench.io import atomic_write, atomic_write_text, write_csv  # noqa: E402
from landmark_bench.methods import CONTROLS, PROTOCOLS, control_of, family_of  # noqa: E402

METHOD_ORDER = ("mean_shape", "scratch", "imagenet", "simclr", "moco", "dino", "scratch_unet", "ddpm", "cdpm_align")
REFERENCE = "inter_observer"  # junior vs senior doctor on ISBI: a human reference line, not a competitor
BASELINE = "mean_shape"  # no heatmap, no ERE
PREFERRED_OVERLAY_SHOTS = "10"
ALPHA = 0.05
TEST_NAME = "two-sided Wilcoxon signed-rank test on per-image MRE, paired by (seed, image)"
DAGGER = "†"
RUN_KEY = ["method", "dataset", "shots", "protocol", "seed"]
PER_IMAGE_CSV = "per_image_mre.csv"


def pooled_test(dataset: str) -> bool:
    """Whether the dataset's ``test`` split pools several reported test splits (ISBI's Test1 and Test2)."""
    from landmark_bench.data.registry import DATASETS

    reader = DATASETS.get(dataset)
    return reader is not None and len(reader.test_splits) > 1


DEFAULT_PROTOCOL = "finetune"  # results files written before the probe protocol existed
PROTOCOL_NOTES = {"finetune": "finetune: the whole network trained on the few shots",
                  "probe": "probe: the pretrained backbone frozen, only a light head trained"}
GAIN_NOTE = ("ΔMRE vs control: the method's MRE minus that of its own network family's random-init control "
             f"({', '.join(f'{control} for the {family} family' for family, control in CONTROLS.items())}), "
             f"means over seeds; negative = better; p: {TEST_NAME}.")


def shots_sort_key(shots: str) -> float:
    """Numeric order with ``all`` last."""
    return math.inf if shots == "all" else float(shots)


def _normalise_shots(value: object) -> str:
    """``10``, ``10.0`` and ``"10"`` are the same cell; the reference row has no shots."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if number.is_integer() else text


def protocol_order(protocols: Iterable[str]) -> list[str]:
    """``finetune`` then ``probe``, then any other protocol alphabetically."""
    protocols = set(protocols)
    return [p for p in PROTOCOLS if p in protocols] + sorted(protocols - set(PROTOCOLS))


def method_order(methods: Iterable[str]) -> list[str]:
    """The design's method order, then any user method alphabetically; the reference is never a method."""
    methods = set(methods) - {REFERENCE}
    return [m for m in METHOD_ORDER if m in methods] + sorted(methods - set(METHOD_ORDER))


def read_results(*paths: str | Path) -> pd.DataFrame:
    """``results.csv`` (or several, e.g. two datasets' sweeps, as one) with shots as strings and seeds as nullable
    ints.

    A failed row superseded by a done row of the same job (a retry) is dropped; two done rows of one job
    are an error, since averaging or picking one would silently change the numbers. A dataset's reference row
    (``REFERENCE``) is written by every sweep of it, so identical copies of it (two shot counts' sweeps read
    together) count once; copies that differ are an error like any other job's.
    """
    text_columns = ["method", "dataset", "status", "reason", "run_dir", "unit", "subset_ids", "shots", "protocol"]
    frame = pd.concat([pd.read_csv(path, dtype={column: str for column in text_columns}) for path in paths],
                      ignore_index=True)
    frame["shots"] = frame["shots"].map(_normalise_shots)
    protocol = frame["protocol"] if "protocol" in frame else pd.Series("", index=frame.index, dtype=str)
    frame["protocol"] = protocol.fillna("").str.strip().replace("", DEFAULT_PROTOCOL)
    frame["seed"] = pd.to_numeric(frame["seed"]).astype("Int64")
    frame["reason"] = frame["reason"].fillna("") if "reason" in frame else ""
    frame = frame[~(frame["method"].eq(REFERENCE) & frame.duplicated(keep="first"))].reset_index(drop=True)
    done = frame["status"].eq("done")
    duplicated = frame[done][frame[done].duplicated(RUN_KEY, keep=False)]
    if not duplicated.empty:
        jobs = sorted({tuple(str(v) for v in key) for key in duplicated[RUN_KEY].itertuples(index=False)})
        raise ValueError(f"{', '.join(map(str, paths))}: several done rows for one job ({', '.join(RUN_KEY)}): {jobs}")
    frame = frame.assign(_done=done).sort_values("_done", kind="stable")
    return frame.drop_duplicates(RUN_KEY, keep="last").drop(columns="_done").sort_index()


def per_image_mre(run_dir: str) -> pd.Series | None:
    """Mean radial error over landmarks per (split, image_id) from a run's ``errors.csv``; None if absent."""
    if not isinstance(run_dir, str) or not (path := Path(run_dir) / "errors.csv").is_file():
        return None
    errors = pd.read_csv(path, dtype={"split": str, "image_id": str})
    return errors.groupby(["split", "image_id"])["radial_error"].mean()


def read_stored_per_image(*results_csvs: str | Path) -> pd.DataFrame:
    """The ``per_image_mre.csv`` files that ``build_leaderboard`` wrote beside these ``results.csv`` files (one row per
    job key, split and image): what its paired tests need once the run folders are gone, e.g. on a fresh clone of
    committed results."""
    paths = [Path(path).parent / PER_IMAGE_CSV for path in results_csvs]
    frames = [pd.read_csv(path, dtype={"method": str, "dataset": str, "shots": str, "protocol": str, "split": str,
                                       "image_id": str}) for path in paths if path.is_file()]
    if not frames:
        return pd.DataFrame(columns=[*RUN_KEY, "split", "image_id", "mre"])
    stored = pd.concat(frames, ignore_index=True)
    stored["shots"] = stored["shots"].map(_normalise_shots)
    stored["seed"] = pd.to_numeric(stored["seed"]).astype("Int64")
    return stored


def run_image_errors(results: pd.DataFrame, stored: pd.DataFrame | None = None) -> dict[str, pd.Series | None]:
    """Per done run folder of ``results``: its per-image MRE, from the folder's ``errors.csv`` or else from the
    ``stored`` rows of the same job (``read_stored_per_image``); None where neither has it."""
    stored_by_job = {} if stored is None or stored.empty else {
        tuple(key): rows.set_index(["split", "image_id"])["mre"].rename("radial_error")
        for key, rows in stored.groupby(RUN_KEY, dropna=False)}
    errors = {}
    for row in results[results["status"].eq("done") & results["run_dir"].notna()].itertuples(index=False):
        found = per_image_mre(row.run_dir)
        errors[row.run_dir] = found if found is not None else stored_by_job.get(
            tuple(getattr(row, column) for column in RUN_KEY))
    return errors


def per_image_frame(results: pd.DataFrame, image_errors: dict[str, pd.Series | None]) -> pd.DataFrame:
    """The rows of ``per_image_mre.csv``: job key, split, image and MRE of every done run whose errors are known."""
    parts = []
    for row in results[results["status"].eq("done") & results["run_dir"].notna()].itertuples(index=False):
        if (errors := image_errors.get(row.run_dir)) is not None:
            part = errors.rename("mre").reset_index()
            parts.append(part.assign(**{column: getattr(row, column) for column in RUN_KEY}))
    columns = [*RUN_KEY, "split", "image_id", "mre"]
    return pd.concat(parts, ignore_index=True)[columns] if parts else pd.DataFrame(columns=columns)


def _split_errors(errors: pd.Series, split: str) -> pd.Series:
    """The images of ``split``: ``errors.csv`` holds the parts of a pooled split (ISBI test1, test2)
    rather than the pooled ``test`` itself, so ``test`` falls back to every test row."""
    splits = errors.index.get_level_values("split")
    if (splits == split).any():
        return errors[splits == split]
    return errors if split == "test" else errors.iloc[:0]


@dataclass
class Table:
    """One leaderboard table: its rows are the tidy CSV rows, ``notes`` its footnotes."""

    dataset: str
    split: str
    shots: str
    protocol: str
    unit: str
    thresholds: list[str]
    rows: pd.DataFrame
    best_method: str | None
    notes: list[str] = field(default_factory=list)

    @property
    def title(self) -> str:
        split = "Test (pooled)" if self.split == "test" and pooled_test(self.dataset) else self.split.capitalize()
        shots = "all training images" if self.shots == "all" else f"{self.shots} shots"
        return f"{self.dataset}, {split}, {shots}"

    @property
    def heading(self) -> str:
        return f"{self.title} ({self.unit}), {self.protocol}"


def _thresholds(frame: pd.DataFrame, split: str) -> list[str]:
    """SDR thresholds with values for this split, as written in the column names (``2.0``, ``2.5``...)."""
    pattern = re.compile(rf"^{re.escape(split)}_sdr_(\d+(?:\.\d+)?)$")
    found = [match.group(1) for column in frame.columns if (match := pattern.match(column))
             and frame[column].notna().any()]
    return sorted(found, key=float)


def _test_splits(frame: pd.DataFrame) -> list[str]:
    """Test splits with values, parts first and the pooled ``test`` last; never ``val``."""
    splits = [match.group(1) for column in frame.columns if (match := re.match(r"^(test\w*)_mre$", column))
              and frame[column].notna().any()]
    return sorted(splits, key=lambda split: (split == "test", split)) or ["test"]


def _column(frame: pd.DataFrame, name: str) -> pd.Series:
    return pd.to_numeric(frame[name]) if name in frame else pd.Series(np.nan, index=frame.index)


def _seed_summary(done: pd.DataFrame, split: str, thresholds: list[str]) -> dict[str, float]:
    """Mean and sample std (ddof=1, NaN for one seed) over seeds of each seed's value."""
    mre, ere = _column(done, f"{split}_mre"), _column(done, f"{split}_ere")
    summary = {"mre_mean": mre.mean(), "mre_std": mre.std(), "ere_mean": ere.mean(), "ere_std": ere.std()}
    summary.update({f"sdr_{t}": _column(done, f"{split}_sdr_{t}").mean() for t in thresholds})
    return summary


def _missing_seed_note(method: str, rows: pd.DataFrame, done_seeds: set, expected: int, split: str) -> str:
    failed = rows[~rows["seed"].isin(done_seeds)]
    reasons = [f"seed {seed}: " + (f"no {split} metrics" if status == "done"
                                   else ", ".join(filter(None, [status, reason])))
               for seed, status, reason in failed[["seed", "status", "reason"]].itertuples(index=False)]
    if len(done_seeds) + len(failed) < expected:
        reasons.append(f"{expected - len(done_seeds) - len(failed)} seed(s) without a row")
    return (f"{method}: incomplete, {len(done_seeds)}/{expected} seeds with {split} results "
            f"({'; '.join(reasons)}); not averaged")


def _paired_test(base: pd.Series, other: pd.Series) -> tuple[float, int]:
    """Wilcoxon signed-rank p-value over the (seed, split, image_id) pairs both methods have."""
    pairs = pd.concat([base.rename("base"), other.rename("other")], axis=1, join="inner")
    if pairs.empty:
        return math.nan, 0
    if pairs["other"].eq(pairs["base"]).all():  # identical samples: no evidence of a difference (scipy gives nan)
        return 1.0, len(pairs)
    with np.errstate(invalid="ignore", divide="ignore"):
        result = wilcoxon(pairs["other"], pairs["base"], alternative="two-sided")
    return float(result.pvalue), len(pairs)


def not_learned(method_rows: pd.DataFrame) -> bool:
    """Whether any of these result rows fine-tuned a pretraining whose health record says it did not learn."""
    return "pretraining_learned" in method_rows and bool(
        method_rows["pretraining_learned"].astype(str).str.lower().eq("false").any())


def _method_rows(cell: pd.DataFrame, methods: list[str], split: str, expected: int, thresholds: list[str],
                 image_errors: dict[str, pd.Series | None], notes: list[str]) -> tuple[pd.DataFrame, dict]:
    """A summary row per method, and each complete method's per-image MRE indexed by (seed, split, image_id)."""
    rows, samples = [], {}
    for method in methods:
        method_rows = cell[cell["method"] == method]
        done = method_rows[method_rows["status"].eq("done") & _column(method_rows, f"{split}_mre").notna()]
        done_seeds = set(done["seed"].dropna().tolist())
        row = {"method": method, "reference": False, "n_seeds": len(done_seeds), "n_expected": expected,
               "incomplete": len(done_seeds) < expected,
               "not_learned": not_learned(method_rows)}
        rows.append(row)
        if row["not_learned"]:
            notes.append(f"{method}: its pretraining did not learn (see the pretraining's health.json); "
                         "the row measures an untrained network, not the method")
        if row["incomplete"]:
            notes.append(_missing_seed_note(method, method_rows, done_seeds, expected, split))
            continue
        row.update(_seed_summary(done, split, thresholds))
        per_seed = {seed: image_errors.get(run_dir) for seed, run_dir in zip(done["seed"], done["run_dir"])}
        missing = sorted(seed for seed, errors in per_seed.items() if errors is None)
        if missing:
            notes.append(f"{method}: no errors.csv for seed(s) {', '.join(map(str, missing))}; "
                         "significance test skipped")
        else:
            samples[method] = pd.concat({seed: _split_errors(errors, split) for seed, errors in per_seed.items()},
                                        names=["seed"])
    columns = ["method", "reference", "n_seeds", "n_expected", "incomplete", "not_learned", "mre_mean", "mre_std", "ere_mean",
               "ere_std", *[f"sdr_{t}" for t in thresholds]]
    return pd.DataFrame(rows, columns=columns), samples


def _mark_best(table: pd.DataFrame, thresholds: list[str]) -> None:
    """``best_<column>`` flags: lowest MRE/ERE, highest SDR, among complete methods (ties all marked)."""
    complete = ~table["incomplete"]
    for column, lowest in [("mre", True), ("ere", True), *[(f"sdr_{t}", False) for t in thresholds]]:
        values = table[f"{column}_mean" if column in ("mre", "ere") else column].where(complete)
        table[f"best_{column}"] = values.eq(values.min() if lowest else values.max()) & values.notna()


def _test_against_best(table: pd.DataFrame, samples: dict, best_method: str | None, notes: list[str]) -> None:
    """``p_value``, ``n_pairs`` and ``not_different`` of each method against the best-MRE one."""
    table["p_value"], table["n_pairs"], table["not_different"] = math.nan, 0, False
    if best_method is None:
        return
    if best_method not in samples:
        notes.append(f"best-MRE method {best_method} has no per-image errors: significance tests skipped")
        return
    for index, method in table["method"].items():
        if method == best_method or method not in samples:
            continue
        p_value, pairs = _paired_test(samples[best_method], samples[method])
        table.loc[index, ["p_value", "n_pairs"]] = p_value, pairs
        table.loc[index, "not_different"] = bool(p_value >= ALPHA)
        if pairs == 0:
            notes.append(f"{method}: no (seed, image) pairs shared with {best_method}; test skipped")


def _gain_over_control(table: pd.DataFrame, samples: dict, notes: list[str]) -> None:
    """``control``, ``gain_mre`` (row minus control, means over seeds), ``gain_p_value`` and ``gain_n_pairs``
    of each pretrained row: it is read against the same network untrained, never against another family."""
    table["control"] = table["method"].map(control_of)
    table["gain_mre"], table["gain_p_value"], table["gain_n_pairs"] = math.nan, math.nan, 0
    mre = table.set_index("method")["mre_mean"]
    for index, method, control in table[["method", "control"]].itertuples():
        if pd.isna(control) or pd.isna(mre[method]):  # a control, a reference row, or incomplete (noted)
            continue
        if control not in mre.index:
            notes.append(f"{method}: no rows of its control {control}; gain not computed")
            continue
        if pd.isna(mre[control]):
            notes.append(f"{method}: its control {control} is incomplete; gain not computed")
            continue
        table.loc[index, "gain_mre"] = mre[method] - mre[control]
        if method not in samples or control not in samples:
            notes.append(f"{method}: per-image errors missing for it or its control {control}; gain not tested")
            continue
        p_value, pairs = _paired_test(samples[control], samples[method])
        table.loc[index, ["gain_p_value", "gain_n_pairs"]] = p_value, pairs
        if pairs == 0:
            notes.append(f"{method}: no (seed, image) pairs shared with its control {control}; gain not tested")


def _build_table(dataset: str, split: str, shots: str, protocol: str, cell: pd.DataFrame, methods: list[str],
                 reference: pd.DataFrame, expected: int, unit: str, thresholds: list[str],
                 image_errors: dict[str, pd.Series | None]) -> Table:
    notes: list[str] = []
    table, samples = _method_rows(cell, methods, split, expected, thresholds, image_errors, notes)
    _mark_best(table, thresholds)
    best_method = table.loc[table["best_mre"], "method"].iloc[0] if table["best_mre"].any() else None
    _test_against_best(table, samples, best_method, notes)
    _gain_over_control(table, samples, notes)
    if not reference.empty:
        reference_row = {"method": REFERENCE, "reference": True, "incomplete": False,
                         **{f"{metric}_mean": _column(reference, f"{split}_{metric}").iloc[0]
                            for metric in ("mre", "ere")},
                         **{f"sdr_{t}": _column(reference, f"{split}_sdr_{t}").iloc[0] for t in thresholds}}
        table = pd.concat([table, pd.DataFrame([reference_row])], ignore_index=True)
    flags = [column for column in table.columns if column.startswith("best_")] + ["not_different", "reference",
                                                                                  "incomplete"]
    table[flags] = table[flags].fillna(False).astype(bool)
    counts = ["n_seeds", "n_expected", "n_pairs", "gain_n_pairs"]
    table[counts] = table[counts].astype("Int64")
    table.insert(0, "protocol", protocol)
    table.insert(0, "shots", shots)
    table.insert(0, "split", split)
    table.insert(0, "dataset", dataset)
    table.insert(4, "unit", unit)
    table.insert(table.columns.get_loc("control"), "compared_to", best_method)
    return Table(dataset, split, shots, protocol, unit, thresholds, table, best_method, notes)


def build_tables(results: pd.DataFrame, expected_seeds: int | None = None,
                 image_errors: dict[str, pd.Series | None] | None = None) -> list[Table]:
    """Every (dataset, shots, protocol, split) table; a method with rows anywhere in a dataset under a
    protocol appears in each of its tables, so a missing cell shows up as incomplete (0/n) instead of
    vanishing, while a method never run under a protocol (e.g. mean_shape has nothing to probe) is absent.
    ``image_errors``: per run folder, its per-image MRE (default: from the run folders, ``run_image_errors``)."""
    if image_errors is None:
        image_errors = run_image_errors(results)
    tables = []
    for dataset in sorted(results["dataset"].dropna().unique()):
        rows = results[results["dataset"] == dataset]
        runs = rows[rows["method"] != REFERENCE]
        reference = rows[(rows["method"] == REFERENCE) & rows["status"].eq("done")]
        units = set(rows.loc[rows["status"].eq("done"), "unit"].dropna())
        if len(units) > 1:
            raise ValueError(f"dataset {dataset}: rows in several units {sorted(units)}")
        unit = units.pop() if units else ""
        splits = _test_splits(rows[rows["status"].eq("done")])
        for shots in sorted(runs["shots"].unique(), key=shots_sort_key):
            for protocol in protocol_order(runs["protocol"].unique()):
                protocol_runs = runs[runs["protocol"] == protocol]
                cell = protocol_runs[protocol_runs["shots"] == shots]
                if cell.empty:
                    continue
                methods = method_order(protocol_runs["method"].unique())
                expected = expected_seeds or int(cell.groupby("method")["seed"].nunique().max())
                for split in splits:
                    tables.append(_build_table(dataset, split, shots, protocol, cell, methods, reference, expected,
                                               unit, _thresholds(rows, split), image_errors))
    return tables


def _fmt(value: float, std: float = math.nan, digits: int = 2, plus_minus: str = "±") -> str:
    if pd.isna(value):
        return "–"
    return f"{value:.{digits}f}" + ("" if pd.isna(std) else f" {plus_minus} {std:.{digits}f}")


def _fmt_p(p_value: float) -> str:
    if pd.isna(p_value):
        return "–"
    return "p < 0.001" if p_value < 0.001 else f"p = {p_value:.3f}"


def _is_control(method: str) -> bool:
    return family_of(method) is not None and control_of(method) is None


def _gain_cell(row: pd.Series) -> str:
    """``+0.12 (p = 0.034)``; ``control`` on a control's own row; ``–`` where there is no gain and ``untested``
    where there is no p-value (the table's notes say why)."""
    if pd.isna(row["gain_mre"]):
        return "control" if _is_control(row["method"]) else "–"
    tested = "untested" if pd.isna(row["gain_p_value"]) else _fmt_p(row["gain_p_value"])
    return f"{row['gain_mre']:+.2f} ({tested})"


def _cells(row: pd.Series, table: Table, bold: Callable[[str], str], plus_minus: str, dagger: str) -> list[str]:
    """The metric cells of a row, shared by Markdown and LaTeX (which differ in bold, ± and †)."""
    if row["incomplete"]:
        gap = ["–"] * (len(table.thresholds) + 2)
        return [f"incomplete ({row['n_seeds']}/{row['n_expected']})", *gap, f"{row['n_seeds']}/{row['n_expected']}"]

    def mark(text: str, best: bool) -> str:
        return bold(text) if best and not row["reference"] else text

    mre = mark(_fmt(row["mre_mean"], row["mre_std"], plus_minus=plus_minus), row["best_mre"])
    mre += dagger if row["not_different"] else ""
    sdr = [mark(_fmt(row[f"sdr_{t}"], digits=1), row[f"best_sdr_{t}"]) for t in table.thresholds]
    ere = mark(_fmt(row["ere_mean"], row["ere_std"], plus_minus=plus_minus), row["best_ere"])
    seeds = "–" if row["reference"] else str(row["n_seeds"])
    return [mre, *sdr, ere, _gain_cell(row), seeds]


def _method_label(row: pd.Series) -> str:
    if row["reference"]:
        return "inter-observer (reference)"
    return f"{row['method']} (not learned)" if row.get("not_learned") == True else row["method"]  # noqa: E712 (NaN-safe)


def _footnotes(table: Table) -> list[str]:
    notes = ["MRE and ERE: mean ± std (sample std) over seeds of each seed's value; SDR: mean over seeds (%). "
             "Best per column in bold, among complete methods."]
    if table.best_method is not None:
        notes.append(f"{DAGGER}: not significantly different from the best-MRE method ({table.best_method}), "
                     f"{TEST_NAME}, p ≥ {ALPHA}.")
    notes.append(GAIN_NOTE)
    if table.protocol in PROTOCOL_NOTES:
        notes.append(PROTOCOL_NOTES[table.protocol] + ".")
    if table.rows["reference"].any():
        notes.append("inter-observer: the junior doctor scored against the senior doctor; a reference, "
                     "not a method (never marked best, never tested).")
    return notes + table.notes


def _header(table: Table) -> list[str]:
    unit = table.unit or "?"
    return ["Method", f"MRE ({unit})", *[f"SDR {float(t):g} {unit} (%)" for t in table.thresholds],
            f"ERE ({unit})", f"ΔMRE vs control ({unit})", "Seeds"]


def _protocol_groups(tables: list[Table]) -> list[list[Table]]:
    """The tables of one (dataset, split, shots) under each protocol, where the results hold several."""
    groups: dict[tuple[str, str, str], list[Table]] = {}
    for table in tables:
        groups.setdefault((table.dataset, table.split, table.shots), []).append(table)
    return [group for group in groups.values() if len(group) > 1]


def _side_by_side_rows(group: list[Table], bold: Callable[[str], str], plus_minus: str) -> list[list[str]]:
    """A row per method: MRE and gain under each protocol; ``–`` where a method was not run under one."""
    methods = method_order({method for table in group for method in table.rows["method"]})
    rows = []
    for method in methods:
        cells = [method]
        for table in group:
            match = table.rows[table.rows["method"] == method]
            if match.empty:
                cells += ["–", "–"]
            elif (row := match.iloc[0])["incomplete"]:
                cells += [f"incomplete ({row['n_seeds']}/{row['n_expected']})", "–"]
            else:
                mre = _fmt(row["mre_mean"], row["mre_std"], plus_minus=plus_minus)
                cells += [bold(mre) if row["best_mre"] else mre, _gain_cell(row)]
        rows.append(cells)
    return rows


def _side_by_side_notes(group: list[Table]) -> list[str]:
    return ["MRE: mean ± std (sample std) over seeds; best per protocol in bold.", GAIN_NOTE,
            *[PROTOCOL_NOTES[table.protocol] + "." for table in group if table.protocol in PROTOCOL_NOTES],
            "Missing seeds, controls or per-image errors: see the notes of the per-protocol tables."]


def markdown(tables: list[Table]) -> str:
    """The methods' mean ranks across datasets first (where the tables cover several), then the protocols side by
    side (where there are several), then every table in full; the reference row sits last, labelled, below the
    methods."""
    parts = ["# Leaderboard\n", *across_datasets_markdown(rank_across_datasets(tables))]
    for group in _protocol_groups(tables):
        unit = group[0].unit or "?"
        header = ["Method"] + [name for table in group
                               for name in (f"{table.protocol} MRE ({unit})", f"{table.protocol} ΔMRE vs control")]
        lines = [f"## Protocols side by side: {group[0].title} ({group[0].unit})", "",
                 "| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        lines += ["| " + " | ".join(cells) + " |"
                  for cells in _side_by_side_rows(group, lambda text: f"**{text}**", "±")]
        lines += [""] + [f"- {note}" for note in _side_by_side_notes(group)] + [""]
        parts.append("\n".join(lines))
    for table in tables:
        header = _header(table)
        lines = [f"## {table.heading}", "", "| " + " | ".join(header) + " |",
                 "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        for _, row in table.rows.iterrows():
            label = f"*{_method_label(row)}*" if row["reference"] else _method_label(row)
            cells = _cells(row, table, lambda text: f"**{text}**", "±", f" {DAGGER}")
            lines.append("| " + " | ".join([label, *cells]) + " |")
        lines += [""] + [f"- {note}" for note in _footnotes(table)] + [""]
        parts.append("\n".join(lines))
    return "\n".join(parts)


def _latex_escape(text: str) -> str:
    replacements = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                    "±": r"$\pm$", "≥": r"$\geq$", "<": r"$<$", ">": r"$>$", "Δ": r"$\Delta$",
                    DAGGER: r"$^\dagger$"}
    return "".join(replacements.get(char, char) for char in text)


def _latex_cell(cell: str) -> str:
    """A cell built with LaTeX bold and ± already: only its dashes and ``<`` still need LaTeX's form."""
    return cell.replace("–", "--").replace("<", "$<$")


def _latex_label(*parts: str) -> str:
    return r"\label{tab:" + re.sub(r"[^A-Za-z0-9]+", "-", "-".join(parts)) + "}"


def _latex_side_by_side(group: list[Table]) -> str:
    """One table, a column pair (MRE, ΔMRE vs control) per protocol under a spanning protocol header."""
    first, unit = group[0], _latex_escape(group[0].unit or "?")
    caption = (f"{_latex_escape(first.title)}, the protocols side by side: MRE in {unit} (mean $\\pm$ std over "
               f"seeds), best per protocol in bold. " + " ".join(_latex_escape(note) for note in
                                                                   _side_by_side_notes(group)[1:]))
    spans = " & ".join(r"\multicolumn{2}{c}{" + _latex_escape(table.protocol) + "}" for table in group)
    rules = "".join(rf"\cmidrule(lr){{{2 + 2 * i}-{3 + 2 * i}}}" for i in range(len(group)))
    names = " & ".join([f"MRE ({unit}) $\\downarrow$", r"$\Delta$MRE $\downarrow$"] * len(group))
    lines = [r"\begin{table}[t]", r"\centering", r"\caption{" + caption + "}",
             _latex_label(first.dataset, first.split, first.shots, "protocols"),
             r"\begin{tabular}{l" + "c" * 2 * len(group) + "}", r"\toprule", " & " + spans + r" \\", rules,
             "Method & " + names + r" \\", r"\midrule"]
    for cells in _side_by_side_rows(group, lambda text: r"\textbf{" + text + "}", r"$\pm$"):
        lines.append(" & ".join([_latex_escape(cells[0]), *map(_latex_cell, cells[1:])]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines)


def latex(tables: list[Table]) -> str:
    """All tables in a paper's style (booktabs; needs ``\\usepackage{booktabs}``), the protocols side by side
    first where there are several."""
    blocks = [_latex_side_by_side(group) for group in _protocol_groups(tables)]
    for table in tables:
        header = [_latex_escape(name).replace("(\\%)", "(\\%) $\\uparrow$") for name in _header(table)]
        header[1] += r" $\downarrow$"
        header[-3] += r" $\downarrow$"
        header[-2] += r" $\downarrow$"
        best = _latex_escape(table.best_method or "none")
        caption = (f"{_latex_escape(table.title)}, {_latex_escape(table.protocol)} protocol: MRE and ERE in "
                   f"{table.unit} (mean $\\pm$ std over seeds), SDR in "
                   f"\\% (mean over seeds); best in bold. $^\\dagger$: not significantly different from the "
                   f"best-MRE method ({best}), {TEST_NAME}, $p \\geq {ALPHA}$. {_latex_escape(GAIN_NOTE)}")
        if table.protocol in PROTOCOL_NOTES:
            caption += " " + _latex_escape(PROTOCOL_NOTES[table.protocol]) + "."
        if table.rows["reference"].any():
            caption += " Inter-observer: junior doctor against senior doctor, a reference (never marked best)."
        lines = [r"\begin{table}[t]", r"\centering", r"\caption{" + caption + "}",
                 _latex_label(table.dataset, table.split, table.shots, table.protocol),
                 r"\begin{tabular}{l" + "c" * (len(header) - 1) + "}", r"\toprule",
                 " & ".join(header) + r" \\", r"\midrule"]
        for _, row in table.rows.iterrows():
            if row["reference"]:
                lines.append(r"\midrule")
            label_text = _latex_escape(_method_label(row))
            label_text = r"\textit{" + label_text + "}" if row["reference"] else label_text
            cells = _cells(row, table, lambda text: r"\textbf{" + text + "}", r"$\pm$", r"$^\dagger$")
            lines.append(" & ".join([label_text, *map(_latex_cell, cells)]) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}"]
        notes = [_latex_escape(note) for note in table.notes]
        if notes:
            lines += [r"\par\smallskip", r"{\footnotesize " + r" \\ ".join(notes) + r"\par}"]
        lines.append(r"\end{table}")
        blocks.append("\n".join(lines))
    return "% requires \\usepackage{booktabs}\n\n" + "\n\n".join(blocks) + "\n"


def _save_figure(figure: plt.Figure, path: Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)
    atomic_write(path, lambda stream: stream.write(buffer.getvalue()))


def _pooled_split(tables: list[Table]) -> str:
    """The split a figure shows: the pooled ``test`` where there is one, else the last part."""
    return "test" if any(table.split == "test" for table in tables) else tables[-1].split


def plot_against_shots(tables: list[Table], dataset: str, metric: str, path: Path) -> Path | None:
    """``metric`` (mre or ere) of the pooled test split against shots: a line per (method, protocol) with a
    ± std band, a colour per method and a line style per protocol.

    Incomplete cells are gaps, as in the tables; mean_shape is grey and dash-dotted; the inter-observer value
    is a horizontal reference. None if no method has a value (e.g. ERE when every run failed).
    """
    chosen = [table for table in tables if table.dataset == dataset]
    pooled = _pooled_split(chosen)
    frame = pd.concat([table.rows for table in chosen if table.split == pooled], ignore_index=True)
    shots = sorted(frame["shots"].unique(), key=shots_sort_key)
    protocols = protocol_order(frame["protocol"].unique())
    x = np.arange(len(shots))
    methods = frame[~frame["reference"]]
    if methods[f"{metric}_mean"].isna().all():
        return None
    # One colour per method across every dataset's figures.
    colours = {method: f"C{index}" for index, method in enumerate(
        method_order({method for table in tables for method in table.rows["method"]} - {BASELINE}))}
    colours[BASELINE] = "0.3"
    styles = dict(zip(protocols, [("-", "o"), ("--", "s"), (":", "^"), ("-.", "v")]))
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for protocol in protocols:
        for method in method_order(methods.loc[methods["protocol"] == protocol, "method"].unique()):
            chosen_rows = methods[(methods["method"] == method) & (methods["protocol"] == protocol)]
            series = chosen_rows.set_index("shots").reindex(shots)
            mean, std = series[f"{metric}_mean"].to_numpy(float), series[f"{metric}_std"].to_numpy(float)
            if np.isnan(mean).all():
                continue
            linestyle, marker = styles[protocol]
            axis.plot(x, mean, marker=marker, color=colours[method],
                      linestyle="-." if method == BASELINE else linestyle,
                      label=method if len(protocols) == 1 or method == BASELINE else f"{method} ({protocol})")
            axis.fill_between(x, mean - std, mean + std, color=colours[method], alpha=0.15, linewidth=0)
    reference = frame.loc[frame["reference"], f"{metric}_mean"].dropna()
    if not reference.empty:
        axis.axhline(reference.iloc[0], color="black", linestyle=":", label="inter-observer")
    axis.set_xticks(x, shots)
    axis.set_xlabel("annotated training images (shots)")
    axis.set_ylabel(f"{metric.upper()} ({chosen[0].unit})")
    axis.set_title(f"{dataset}: {metric.upper()} on the {pooled} split (mean ± std over seeds)")
    axis.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    axis.grid(alpha=0.3)
    figure.tight_layout()
    _save_figure(figure, path)
    return path


def plot_gains(tables: list[Table], dataset: str, shots: str, path: Path) -> Path | None:
    """Each pretrained method's MRE minus its family's random-init control on the pooled test split: a bar
    per protocol, annotated with the paired test's p-value (``n/a`` where the gain could not be computed).
    None if no method has a control in these tables."""
    chosen = [table for table in tables if table.dataset == dataset and table.shots == shots]
    pooled = _pooled_split(chosen)
    frame = pd.concat([table.rows for table in chosen if table.split == pooled], ignore_index=True)
    frame = frame[frame["control"].notna()]
    if frame.empty:
        return None
    methods = method_order(frame["method"].unique())
    protocols = protocol_order(frame["protocol"].unique())
    width = 0.8 / len(protocols)
    figure, axis = plt.subplots(figsize=(1.1 * len(methods) + 2.5, 4.2))
    for offset, protocol in enumerate(protocols):
        gains = frame[frame["protocol"] == protocol].set_index("method").reindex(methods)
        x = np.arange(len(methods)) + (offset - (len(protocols) - 1) / 2) * width
        values = gains["gain_mre"].to_numpy(float)
        axis.bar(x, np.nan_to_num(values), width, color=f"C{offset}", label=protocol)
        for position, value, p_value in zip(x, values, gains["gain_p_value"].to_numpy(float)):
            text = "n/a" if np.isnan(value) else ("untested" if np.isnan(p_value) else _fmt_p(p_value))
            above = np.isnan(value) or value >= 0
            axis.annotate(text, (position, 0 if np.isnan(value) else value), xytext=(0, 3 if above else -3),
                          textcoords="offset points", ha="center", va="bottom" if above else "top",
                          fontsize=7, rotation=90)
    axis.axhline(0, color="black", linewidth=0.8)
    axis.set_xticks(np.arange(len(methods)), [f"{m}\nvs {control_of(m)}" for m in methods], fontsize=8)
    axis.set_ylabel(f"ΔMRE vs control ({chosen[0].unit})")
    axis.margins(y=0.25)
    shots_label = "all training images" if shots == "all" else f"{shots} shots"
    axis.set_title(f"{dataset}, {shots_label}, {pooled} split: MRE minus its family's random-init control\n"
                   "(mean over seeds; negative = better; two-sided paired Wilcoxon p)", fontsize=9)
    axis.legend(fontsize=8, title="protocol", title_fontsize=8)
    axis.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    _save_figure(figure, path)
    return path


def _overlay_point(results: pd.DataFrame, shots: str | None, seed: int | None) -> tuple[str, int] | None:
    """Shots 10 if present, else the most common; seed 0 if present, else the smallest."""
    done = results[results["status"].eq("done") & (results["method"] != REFERENCE)]
    if done.empty:
        return None
    if shots is None:
        counts = done["shots"].value_counts()
        shots = PREFERRED_OVERLAY_SHOTS if PREFERRED_OVERLAY_SHOTS in counts else \
            min(counts[counts == counts.max()].index, key=shots_sort_key)
    seeds = set(done.loc[done["shots"] == shots, "seed"].dropna().tolist())
    if seed is None:
        seed = 0 if 0 in seeds or not seeds else min(seeds)
    return shots, int(seed)


def plot_overlays(results: pd.DataFrame, path: Path, shots: str | None = None, seed: int | None = None) -> Path | None:
    """Datasets (rows) × methods (columns) of heatmap overlays on one test image (the paper's Figure 1):
    image grey, heatmap inferno, truth green, prediction red; mean_shape shows points only."""
    point = _overlay_point(results, shots, seed)
    if point is None:
        return None
    shots, seed = point
    at_point = results["shots"].eq(shots) & results["seed"].eq(seed).fillna(False)
    chosen = results[results["status"].eq("done") & at_point & (results["method"] != REFERENCE)]
    overlays = {(row.dataset, row.method): Path(row.run_dir) / "overlay.npz" for row in chosen.itertuples()
                if isinstance(row.run_dir, str) and (Path(row.run_dir) / "overlay.npz").is_file()}
    if not overlays:
        return None
    datasets = sorted({dataset for dataset, _ in overlays})
    methods = method_order({method for _, method in overlays})
    figure, axes = plt.subplots(len(datasets), len(methods), figsize=(2.2 * len(methods), 2.5 * len(datasets)),
                                squeeze=False)
    for i, dataset in enumerate(datasets):
        image_ids = set()
        for j, method in enumerate(methods):
            axis = axes[i, j]
            axis.set_xticks([])
            axis.set_yticks([])
            if i == 0:
                axis.set_title(method, fontsize=9)
            if (dataset, method) not in overlays:
                axis.text(0.5, 0.5, "no run", ha="center", va="center", transform=axis.transAxes)
                continue
            with np.load(overlays[dataset, method], allow_pickle=False) as data:
                image_ids.add(str(data["image_id"]))
                axis.imshow(data["image"], cmap="gray", vmin=0, vmax=1)
                if method != BASELINE and "heatmap" in data:
                    axis.imshow(data["heatmap"], cmap="inferno", alpha=0.5, vmin=0, vmax=1)
                for points, colour in ((data["truth"], "lime"), (data["pred"], "red")):
                    axis.scatter(points[:, 0], points[:, 1], s=6, c=colour, linewidths=0)
        if len(image_ids) > 1:
            raise ValueError(f"overlays of {dataset} (shots {shots}, seed {seed}) show different images "
                             f"{sorted(image_ids)}; every method must show the same test image")
        axes[i, 0].set_ylabel(f"{dataset}\n{image_ids.pop()}", fontsize=9)
    figure.suptitle(f"shots {shots}, seed {seed}: truth green, prediction red", fontsize=10)
    figure.tight_layout()
    _save_figure(figure, path)
    return path


def rank_across_datasets(tables: list[Table]) -> pd.DataFrame:
    """Per (protocol, shots) that several datasets have: each method's MRE on each dataset's pooled test split (mean
    and std over seeds), its rank there (1 = lowest MRE among the complete methods, ties share their mean rank),
    and its mean rank over the datasets, only where it is ranked on every one of them.

    MREs of different datasets are in different units and scales, ranks are not: they are what can be averaged."""
    columns = ["protocol", "shots", "method", "dataset", "split", "unit", "mre_mean", "mre_std", "rank"]
    protocols = protocol_order({table.protocol for table in tables})
    cells = sorted({(table.protocol, table.shots) for table in tables},
                   key=lambda cell: (protocols.index(cell[0]), shots_sort_key(cell[1])))
    rows = []
    for protocol, shots in cells:
        chosen = [table for table in tables if table.protocol == protocol and table.shots == shots]
        datasets = sorted({table.dataset for table in chosen})
        if len(datasets) < 2:
            continue
        for dataset in datasets:
            of_dataset = [table for table in chosen if table.dataset == dataset]
            table = next(table for table in of_dataset if table.split == _pooled_split(of_dataset))
            methods = table.rows[~table.rows["reference"]]
            ranks = methods["mre_mean"].rank(method="average")
            rows.extend({"protocol": protocol, "shots": shots, "method": row.method, "dataset": dataset,
                         "split": table.split, "unit": table.unit, "mre_mean": row.mre_mean, "mre_std": row.mre_std,
                         "rank": rank} for row, rank in zip(methods.itertuples(), ranks))
    frame = pd.DataFrame(rows, columns=columns)
    ranked = frame.groupby(["protocol", "shots", "method"])["rank"]
    everywhere = ranked.transform("count") == frame.groupby(["protocol", "shots"])["dataset"].transform("nunique")
    frame["mean_rank"] = ranked.transform("mean").where(everywhere)
    return frame


def across_datasets_markdown(ranks: pd.DataFrame) -> list[str]:
    """A section per (protocol, shots) of ``rank_across_datasets``: methods by mean rank, each dataset's MRE with
    the method's rank there."""
    parts = []
    for (protocol, shots), cell in ranks.groupby(["protocol", "shots"], sort=False):
        datasets = list(dict.fromkeys(cell["dataset"]))
        units = cell.groupby("dataset")["unit"].first()
        mean_rank = cell.groupby("method")["mean_rank"].first()
        order = method_order(cell["method"])
        methods = sorted(order, key=lambda method: (mean_rank.fillna(math.inf)[method], order.index(method)))
        header = ["Method", "Mean rank", *[f"{dataset} MRE ({units[dataset] or '?'})" for dataset in datasets]]
        shots_label = "all training images" if shots == "all" else f"{shots} shots"
        lines = [f"## Across datasets: {protocol}, {shots_label}", "", "| " + " | ".join(header) + " |",
                 "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        for method in methods:
            mine = cell[cell["method"] == method].set_index("dataset")
            cells = [method, _fmt(mean_rank[method])]
            for dataset in datasets:
                row = mine.loc[dataset] if dataset in mine.index else None
                ranked = row is not None and pd.notna(row["rank"])
                cells.append(f"{_fmt(row['mre_mean'], row['mre_std'])} ({row['rank']:g})" if ranked else "–")
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "- MRE: mean ± std (sample std) over seeds on each dataset's test split (pooled where it has "
                  "several), the method's rank there in brackets (1 = lowest MRE among the complete methods; ties "
                  "share their mean rank). Mean rank: over the datasets, for a method ranked on every one of them.",
                  "- –: no complete result on that dataset (see its table).", ""]
        parts.append("\n".join(lines))
    return parts


def _cross_order(table: pd.DataFrame) -> list[int]:
    """Rows by shots, method and protocol order, then trained-on dataset, its own test split first."""
    methods, protocols = method_order(table["method"]), protocol_order(table["protocol"])
    keys = [(shots_sort_key(shots), methods.index(method), protocols.index(protocol), trained, evaluated != trained,
             evaluated) for shots, method, protocol, trained, evaluated
            in table[["shots", "method", "protocol", "dataset", "eval_dataset"]].itertuples(index=False)]
    return sorted(range(len(keys)), key=keys.__getitem__)


def generalisation_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (shots, method, protocol, trained-on, evaluated-on) of the sweep's per-run cross-dataset scores:
    MRE mean and sample std over seeds; a cell with fewer seeds than the most any cell of its shots has is
    incomplete, never averaged over the seeds that happened to finish."""
    runs = runs.assign(shots=runs["shots"].map(_normalise_shots))
    table = runs.groupby(["shots", "method", "protocol", "dataset", "eval_dataset"], sort=False).agg(
        split=("split", "first"), unit=("unit", "first"), n_seeds=("seed", "nunique"), mre_mean=("mre", "mean"),
        mre_std=("mre", "std")).reset_index()
    table["n_expected"] = table.groupby("shots")["n_seeds"].transform("max")
    table["incomplete"] = table["n_seeds"] < table["n_expected"]
    table.loc[table["incomplete"], ["mre_mean", "mre_std"]] = math.nan
    table = table.iloc[_cross_order(table)].reset_index(drop=True)
    columns = ["shots", "method", "protocol", "dataset", "eval_dataset", "split", "unit", "n_seeds", "n_expected",
               "incomplete", "mre_mean", "mre_std"]
    return table[columns].rename(columns={"dataset": "trained_on", "eval_dataset": "evaluated_on"})


def generalisation_markdown(table: pd.DataFrame) -> str:
    """A table per shots: a row per (method, protocol), a column per trained-on → evaluated-on pair."""
    parts = ["# Generalisation across datasets\n"]
    for shots, cell in table.groupby("shots", sort=False):
        pairs = list(dict.fromkeys(zip(cell["trained_on"], cell["evaluated_on"])))
        units = cell.groupby(["trained_on", "evaluated_on"])["unit"].first()
        header = ["Method", "Protocol", *[f"{trained} → {evaluated} ({units[trained, evaluated]})"
                                          for trained, evaluated in pairs]]
        shots_label = "all training images" if shots == "all" else f"{shots} shots"
        lines = [f"## {shots_label}: MRE", "", "| " + " | ".join(header) + " |",
                 "|" + "|".join(["---", "---"] + ["---:"] * len(pairs)) + "|"]
        for (method, protocol), rows in cell.groupby(["method", "protocol"], sort=False):
            by_pair = rows.set_index(["trained_on", "evaluated_on"])
            cells = [method, protocol]
            for pair in pairs:
                row = by_pair.loc[pair] if pair in by_pair.index else None
                cells.append("–" if row is None else f"incomplete ({row['n_seeds']}/{row['n_expected']})"
                             if row["incomplete"] else _fmt(row["mre_mean"], row["mre_std"]))
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "- MRE on the evaluated-on dataset's test split (pooled where it has several), mean ± std "
                  "(sample std) over seeds. A → A is the run's own test score; A → B its detector applied to B by "
                  "`landmark-bench predict`. Reference rows without a detector (mean_shape) are not scored.", ""]
        parts.append("\n".join(lines))
    return "\n".join(parts)


def build_generalisation(runs_csv: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Write ``generalisation.md`` and ``generalisation.csv`` (the table, tidy) into ``out_dir`` from a sweep's
    per-run cross-dataset scores; returns their paths by name."""
    runs = pd.read_csv(runs_csv, dtype={"method": str, "protocol": str, "dataset": str, "eval_dataset": str,
                                        "shots": str, "split": str, "unit": str})
    table = generalisation_table(runs)
    paths = {"generalisation_markdown": Path(out_dir) / "generalisation.md",
             "generalisation_csv": Path(out_dir) / "generalisation.csv"}
    atomic_write_text(paths["generalisation_markdown"], generalisation_markdown(table))
    write_csv(paths["generalisation_csv"], table)
    return paths


def tidy(tables: list[Table]) -> pd.DataFrame:
    """One row per (dataset, split, shots, protocol, method); SDR columns of every dataset's thresholds side by side
    (empty where a dataset has other thresholds), each in threshold order."""
    if not tables:
        return pd.DataFrame()
    frame = pd.concat([table.rows for table in tables], ignore_index=True)
    thresholds = sorted({t for table in tables for t in table.thresholds}, key=float)
    sdr = [f"sdr_{t}" for t in thresholds]
    best = ["best_mre", "best_ere", *[f"best_{column}" for column in sdr]]
    leading = list(frame.columns[:frame.columns.get_loc("ere_std") + 1])
    return frame[leading + sdr + best + [c for c in frame.columns if c not in {*leading, *sdr, *best}]]


def build_leaderboard(results_csv: str | Path | list[str | Path], out_dir: str | Path,
                      expected_seeds: int | None = None, overlay_shots: str | None = None,
                      overlay_seed: int | None = None) -> dict[str, Path]:
    """Write ``leaderboard.md``, ``leaderboard.tex``, ``leaderboard.csv`` and the figures into ``out_dir``, from one
    ``results.csv`` or several read as one (``read_results``).

    ``expected_seeds`` defaults to the most seeds any method has rows for in a (dataset, shots) cell.
    ``per_image_mre.csv`` beside a ``results.csv`` stands in for run folders that are gone (their paired tests), and
    the one written here holds every run's per-image MRE, so that committed results regenerate whole.
    Returns the written paths by name (``markdown``, ``latex``, ``csv``, ``per_image``, ``across_datasets`` (the mean
    ranks, where the results cover several datasets), ``mre_vs_shots_<dataset>``, ``ere_vs_shots_<dataset>``,
    ``gain_vs_control_<dataset>_<shots>shots``, ``overlays``); a figure with nothing to show is not written.
    """
    out_dir = Path(out_dir)
    sources = results_csv if isinstance(results_csv, list) else [results_csv]
    results = read_results(*sources)
    image_errors = run_image_errors(results, read_stored_per_image(*sources))
    tables = build_tables(results, expected_seeds, image_errors)
    paths = {"markdown": out_dir / "leaderboard.md", "latex": out_dir / "leaderboard.tex",
             "csv": out_dir / "leaderboard.csv"}
    atomic_write_text(paths["markdown"], markdown(tables))
    atomic_write_text(paths["latex"], latex(tables))
    write_csv(paths["csv"], tidy(tables))
    if not (per_image := per_image_frame(results, image_errors)).empty:
        paths["per_image"] = out_dir / PER_IMAGE_CSV
        write_csv(paths["per_image"], per_image)
    if not (ranks := rank_across_datasets(tables)).empty:
        paths["across_datasets"] = out_dir / "across_datasets.csv"
        write_csv(paths["across_datasets"], ranks)
    for dataset in sorted({table.dataset for table in tables}):
        for metric in ("mre", "ere"):
            name = f"{metric}_vs_shots_{dataset}"
            if (written := plot_against_shots(tables, dataset, metric, out_dir / f"{name}.png")) is not None:
                paths[name] = written
        for shots in sorted({table.shots for table in tables if table.dataset == dataset}, key=shots_sort_key):
            name = f"gain_vs_control_{dataset}_{shots}shots"
            if (written := plot_gains(tables, dataset, shots, out_dir / f"{name}.png")) is not None:
                paths[name] = written
    if (written := plot_overlays(results, out_dir / "overlays.png", overlay_shots, overlay_seed)) is not None:
        paths["overlays"] = written
    return paths


def _run_samples(rows: pd.DataFrame, split: str, image_errors: dict[str, pd.Series | None]) -> pd.Series | None:
    """Per-image MRE of ``split`` over the done runs in ``rows``, indexed by (seed, split, image_id);
    ``image_errors`` as from ``run_image_errors``."""
    parts = {}
    for seed, run_dir in rows[["seed", "run_dir"]].itertuples(index=False):
        if (errors := image_errors.get(run_dir)) is None:
            return None
        parts[int(seed)] = _split_errors(errors, split)
    return pd.concat(parts, names=["seed"]) if parts else None


def ablation_markdown(base_sweep: str | Path, variant_sweep: str | Path, method: str, split: str = "test") -> str:
    """One method in two sweeps that differ by one setting: per (dataset, shots, protocol) its MRE in each (means
    over the seeds both have), the difference and a paired Wilcoxon p-value over (seed, image), next to the
    base sweep's control of the method's family. The sweeps' ``--set`` overrides name the difference. Per-image
    errors come from the run folders or, where those are gone, from a ``per_image_mre.csv`` beside the results."""
    sweeps = {"base": Path(base_sweep), "variant": Path(variant_sweep)}
    frames = {name: read_results(path / "results.csv") for name, path in sweeps.items()}
    image_errors = {name: run_image_errors(frames[name], read_stored_per_image(path / "results.csv"))
                    for name, path in sweeps.items()}
    overrides = {name: json.loads((path / "sweep.json").read_text()).get("overrides", {})
                 for name, path in sweeps.items()}
    control = control_of(method)
    lines = [f"# Ablation: `{method}`, {split} split", "",
             *(f"- {name}: `{sweeps[name]}`, settings `{overrides[name] or 'preset defaults'}`" for name in sweeps), "",
             f"| dataset | shots | protocol | seeds | control {control} | base | variant | variant − base | p | pairs |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    column = f"{split}_mre"
    done = {name: frame[frame["status"].eq("done")] for name, frame in frames.items()}
    keys = ["dataset", "shots", "protocol"]
    cells = done["variant"][done["variant"]["method"].eq(method)][keys].drop_duplicates().itertuples(index=False)
    for dataset, shots, protocol in sorted(cells):
        def rows(name: str, of: str = method) -> pd.DataFrame:
            frame = done[name]
            return frame[(frame["method"] == of) & (frame["dataset"] == dataset) & (frame["shots"] == shots)
                         & (frame["protocol"] == protocol)]
        seeds = sorted(set(rows("base")["seed"]) & set(rows("variant")["seed"]))
        base, variant = (rows(name)[rows(name)["seed"].isin(seeds)] for name in sweeps)
        reference = rows("base", control) if control else pd.DataFrame()
        reference = reference[reference["seed"].isin(seeds)] if len(reference) else reference
        p_value, pairs = math.nan, 0
        if seeds and (base_samples := _run_samples(base, split, image_errors["base"])) is not None and (
                variant_samples := _run_samples(variant, split, image_errors["variant"])) is not None:
            p_value, pairs = _paired_test(base_samples, variant_samples)
        cells_text = [_fmt(frame[column].mean(), frame[column].std()) if len(frame) == len(seeds) and seeds else "–"
                      for frame in (reference, base, variant)]
        difference = variant[column].mean() - base[column].mean() if seeds else math.nan
        lines.append(f"| {dataset} | {shots} | {protocol} | {' '.join(map(str, seeds)) or '–'} | "
                     f"{' | '.join(cells_text)} | {_fmt(difference)} | {_fmt_p(p_value)} | {pairs} |")
    lines += ["", f"MRE in the runs' unit, mean ± std over seeds; p: {TEST_NAME}."]
    return "\n".join(lines) + "\n"
