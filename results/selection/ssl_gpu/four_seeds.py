"""The tables of a selection run with several pretraining seeds per setting (`python four_seeds.py PARTS_DIR`, the
`parts/` folder of ssl_sel.py): one row per pretraining, then per setting the means P (probe) and F (fine-tune) of
its pretrainings' mean validation MRE and L, how many of them are learned, with the rule of ssl.md ("MoCo with four
pretraining seeds per setting") applied against the setting named by BASELINE (default A_preset)."""
import json, os, statistics, sys
from collections import defaultdict
from pathlib import Path

PROBE_TOLERANCE_MM = 0.5
FINETUNE_TOLERANCE_MM = 0.1


def main(parts: Path, baseline: str) -> None:
    jobs = [json.loads(path.read_text()) for path in sorted(parts.glob("*.json"))]
    by_setting = defaultdict(list)
    print("| pretraining | final loss / chance | learned | probe val MRE (seeds 0-2) | fine-tune val MRE | minutes |")
    print("|---|---|---|---|---|---|")
    for job in jobs:
        if "error" in job or len(job.get("finetune_val_mre", [])) < 3:
            print(f"| {job['name']} | incomplete or failed | | | | |")
            continue
        health = job["health"]
        probe, finetune = statistics.mean(job["probe_val_mre"]), statistics.mean(job["finetune_val_mre"])
        print(f"| {job['name']} | {health['final_loss']:.3f} / {health['chance_loss']:.3f} "
              f"({health['final_loss'] / health['chance_loss']:.0%}) | {'yes' if health['learned'] else 'no'} "
              f"| {probe:.2f} ({', '.join(f'{v:.2f}' for v in job['probe_val_mre'])}) "
              f"| {finetune:.2f} ({', '.join(f'{v:.2f}' for v in job['finetune_val_mre'])}) "
              f"| {job['seconds'] / 60:.1f} |")
        by_setting[job["name"].partition("@")[0]].append((probe, finetune, health["learned"]))
    summary = {name: (statistics.mean(p for p, _, _ in runs), statistics.mean(f for _, f, _ in runs),
                      sum(learned for _, _, learned in runs), len(runs))
               for name, runs in by_setting.items()}
    print("\n| setting | P (mm) | F (mm) | L | qualifies |")
    print("|---|---|---|---|---|")
    base_p, base_f, _, _ = summary[baseline]
    qualifying = []
    for name, (p, f, learned, n) in summary.items():
        verdict = "(baseline)"
        if name != baseline:
            ok = learned == n and p <= base_p + PROBE_TOLERANCE_MM and f <= base_f + FINETUNE_TOLERANCE_MM
            verdict = "yes" if ok else "no"
            if ok:
                qualifying.append((p, name))
        print(f"| {name} | {p:.2f} | {f:.2f} | {learned}/{n} | {verdict} |")
    print("\nwinner:", min(qualifying)[1] if qualifying else f"none ({baseline} stays)")


if __name__ == "__main__":
    main(Path(sys.argv[1]), os.environ.get("BASELINE", "A_preset"))
