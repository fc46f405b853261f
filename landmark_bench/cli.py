"""``landmark-bench``: evaluate, annotations, predict, finetune, pretrain, samples, sweep, leaderboard, ablation,
robustness."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from landmark_bench.runs import USER_ERRORS


def integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def shots_value(text: str) -> int | str:
    from landmark_bench.data.datamodule import parse_shots

    try:
        return parse_shots(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def format_metrics(result: dict, title: str) -> str:
    """A small plain-text table of one metrics dict."""
    unit = result["unit"]
    lines = [title, f"  images {result['n_images']}", f"  MRE    {result['mre']:.3f} ± {result['mre_std']:.3f} {unit}"]
    lines += [f"  SDR@{threshold}{unit} {value:.2f} %" for threshold, value in result["sdr"].items()]
    if result.get("ere") is not None:
        lines.append(f"  ERE    {result['ere']:.3f} {unit}")
    return "\n".join(lines)


def reader_options(args: argparse.Namespace) -> dict:
    options = {}
    if getattr(args, "ground_truth", None):
        options["ground_truth"] = args.ground_truth
    return options


def cmd_evaluate(args: argparse.Namespace) -> None:
    from landmark_bench.data.registry import get_reader
    from landmark_bench.evaluation import evaluate_predictions
    from landmark_bench.io import write_json

    reader = get_reader(args.dataset, args.data_dir, **reader_options(args))
    result = evaluate_predictions(Path(args.predictions), reader.records(args.split))
    print(format_metrics(result, f"{args.dataset} {args.split} ({args.predictions})"))
    if args.json:
        write_json(Path(args.json), result)


def cmd_annotations(args: argparse.Namespace) -> None:
    """One doctor's (or the mean) annotations in the predictions format, e.g. to score inter-observer error."""
    import numpy as np

    from landmark_bench.data.registry import get_reader
    from landmark_bench.evaluation import predictions_frame
    from landmark_bench.io import write_csv

    records = get_reader(args.dataset, args.data_dir, **reader_options(args)).records(args.split)
    write_csv(Path(args.out), predictions_frame(records, np.stack([record.landmarks for record in records])))
    print(f"wrote {len(records)} images to {args.out}")


def cmd_predict(args: argparse.Namespace) -> None:
    """A run's detector on a folder of images or on a dataset split; a split with annotations is scored too."""
    from landmark_bench.evaluation import evaluate_predictions
    from landmark_bench.predict import predict

    records = predict(args.run_path, Path(args.out), images=args.images, dataset=args.dataset, split=args.split,
                      data_dir=args.data_dir, reader_options=reader_options(args), overlays=args.overlays,
                      batch_size=args.batch_size, spacing=args.spacing, accelerator=args.accelerator)
    print(f"wrote predictions of {len(records)} images to {args.out}")
    if args.dataset:
        result = evaluate_predictions(Path(args.out), records)
        print(format_metrics(result, f"{args.run_path} on {args.dataset} {args.split}"))


def settings_overrides(args: argparse.Namespace) -> dict:
    """``--config FILE`` then ``--set key=value ...`` (later wins): dotted keys into the preset."""
    from landmark_bench.presets import parse_assignments, read_config_file

    overrides = read_config_file(args.config) if args.config else {}
    overrides.update(parse_assignments(args.set or []))
    return overrides


def cmd_finetune(args: argparse.Namespace) -> None:
    from landmark_bench.finetune import finetune

    record = finetune(overrides=settings_overrides(args), method=args.method, dataset=args.dataset, shots=args.shots, seed=args.seed, preset=args.preset,
                      data_dir=args.data_dir, out=args.out, pretrained=args.pretrained, devices=args.devices,
                      accelerator=args.accelerator, reader_options=reader_options(args), wandb_group=args.wandb_group,
                      protocol=args.protocol)
    for split, result in record["metrics"].items():
        if split != "val":
            print(format_metrics(result, f"{args.method} {args.dataset} {split}"))
    print(f"run folder: {record['run_dir']}  (training {record['train_seconds']:.1f} s)")


def cmd_pretrain(args: argparse.Namespace) -> None:
    from landmark_bench.pretrain import pretrain

    record = pretrain(overrides=settings_overrides(args), method=args.method, datasets=args.datasets, preset=args.preset, data_dir=args.data_dir,
                      out=args.out, devices=args.devices, accelerator=args.accelerator, seed=args.seed,
                      wandb_group=args.wandb_group)
    print(f"{args.method} pretrained on {', '.join(args.datasets)}: {record['checkpoint']}")


def cmd_samples(args: argparse.Namespace) -> None:
    """A diffusion pretraining's sample grid rendered again from its checkpoint."""
    from landmark_bench.checkpoints import METHOD_KEY, read_checkpoint
    from landmark_bench.methods import get_method

    method = get_method(read_checkpoint(args.checkpoint).get(METHOD_KEY) or "")
    if not hasattr(method, "sample_grid_from_checkpoint"):
        raise ValueError(f"checkpoint {args.checkpoint} is a {method.name!r} pretraining, which does not generate images")
    path = method.sample_grid_from_checkpoint(args.checkpoint, args.out, guidance_scale=args.guidance_scale,
                                              num_inference_steps=args.steps,
                                              size=tuple(args.size) if args.size else None)
    print(f"wrote {path}")


def cmd_sweep(args: argparse.Namespace) -> None:
    from landmark_bench.sweep import run_sweep

    slurm = dict(item.split("=", 1) for item in args.slurm) if args.slurm else None
    results = run_sweep(overrides=settings_overrides(args), out=args.out, methods=args.methods, datasets=args.datasets, shots=args.shots, seeds=args.seeds,
                        preset=args.preset, data_dir=args.data_dir, launcher=args.launcher, slots=args.slots,
                        pretrain_datasets=args.pretrain_datasets, dry_run=args.dry_run, slurm=slurm,
                        devices=args.devices, collect=args.collect, protocols=args.protocols,
                        eval_datasets=args.eval_datasets)
    if results is not None:
        publish_leaderboard(Path(args.out))


def publish_leaderboard(sweep_dir: Path) -> None:
    """The leaderboard and, where the sweep scored its detectors on other datasets, the generalisation table."""
    from landmark_bench.leaderboard import build_generalisation, build_leaderboard
    from landmark_bench.sweep.generalisation import GENERALISATION_CSV
    from landmark_bench.tracking import log_leaderboard

    paths = build_leaderboard(sweep_dir / "results.csv", sweep_dir / "leaderboard")
    print(Path(paths["markdown"]).read_text())
    if (sweep_dir / GENERALISATION_CSV).is_file():
        paths.update(build_generalisation(sweep_dir / GENERALISATION_CSV, sweep_dir / "leaderboard"))
        print(Path(paths["generalisation_markdown"]).read_text())
    log_leaderboard(sweep_dir, paths)
    print("files:\n" + "\n".join(f"  {name}: {path}" for name, path in paths.items()))


def cmd_leaderboard(args: argparse.Namespace) -> None:
    """One sweep: its own leaderboard (as the sweep writes it). Several (e.g. one per dataset): one leaderboard over
    all their rows, with the mean ranks across datasets, in ``--out``."""
    from landmark_bench.leaderboard import build_leaderboard

    if len(args.sweep_dirs) == 1 and not args.out:
        publish_leaderboard(Path(args.sweep_dirs[0]))
        return
    if not args.out:
        raise ValueError("several sweeps make one leaderboard: say where it goes with --out")
    sources = [Path(folder) / "results.csv" for folder in args.sweep_dirs]
    if missing := [str(path) for path in sources if not path.is_file()]:
        raise ValueError(f"no results.csv: {', '.join(missing)}")
    paths = build_leaderboard(sources, args.out)
    print(Path(paths["markdown"]).read_text())
    print("files:\n" + "\n".join(f"  {name}: {path}" for name, path in paths.items()))


def cmd_ablation(args: argparse.Namespace) -> None:
    from landmark_bench.io import atomic_write_text
    from landmark_bench.leaderboard import ablation_markdown

    text = ablation_markdown(args.base, args.variant, args.method, args.split)
    print(text)
    if args.out:
        atomic_write_text(Path(args.out), text)


def cmd_robustness(args: argparse.Namespace) -> None:
    """A sweep's runs on seeded perturbations of their test split (another device or clinic)."""
    from landmark_bench.robustness import robustness

    out = Path(args.out) if args.out else Path(args.sweep_dir) / "robustness.md"
    print(robustness(args.sweep_dir, out, perturbations=args.perturbations, methods=args.methods, protocols=args.protocols,
                     seeds=args.seeds, data_dir=args.data_dir, accelerator=args.accelerator, split=args.split))
    print(f"wrote {out} and {out.with_suffix('.csv')}")


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", nargs="+", metavar="KEY=VALUE",
                        help="preset settings by dotted key, e.g. finetune.lr=5e-4 pretrain.ddpm.max_steps=2000 "
                             "encoder=resnet18 (values are Python literals)")
    parser.add_argument("--config", help="a YAML file of the same settings (nested or dotted keys); --set wins")


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import version

    parser = argparse.ArgumentParser(prog="landmark-bench", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('landmark_bench')}")
    commands = parser.add_subparsers(dest="command", required=True)

    evaluate = commands.add_parser("evaluate", help="score a predictions CSV (image_id,landmark,x,y)")
    evaluate.add_argument("--dataset", required=True)
    evaluate.add_argument("--data-dir")
    evaluate.add_argument("--split", required=True)
    evaluate.add_argument("--predictions", required=True)
    evaluate.add_argument("--ground-truth", choices=["mean", "senior", "junior"])
    evaluate.add_argument("--json")
    evaluate.set_defaults(run=cmd_evaluate)

    annotations = commands.add_parser("annotations", help="write a split's annotations as a predictions CSV")
    annotations.add_argument("--dataset", required=True)
    annotations.add_argument("--data-dir")
    annotations.add_argument("--split", required=True)
    annotations.add_argument("--ground-truth", choices=["mean", "senior", "junior"])
    annotations.add_argument("--out", required=True)
    annotations.set_defaults(run=cmd_annotations)

    predict = commands.add_parser("predict", help="apply a fine-tuned run to a folder of images or a dataset split")
    predict.add_argument("run_path", metavar="RUN", help="a fine-tune run folder, or its checkpoints/best.ckpt")
    source = predict.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="folder of PNG, JPEG or TIFF images (ids: file names without suffix)")
    source.add_argument("--dataset", help="a dataset with the run's landmarks")
    predict.add_argument("--split", default="test")
    predict.add_argument("--data-dir")
    predict.add_argument("--ground-truth", choices=["mean", "senior", "junior"])
    predict.add_argument("--out", required=True, help="predictions CSV (image_id,landmark,x,y,ere,unit)")
    predict.add_argument("--overlays", help="folder for one heatmap overlay PNG per input")
    predict.add_argument("--batch-size", type=integer, help="default: the run's")
    predict.add_argument("--spacing", type=float, help="mm per pixel of the --images, for ERE in mm")
    predict.add_argument("--accelerator", default="auto")
    predict.set_defaults(run=cmd_predict)

    finetune = commands.add_parser("finetune", help="fine-tune one method on a few-shot subset and evaluate it")
    finetune.add_argument("--method", required=True)
    finetune.add_argument("--dataset", default="phantom")
    finetune.add_argument("--shots", type=shots_value, default=10)
    finetune.add_argument("--seed", type=integer, default=0)
    finetune.add_argument("--preset", default="cpu")
    finetune.add_argument("--data-dir")
    finetune.add_argument("--out")
    finetune.add_argument("--pretrained", help="pretraining checkpoint (simclr, moco, dino, ddpm, cdpm_align)")
    finetune.add_argument("--ground-truth", choices=["mean", "senior", "junior"])
    finetune.add_argument("--devices", default=1, type=integer)
    finetune.add_argument("--accelerator", default="auto")
    finetune.add_argument("--wandb-group", help="W&B group (the sweep's name)")
    finetune.add_argument("--protocol", default="finetune", choices=["finetune", "probe"],
                          help="finetune: the whole network; probe: the backbone frozen, only a light head trained")
    add_settings_arguments(finetune)
    finetune.set_defaults(run=cmd_finetune)
    pretrain = commands.add_parser("pretrain", help="pretrain a method on unlabelled training images")
    pretrain.add_argument("--method", required=True)
    pretrain.add_argument("--datasets", nargs="+", default=["isbi2015", "aasce2019", "hand", "chest"])
    pretrain.add_argument("--preset", default="cpu")
    pretrain.add_argument("--data-dir")
    pretrain.add_argument("--out")
    pretrain.add_argument("--seed", type=integer, default=0)
    pretrain.add_argument("--devices", default=1, type=integer)
    pretrain.add_argument("--accelerator", default="auto")
    pretrain.add_argument("--wandb-group", help="W&B group (the sweep's name)")
    add_settings_arguments(pretrain)
    pretrain.set_defaults(run=cmd_pretrain)
    samples = commands.add_parser("samples", help="render a diffusion checkpoint's sample grid (DDIM, guidance)")
    samples.add_argument("--checkpoint", required=True)
    samples.add_argument("--out", required=True, help="PNG path")
    samples.add_argument("--guidance-scale", type=float, default=3.0,
                         help="classifier-free guidance of a conditional UNet (1 = none)")
    samples.add_argument("--steps", type=integer, default=50, help="DDIM steps")
    samples.add_argument("--size", type=integer, nargs=2, metavar=("H", "W"),
                         help="sample size (default: the pretraining crop), e.g. the fine-tuning resolution")
    samples.set_defaults(run=cmd_samples)
    sweep = commands.add_parser("sweep", help="methods x datasets x shots x seeds, resumable, then the leaderboard")
    sweep.add_argument("--methods", nargs="+", required=True)
    sweep.add_argument("--datasets", nargs="+", default=["phantom"])
    sweep.add_argument("--shots", nargs="+", type=shots_value, default=[10])
    sweep.add_argument("--seeds", nargs="+", type=integer, default=[0, 1, 2])
    sweep.add_argument("--protocols", nargs="+", default=["finetune"], choices=["finetune", "probe"],
                       help="finetune (whole network) and/or probe (frozen backbone, light head)")
    sweep.add_argument("--preset", default="cpu")
    sweep.add_argument("--data-dir")
    sweep.add_argument("--out", required=True)
    sweep.add_argument("--pretrain-datasets", nargs="+", help="default: isbi2015 aasce2019 hand chest (phantom: itself)")
    sweep.add_argument("--eval-datasets", nargs="+", metavar="NAME",
                       help="also score every fine-tuned detector on these datasets' test splits (same landmarks as "
                            "the trained-on datasets): the generalisation table beside the leaderboard")
    sweep.add_argument("--launcher", default="inprocess", help="inprocess, local, slurm, submitit-local, submitit-debug")
    sweep.add_argument("--slots", nargs="+", help="local launcher: cuda:0 cuda:1 ... (or cpu cpu for CPU processes)")
    sweep.add_argument("--slurm", nargs="*", help="slurm launcher parameters, e.g. slurm_partition=gpu gpus_per_node=1")
    sweep.add_argument("--devices", type=integer, default=1, help="devices per job (Lightning DDP when > 1)")
    sweep.add_argument("--dry-run", action="store_true", help="print the plan, what is done and the estimated cost")
    sweep.add_argument("--collect", action="store_true",
                       help="rebuild results.csv and the leaderboard from the run folders, running nothing")
    add_settings_arguments(sweep)
    sweep.set_defaults(run=cmd_sweep)

    leaderboard = commands.add_parser("leaderboard", help="tables and figures from a sweep's results.csv (or several)")
    leaderboard.add_argument("sweep_dirs", nargs="+", metavar="SWEEP",
                             help="sweep folders (or any folder with a results.csv)")
    leaderboard.add_argument("--out", help="folder for the tables and figures (default, one sweep: SWEEP/leaderboard)")
    leaderboard.set_defaults(run=cmd_leaderboard)
    ablation = commands.add_parser("ablation", help="one method in two sweeps that differ by one setting (--set)")
    ablation.add_argument("base", help="sweep folder with the preset's setting")
    ablation.add_argument("variant", help="sweep folder run with the changed setting")
    ablation.add_argument("--method", required=True)
    ablation.add_argument("--split", default="test")
    ablation.add_argument("--out", help="also write the Markdown table here")
    ablation.set_defaults(run=cmd_ablation)
    robust = commands.add_parser("robustness", help="a sweep's runs on seeded perturbations of the test split "
                                 "(field of view, rotation, contrast and gamma, noise)")
    robust.add_argument("sweep_dir")
    robust.add_argument("--perturbations", nargs="+", help="default: all (crop_top zoom_in zoom_out shift rotate "
                        "contrast_gamma noise)")
    robust.add_argument("--methods", nargs="+", help="default: every done method with a detector")
    robust.add_argument("--protocols", nargs="+", choices=["finetune", "probe"], help="default: every protocol of the sweep (finetune, probe)")
    robust.add_argument("--seeds", nargs="+", type=integer, default=[0, 1], help="perturbation seeds")
    robust.add_argument("--data-dir", help="default: the sweep's (sweep.json)")
    robust.add_argument("--out", help="Markdown table (default SWEEP_DIR/robustness.md); the rows go beside it (.csv)")
    robust.add_argument("--split", choices=["test", "val"], default="test",
                        help="val: score the validation split instead, to choose settings (e.g. the augmentation)")
    robust.add_argument("--accelerator", default="auto")
    robust.set_defaults(run=cmd_robustness)
    return parser


def import_plugins() -> None:
    """Import the modules named in ``LANDMARK_BENCH_PLUGINS`` (comma-separated), so that the methods and datasets
    they register exist in this process and in every job process a sweep starts (they inherit the variable)."""
    import importlib

    for name in filter(None, (part.strip() for part in os.environ.get("LANDMARK_BENCH_PLUGINS", "").split(","))):
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise SystemExit(f"landmark-bench: LANDMARK_BENCH_PLUGINS names {name!r}, which cannot be imported: {error}")


def main(argv: list[str] | None = None) -> int:
    import_plugins()
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except USER_ERRORS as error:
        print(f"landmark-bench {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
