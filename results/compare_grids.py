"""Run-by-run comparison of two grids of the same settings: how many runs they share give the same test MRE (the
float stored in results.csv, exactly), and the others side by side."""

from __future__ import annotations

import argparse

import pandas as pd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results_a", help="results.csv of one grid")
    parser.add_argument("results_b", help="results.csv of the other")
    args = parser.parse_args()
    a, b = (pd.read_csv(path) for path in (args.results_a, args.results_b))
    # a sweep of several datasets or shot counts is compared with the rows of the other grid it shares
    keys = ["method", "protocol", *(key for key in ("dataset", "shots") if key in a and key in b), "seed"]
    both = a.merge(b, on=keys, suffixes=("_a", "_b"))
    both = both[both.method != "inter_observer"]
    same = both.test_mre_a == both.test_mre_b
    print(f"{int(same.sum())} of {len(both)} runs give the same test MRE")
    print(both.loc[~same, [*keys, "test_mre_a", "test_mre_b"]].round(3).to_string(index=False))


if __name__ == "__main__":
    main()
