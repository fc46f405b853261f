"""Paired Wilcoxon test between two methods of one committed grid, from its per_image_mre.csv.

The leaderboard tests every row against its family's control and the best row; this answers the
other questions a reading asks (e.g. ddpm against cdpm_align), over the same (seed, test image) pairs.
The median and the share of pairs tell where a mean difference comes from a few large errors.

    python results/pairwise_wilcoxon.py results/isbi2015/whole80/10shot/per_image_mre.csv ddpm cdpm_align
"""

import argparse

import pandas as pd
from scipy.stats import wilcoxon

TEST_SPLITS = ("test1", "test2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("per_image_csv")
    parser.add_argument("method_a")
    parser.add_argument("method_b")
    args = parser.parse_args()
    table = pd.read_csv(args.per_image_csv)
    table = table[table["split"].isin(TEST_SPLITS)]
    for protocol in sorted(table["protocol"].unique()):
        rows = table[table["protocol"] == protocol]
        pair = [
            rows[rows["method"] == method].set_index(["shots", "seed", "split", "image_id"])["mre"]
            for method in (args.method_a, args.method_b)
        ]
        a, b = pair[0].align(pair[1], join="inner")
        if a.empty:
            continue
        difference = a - b
        print(
            f"{protocol}: {args.method_a} - {args.method_b} = {difference.mean():+.3f} mm mean, "
            f"{difference.median():+.3f} mm median over {len(a)} (shots, seed, image) pairs; "
            f"{args.method_a} lower on {(difference < 0).mean():.0%}; Wilcoxon p = {wilcoxon(a, b).pvalue:.3g}"
        )


if __name__ == "__main__":
    main()
