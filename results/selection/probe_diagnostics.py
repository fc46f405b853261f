"""Probe diagnostics on ISBI 2015 validation (10 shots, seed 0): per-level feature statistics and probes of frozen
encoders under several BatchNorm treatments. Usage (repository root):
    OMP_NUM_THREADS=1 .venv/bin/python results/selection/probe_diagnostics.py SCALE SUBSETS METHOD[:MODE] ...
see results/selection/probe.md."""
import sys, math, json
import torch, numpy as np
torch.set_num_threads(1)
from landmark_bench.data.datamodule import LandmarkDataModule
from landmark_bench.methods import build_backbone, preset_settings
from landmark_bench.models.detector import ProbeHead, warmup_cosine
from landmark_bench.heatmaps import spatial_softmax_cross_entropy, decode_heatmaps
from landmark_bench.geometry import to_original
import lightning.pytorch as L

SW = "sweeps/cpu-isbi2015-10shot/pretrain"  # the pretrainings of the sweep command in probe.md
settings = preset_settings("cpu")
L.seed_everything(0)
dm = LandmarkDataModule(dataset="isbi2015", data_dir="../shared/data", shots=10, seed=0, resolution=[160, 128],
                        batch_size=8, sigma=2.0, augment=False, samples_per_epoch=200)
dm.setup()
tr = dm.datasets["train"].__getitems__(list(range(10)))
va = dm.datasets["val"].__getitems__(list(range(len(dm.datasets["val"].records))))

def backbone(method, ckpt=None):
    torch.manual_seed(0)
    return build_backbone(method, encoder=settings["encoder"], pretrained=ckpt, dataset="isbi2015", timestep=None,
                          unet=settings["unet"], diffusion_schedule=settings["pretrain"]["ddpm"], noise_input=False).eval()

@torch.no_grad()
def pyr(bb, images):
    images = torch.nn.functional.interpolate(images, scale_factor=SCALE, mode="bilinear", antialias=True) if SCALE != 1 else images
    out = [bb.pyramid(images[i:i + 10]) for i in range(0, len(images), 10)]
    return [torch.cat(level) for level in zip(*out)]

def stats(levels):
    rows = []
    for f in levels:
        x = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]).double()
        var = x.var(0)
        x = (x - x.mean(0)) / (var.sqrt() + 1e-8)
        ev = torch.linalg.eigvalsh(torch.cov(x.T)).clamp(min=0)
        p = ev / ev.sum()
        erank = math.exp(-(p[p > 0] * p[p > 0].log()).sum())
        rows.append(f"C={f.shape[1]} {tuple(f.shape[-2:])} dead={(var < 1e-6).float().mean():.2f} erank={erank:.1f}")
    return rows

def probe(ftr, fva, levels, steps=200, lr=2e-3):
    torch.manual_seed(0)
    levels = range(len(ftr)) if levels is None else levels
    ftr = [ftr[i] for i in levels]; fva = [fva[i] for i in levels]
    head = ProbeHead([f.shape[1] for f in ftr], 19, 64)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, 20, steps))
    g = torch.Generator().manual_seed(0)
    best = float("inf")
    for step in range(steps):
        idx = torch.randperm(10, generator=g)[:8]
        head.train()
        loss = spatial_softmax_cross_entropy(head([f[idx] for f in ftr], (160, 128)), tr["target"][idx])
        opt.zero_grad(); loss.backward(); opt.step(); sch.step()
        if (step + 1) % 25 == 0:
            head.eval()
            with torch.no_grad():
                logits = head(fva, (160, 128))
            pts = to_original(decode_heatmaps(logits.double(), 6), va["orig_size"], (160, 128))
            mre = ((pts - va["landmarks_orig"]).norm(dim=-1) * va["spacing"][:, None]).mean().item()
            best = min(best, mre)
    return best

subsets = {"all": None,  # every level (five for the encoder, four for the UNet)
            "deep3": [0, 1, 2], "shallow3": [2, 3, 4], "s2s4": [3, 4], "s8s16": [1, 2]}
results = {}
SCALE = float(sys.argv[1])
subsets = {k: subsets[k] for k in sys.argv[2].split(",")}
for name in sys.argv[3:]:
    name, _, mode = name.partition(":")
    method, ckpt = name.split("=") if "=" in name else ((name, f"{SW}/{name}/pretrained.ckpt") if name in ("simclr", "moco", "dino") else (name, None))
    bb = backbone(method, ckpt)
    bns = [m for m in bb.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if mode == "bnreset":
        for m in bns: m.reset_running_stats()
    if mode == "recal":
        for m in bns: m.reset_running_stats(); m.momentum = None
        bb.train()
        with torch.no_grad():
            for i in range(0, len(va["image"]), 25): bb.pyramid(va["image"][i:i+25])
        bb.eval()
    if mode == "recaltr":
        for m in bns: m.reset_running_stats(); m.momentum = None
        bb.train()
        with torch.no_grad(): bb.pyramid(tr["image"])
        bb.eval()
    if mode == "recalpool":
        from landmark_bench.data.cache import cached_images
        from torch.optim.swa_utils import update_bn
        recs = dm.reader.records("train")
        pool = torch.from_numpy(cached_images(dm.reader, recs, (160, 128)))[:, None].float() / 255
        class P(torch.nn.Module):
            def __init__(s, b): super().__init__(); s.b = b
            def forward(s, x): return s.b.pyramid(x)
        update_bn(torch.tensor_split(pool, -(-len(pool) // 32)), P(bb))
        bb.eval()
        print("pool", len(pool))
    if mode == "affinereset":
        for m in bns: torch.nn.init.ones_(m.weight); torch.nn.init.zeros_(m.bias)
    name = name + ":" + mode
    ftr, fva = pyr(bb, tr["image"]), pyr(bb, va["image"])
    print(name, "deepest first:", *stats(fva), sep="\n  ", flush=True)
    for sub, lv in subsets.items():
        results[(name, sub)] = probe(ftr, fva, lv)
        print(f"  probe {sub}: val MRE {results[(name, sub)]:.2f} mm", flush=True)
