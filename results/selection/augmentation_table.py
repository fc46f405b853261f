"""The validation table of the augmentation selection: per candidate sweep (its ``--set`` of
``finetune.augment_strength`` / ``finetune.augment_noise``) and method, the validation MRE clean and under each
perturbation, from ``landmark-bench robustness SWEEP --split val --out SWEEP/robust_val.md``. Validation only.

    .venv/bin/python results/selection/augmentation_table.py sweeps/sel-augment-*

Rule (fixed before the runs): each method's mean over the clean and every perturbed validation MRE (each condition
weighing the same), divided by the same under the first sweep given (the preset's augmentation), so that every
method weighs the same whatever its error scale; the candidate with the lowest mean of that ratio over the methods
is chosen. The same rule is also applied to each network family's methods alone (the encoder detectors, the UNet
detector), which is how each family got its own augmentation.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

from landmark_bench.methods import family_of


def candidate(sweep: Path) -> str:
    """The augmentation a sweep's fine-tunes ran with, as their run folders recorded it."""
    configs = [json.loads(path.read_text())["finetune"] for path in sorted((sweep / "runs").glob("*/config.json"))]
    found = sorted({(config["augment_strength"], config["augment_noise"]) for config in configs})
    if len(found) != 1:
        raise ValueError(f"{sweep}: its runs trained with different augmentations {found}; one candidate a sweep")
    strength, noise = found[0]
    return f"strength {strength:g}, noise {noise:g}"


def per_method(sweep: Path) -> pd.DataFrame:
    """Rows method, columns clean and each perturbation: validation MRE, means over run and perturbation seeds."""
    rows = pd.read_csv(sweep / "robust_val.csv")
    if set(rows.split) != {"val"}:
        raise ValueError(f"{sweep / 'robust_val.csv'} holds splits {sorted(set(rows.split))}, not only val")
    per_run = rows.groupby(["method", "seed", "perturbation"]).mre.mean()
    return per_run.groupby(["method", "perturbation"]).mean().unstack("perturbation")


def main(sweeps: list[str]) -> None:
    tables = {candidate(Path(sweep)): per_method(Path(sweep)) for sweep in sweeps}
    conditions = ["clean", *[column for column in next(iter(tables.values())).columns if column != "clean"]]
    print("| candidate | method | " + " | ".join(conditions) + " | mean |")
    print("|---|---|" + "---:|" * (len(conditions) + 1))
    reference = next(iter(tables.values()))[conditions].mean(axis=1)
    scores = {}
    for name, table in tables.items():
        for method, values in table[conditions].iterrows():
            print(f"| {name} | {method} | " + " | ".join(f"{value:.2f}" for value in values)
                  + f" | {values.mean():.2f} |")
        scores[name] = table[conditions].mean(axis=1) / reference
    families = {method: family_of(method) for method in reference.index}
    for group in [None, *sorted(set(families.values()))]:
        methods = [method for method, family in families.items() if group in (None, family)]
        print(f"\n{'every method' if group is None else f'{group} family'} ({', '.join(methods)}):")
        group_scores = {name: ratios[methods].mean() for name, ratios in scores.items()}
        for name, score in sorted(group_scores.items(), key=lambda item: item[1]):
            print(f"- {name}: mean over methods of the mean over conditions, relative to the first: {score:.3f}")
        print(f"chosen: {min(group_scores, key=group_scores.get)}")


if __name__ == "__main__":
    main(sys.argv[1:])
