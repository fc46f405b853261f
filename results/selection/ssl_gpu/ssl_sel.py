"""SSL selection on the device (`python ssl_sel.py METHOD [CONFIG ...]`, METHOD dino or moco): each configuration's
`cpu` preset pretraining (on the GPU), its health, and the probe on ISBI 2015 validation (10 shots, seeds 0-2), in
parallel processes; every image from the carried cache. A job named `CONFIG@sN` pretrains with seed N (0 otherwise);
PRETRAIN_SEEDS="1 2 3" runs every named configuration at each of those seeds; FINETUNE=1 also fine-tunes each
pretraining on the same validation grid; PROCESSES caps the jobs at once (all of them otherwise)."""
import json, os, pickle, sys, time, traceback
from multiprocessing import get_context
from pathlib import Path

SEL = Path(".whl/sel").resolve()  # prep.py's output
DATA = "/data-not-here/data"
OUT = Path(os.environ.get("OUT", "/tmp/out"))
WORK = Path("/tmp/dsel")
PARTS = WORK / "parts"
DINO_LONG = {"pretrain.dino.max_steps": 1200, "pretrain.dino.warmup_steps": 120}
DINO_WIDE = {"pretrain.dino.views.global_scale": [0.6, 1.0]}
MOCO_420 = {"pretrain.moco.max_steps": 420, "pretrain.moco.warmup_steps": 42}
CONFIGS = {
    "dino": {  # 2026-12-04, the preset then: 600 steps, global crops 40-100%
        "A_preset": {},
        "B_1200": DINO_LONG,
        "C_2400": {"pretrain.dino.max_steps": 2400, "pretrain.dino.warmup_steps": 240},
        "D_lr3e-3": {"pretrain.dino.lr": 3e-3},
        "E_lr3e-3_1200": {"pretrain.dino.lr": 3e-3, **DINO_LONG},
        "F_scale0.6": DINO_WIDE,
        "G_scale0.6_1200": {**DINO_WIDE, **DINO_LONG},
        "H_m0.99_1200": {"pretrain.dino.base_momentum": 0.99, **DINO_LONG},
        "I_koleo0": {"pretrain.dino.koleo_weight": 0.0},
        "J_batch64": {"pretrain.dino.batch_size": 64},
        "K_student0.05": {"pretrain.dino.student_temp": 0.05},
        "L_lr3e-3_scale0.6_1200": {"pretrain.dino.lr": 3e-3, **DINO_WIDE, **DINO_LONG},
    },
    "moco": {  # 2026-12-04, the preset then: 280 steps, lr 1e-3, temperature 0.2, momentum from 0.9, crops 40-100%
        "A_preset": {},
        "B_420": MOCO_420,
        "C_lr3e-3": {"pretrain.moco.lr": 3e-3},
        "D_temp0.1": {"pretrain.moco.temperature": 0.1},
        "E_temp0.1_lr3e-3": {"pretrain.moco.temperature": 0.1, "pretrain.moco.lr": 3e-3},
        "F_m0.99": {"pretrain.moco.base_momentum": 0.99},
        "G_scale0.6": {"pretrain.moco.views.scale": [0.6, 1.0]},
        "H_scale0.2": {"pretrain.moco.views.scale": [0.2, 1.0]},
        "I_batch64_140": {"pretrain.moco.batch_size": 64, "pretrain.moco.max_steps": 140,
                          "pretrain.moco.warmup_steps": 14},
        "J_lr3e-3_420": {"pretrain.moco.lr": 3e-3, **MOCO_420},
        "K_temp0.1_420": {"pretrain.moco.temperature": 0.1, **MOCO_420},
        "L_heads4096": {"pretrain.moco.projection_hidden_dim": 4096, "pretrain.moco.prediction_hidden_dim": 4096},
        "M_560": {"pretrain.moco.max_steps": 560, "pretrain.moco.warmup_steps": 56},
    },
}
# the moco settings are changes from the preset of their runs, which the `cpu` preset left on 2026-12-05 (temperature
# 0.1 and lr 3e-3 since): pinned here, so that every name still runs what it ran then
MOCO_PRESET_THEN = {"pretrain.moco.lr": 1e-3, "pretrain.moco.temperature": 0.2}
CONFIGS["moco"] = {name: {**MOCO_PRESET_THEN, **changes} for name, changes in CONFIGS["moco"].items()}
METHOD = sys.argv[1] if len(sys.argv) > 1 else "dino"
SEEDS = (0, 1, 2)
ACC = os.environ.get("ACC", "gpu")
# SMOKE=1: a few steps of everything, to test this script on a CPU
SMOKE = {f"pretrain.{METHOD}.max_steps": 3, f"pretrain.{METHOD}.warmup_steps": 1} if os.environ.get("SMOKE") else {}
PROBE = {"finetune.max_steps": 3, "finetune.val_every": 3} if SMOKE else None
FINETUNE = bool(os.environ.get("FINETUNE"))


def patch_readers():
    os.environ["LANDMARK_BENCH_CACHE"] = str(SEL / "cache")
    readers = pickle.loads((SEL / "readers.pkl").read_bytes())
    import landmark_bench.data.datamodule as datamodule
    datamodule.get_reader = lambda name, data_dir=None, **options: readers[name]


def probe(method, pretrained, name, seed, protocol="probe"):
    from landmark_bench.finetune import finetune
    record = finetune(method=method, dataset="isbi2015", shots=10, seed=seed, preset="cpu", data_dir=DATA,
                      out=WORK / name / f"{protocol}-s{seed}", pretrained=pretrained, accelerator=ACC,
                      protocol=protocol, overrides=PROBE)
    return record["best_val_mre"]


def job(name):
    import logging, torch
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    patch_readers()
    PARTS.mkdir(parents=True, exist_ok=True)
    config, _, pretrain_seed = name.partition("@s")
    result = {"name": name, "overrides": CONFIGS[METHOD].get(config, {}), "pretrain_seed": int(pretrain_seed or 0)}
    start = time.time()
    try:
        if config == "scratch":
            result["probe_val_mre"] = [probe("scratch", None, name, seed) for seed in SEEDS]
        else:
            from landmark_bench.pretrain import pretrain
            pretrain(method=METHOD, preset="cpu", data_dir=DATA, out=WORK / name / "pretrain", accelerator=ACC,
                     overrides={**CONFIGS[METHOD][config], **SMOKE}, seed=result["pretrain_seed"])
            result["health"] = json.loads((WORK / name / "pretrain" / "health.json").read_text())
            result["pretrain_seconds"] = time.time() - start
            (PARTS / f"{name}.json").write_text(json.dumps(result, indent=1))
            ckpt = str(WORK / name / "pretrain" / "pretrained.ckpt")
            result["probe_val_mre"] = []
            for seed in SEEDS:
                result["probe_val_mre"].append(probe(METHOD, ckpt, name, seed))
                (PARTS / f"{name}.json").write_text(json.dumps(result, indent=1))
            if FINETUNE:
                result["finetune_val_mre"] = []
                for seed in SEEDS:
                    result["finetune_val_mre"].append(probe(METHOD, ckpt, name, seed, protocol="finetune"))
                    (PARTS / f"{name}.json").write_text(json.dumps(result, indent=1))
    except Exception:
        result["error"] = traceback.format_exc()
    result["seconds"] = time.time() - start
    (PARTS / f"{name}.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    names = sys.argv[2:] or ["scratch", *CONFIGS[METHOD]]
    if os.environ.get("PRETRAIN_SEEDS"):
        names = [f"{name}@s{seed}" for name in names for seed in os.environ["PRETRAIN_SEEDS"].split()]
    with get_context("spawn").Pool(int(os.environ.get("PROCESSES", len(names)))) as pool:
        for result in pool.imap_unordered(job, names):
            health = result.get("health", {})
            print(result["name"], f"{result['seconds']:.0f}s", health.get("summary", ""), "probe",
                  result.get("probe_val_mre"), "finetune", result.get("finetune_val_mre"),
                  "ERROR" if "error" in result else "", flush=True)
            if "error" in result:
                print(result["error"][-1500:], flush=True)
