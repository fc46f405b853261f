"""DINO selection on the device: each configuration's `cpu` preset pretraining (on the GPU), its health, and the
probe on ISBI 2015 validation (10 shots, seeds 0-2), in parallel processes; every image from the carried cache."""
import json, os, pickle, sys, time, traceback
from multiprocessing import get_context
from pathlib import Path

SEL = Path(".whl/sel").resolve()  # prep.py's output
DATA = "/data-not-here/data"
OUT = Path(os.environ.get("OUT", "/tmp/out"))
WORK = Path("/tmp/dsel")
PARTS = WORK / "parts"
LONG = {"pretrain.dino.max_steps": 1200, "pretrain.dino.warmup_steps": 120}
WIDE = {"pretrain.dino.views.global_scale": [0.6, 1.0]}
CONFIGS = {
    "A_preset": {},
    "B_1200": LONG,
    "C_2400": {"pretrain.dino.max_steps": 2400, "pretrain.dino.warmup_steps": 240},
    "D_lr3e-3": {"pretrain.dino.lr": 3e-3},
    "E_lr3e-3_1200": {"pretrain.dino.lr": 3e-3, **LONG},
    "F_scale0.6": WIDE,
    "G_scale0.6_1200": {**WIDE, **LONG},
    "H_m0.99_1200": {"pretrain.dino.base_momentum": 0.99, **LONG},
    "I_koleo0": {"pretrain.dino.koleo_weight": 0.0},
    "J_batch64": {"pretrain.dino.batch_size": 64},
    "K_student0.05": {"pretrain.dino.student_temp": 0.05},
    "L_lr3e-3_scale0.6_1200": {"pretrain.dino.lr": 3e-3, **WIDE, **LONG},
}
SEEDS = (0, 1, 2)
ACC = os.environ.get("ACC", "gpu")
# SMOKE=1: a few steps of everything, to test this script on a CPU
SMOKE = {"pretrain.dino.max_steps": 3, "pretrain.dino.warmup_steps": 1} if os.environ.get("SMOKE") else {}
PROBE = {"finetune.max_steps": 3, "finetune.val_every": 3} if SMOKE else None


def patch_readers():
    os.environ["LANDMARK_BENCH_CACHE"] = str(SEL / "cache")
    readers = pickle.loads((SEL / "readers.pkl").read_bytes())
    import landmark_bench.data.datamodule as datamodule
    datamodule.get_reader = lambda name, data_dir=None, **options: readers[name]


def probe(method, pretrained, name, seed):
    from landmark_bench.finetune import finetune
    record = finetune(method=method, dataset="isbi2015", shots=10, seed=seed, preset="cpu", data_dir=DATA,
                      out=WORK / name / f"probe-s{seed}", pretrained=pretrained, accelerator=ACC, protocol="probe", overrides=PROBE)
    return record["best_val_mre"]


def job(name):
    import logging, torch
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    patch_readers()
    PARTS.mkdir(parents=True, exist_ok=True)
    result = {"name": name, "overrides": CONFIGS.get(name, {})}
    start = time.time()
    try:
        if name == "scratch":
            result["probe_val_mre"] = [probe("scratch", None, name, seed) for seed in SEEDS]
        else:
            from landmark_bench.pretrain import pretrain
            pretrain(method="dino", preset="cpu", data_dir=DATA, out=WORK / name / "pretrain", accelerator=ACC,
                     overrides={**CONFIGS[name], **SMOKE})
            result["health"] = json.loads((WORK / name / "pretrain" / "health.json").read_text())
            result["pretrain_seconds"] = time.time() - start
            (PARTS / f"{name}.json").write_text(json.dumps(result, indent=1))
            ckpt = str(WORK / name / "pretrain" / "pretrained.ckpt")
            result["probe_val_mre"] = []
            for seed in SEEDS:
                result["probe_val_mre"].append(probe("dino", ckpt, name, seed))
                (PARTS / f"{name}.json").write_text(json.dumps(result, indent=1))
    except Exception:
        result["error"] = traceback.format_exc()
    result["seconds"] = time.time() - start
    (PARTS / f"{name}.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    names = sys.argv[1:] or ["scratch", *CONFIGS]
    with get_context("spawn").Pool(len(names)) as pool:
        for result in pool.imap_unordered(job, names):
            health = result.get("health", {})
            print(result["name"], f"{result['seconds']:.0f}s", health.get("summary", ""), "probe",
                  result.get("probe_val_mre"), "ERROR" if "error" in result else "", flush=True)
            if "error" in result:
                print(result["error"][-1500:], flush=True)
