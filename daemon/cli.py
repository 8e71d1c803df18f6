"""The ``watchtrain`` command."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from daemon import logs

EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="watchtrain", description=(
        "Watch labeled photo folders, fine-tune MobileNetV2 with MLX, publish Core ML models."))
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the daemon (watch, schedule, train, publish)")
    run.add_argument("--config", type=Path, required=True, help="TOML config file")

    train = sub.add_parser("train", help="train once and publish")
    train.add_argument("dataset", type=Path, help="folder with one sub-folder of photos per label")
    train.add_argument("--output", type=Path, required=True, help="folder to publish <NAME>.mlpackage into")
    train.add_argument("--name", required=True, help="model name (file name of the .mlpackage)")
    train.add_argument("--validation", type=Path, help="separate validation folder (same layout)")
    train.add_argument("--weights", type=Path, help="MobileNetV2 .safetensors (torchvision or timm layout)")
    train.add_argument("--state-dir", type=Path, help="embedding cache and run metrics (default: per user)")
    train.add_argument("--precision", choices=("float16", "float32"), default="float16")
    train.add_argument("--weight-bits", type=int, choices=(16, 8), default=16, help="8: int8 weights (iOS16+)")
    train.add_argument("--min-target", choices=("iOS15", "iOS16", "iOS17", "iOS18"),
                       help="minimum deployment target (default iOS15, iOS16 with 8-bit weights)")
    train.add_argument("--verify-photos", type=int, default=16, help="photos the package is verified on")
    train.add_argument("--mode", choices=("incremental", "nightly"), default="incremental",
                       help="incremental: head on cached embeddings; nightly: deep fine-tune (what the schedule runs)")
    train.add_argument("--json", action="store_true", help="print the run's metrics as JSON")

    predict = sub.add_parser("predict", help="classify photos with a published model")
    predict.add_argument("model", help="path/Name.mlpackage, or a model name with --output")
    predict.add_argument("images", type=Path, nargs="+")
    predict.add_argument("--output", type=Path, help="folder holding the published model (with a name)")
    predict.add_argument("--top", type=int, default=3)
    predict.add_argument("--json", action="store_true")

    score = sub.add_parser("evaluate", help="score a published model on a labeled folder")
    score.add_argument("package", type=Path, help="OUTPUT_DIR/NAME.mlpackage")
    score.add_argument("--images", type=Path, required=True, help="folder with one sub-folder per label")
    score.add_argument("--json", action="store_true")

    check = sub.add_parser("verify", help="run a saved .mlpackage with NumPy (and Core ML on macOS) against MLX")
    check.add_argument("package", type=Path)
    check.add_argument("--images", type=Path, required=True, help="folder of photos (searched recursively)")
    check.add_argument("--weights", type=Path,
                       help="MLX reference weights (default: the published version's, from the package metadata)")
    check.add_argument("--limit", type=int, help="use at most this many photos")
    check.add_argument("--json", action="store_true")

    bench = sub.add_parser("bench", help="images/s of decoding, embedding and a fine-tuning step (vs PyTorch if installed)")
    bench.add_argument("--images", type=Path, required=True, help="folder of photos (searched recursively)")
    bench.add_argument("--weights", type=Path, help="MobileNetV2 .safetensors (default: as for train)")
    bench.add_argument("--photos", type=int, default=64, help="photos to decode (default 64)")
    bench.add_argument("--batch", type=int, default=16, help="embedding batch (default: the one watchtrain uses)")
    bench.add_argument("--train-batch", type=int, default=64, help="fine-tuning batch (default 64)")
    bench.add_argument("--seconds", type=float, default=3.0, help="least time spent on each figure per round")
    bench.add_argument("--rounds", type=int, default=2, help="MLX and PyTorch take turns; each keeps its best")
    bench.add_argument("--no-torch", action="store_true", help="skip the PyTorch peer even if it is installed")
    bench.add_argument("--json", action="store_true")

    service = sub.add_parser("service", help="manage the launchd LaunchAgent (macOS)")
    service.add_argument("action", choices=("install", "uninstall", "status"))
    service.add_argument("--config", type=Path, help="config file the agent runs with (install)")
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    from daemon.app import Daemon
    from daemon.config import load

    cfg = load(args.config)
    logs.configure(cfg.log_level)
    return Daemon(cfg).run_forever()


def _cmd_train(args: argparse.Namespace) -> int:
    from daemon.config import default_state_dir
    from service import export, pipeline

    logs.configure("info", json=not sys.stderr.isatty())
    job = pipeline.Job(
        name=args.name, dataset=args.dataset.resolve(), output=args.output.resolve(),
        state_dir=(args.state_dir or default_state_dir()).resolve(),
        validation=args.validation.resolve() if args.validation else None,
        weights=args.weights, verify_photos=args.verify_photos,
        export=export.ExportOptions(precision=args.precision, weight_bits=args.weight_bits,
                                    minimum_target=args.min_target or ("iOS16" if args.weight_bits == 8 else "iOS15")),
    )
    result = pipeline.run(job, reason="manual", log=logs.get(), mode=args.mode)
    if args.json:
        print(json.dumps(result.metrics, indent=2))
        return 0
    m = result.manifest
    if result.status == "rejected":
        print(f"not published: {result.metrics['quality_gate']}; version {m['version']} stays", file=sys.stderr)
        return 3
    phases = result.metrics["phases_seconds"]
    print(f"published {job.output / (job.name + '.mlpackage')} version {m['version']}")
    print(f"labels: {', '.join(m['labels'])}")
    print(f"train: {m['n_train']} photos, accuracy {m['metrics']['train_accuracy']}")
    print(f"validation: {m['n_val']} photos, accuracy {m['metrics']['val_accuracy']}")
    print(f"embedded {result.metrics['counts']['embedded']} photos, {result.metrics['counts']['cached']} cached, "
          f"{len(result.skipped)} skipped; {phases['total']:.1f} s "
          f"(embed {phases.get('embed', 0):.1f} s, train {phases['train']:.1f} s, export {phases['export']:.1f} s)")
    print(f"metrics: {result.metrics_path}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from service import predict

    loaded = predict.load_published(predict.locate(args.model, args.output))
    probs = predict.probabilities(loaded, args.images)
    tops = predict.top_k(loaded, probs, args.top)
    if args.json:
        print(json.dumps({str(p): dict(t) for p, t in zip(args.images, tops)}, indent=2))
        return 0
    for path, top in zip(args.images, tops):
        print(f"{path}: " + ", ".join(f"{label} {p:.3f}" for label, p in top))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from service import evaluation, predict
    from service.dataset import scan_folder

    loaded = predict.load_published(predict.locate(str(args.package)))
    photos = scan_folder(args.images)
    known = [p for p in photos if p.label in loaded.labels]
    if not known:
        raise FileNotFoundError(f"no photos under {args.images} with one of the model's labels {loaded.labels}")
    probs, kept = predict.probabilities_of_photos(loaded, known)
    truth = [loaded.labels.index(p.label) for p in kept]
    result = evaluation.metrics(truth, probs.argmax(axis=1), loaded.labels)
    result.update(version=loaded.version, unreadable=len(known) - len(kept),
                  unknown_labels=sorted({p.label for p in photos} - set(loaded.labels)))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"accuracy {result['accuracy']} on {result['n']} photos (model version {loaded.version})")
        for label, row in result["per_label"].items():
            print(f"  {label}: n={row['n']} precision={row['precision']} recall={row['recall']}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from service import verify, weights
    from service.dataset import photos_under
    from service.images import load_rgb
    from service.predict import probabilities_of_pixels
    from service.publish import Publisher

    package = args.package.resolve()
    reference = args.weights
    if reference is None:
        version = verify.package_version(package)
        if version is None:
            raise FileNotFoundError(f"{package} has no watchtrain version in its metadata; pass --weights")
        reference = Publisher(package.parent, package.stem).mlx_weights(version)
    model, _ = weights.load(reference)
    photos = photos_under(args.images, args.limit)
    pixels = [load_rgb(p) for p in photos]
    program = verify.load_program(package)
    report = verify.verify(package, probabilities_of_pixels(model, pixels), pixels,
                           [str(p.relative_to(args.images)) for p in photos], program.labels)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(f"{'OK' if report.ok else 'FAILED'}: {package} ({report.precision}) on {report.n} photos: "
              f"top-1 agreement {report.top1_agreement:.4f}, max |dp| {report.max_abs_diff:.2e} "
              f"(tolerance {report.tolerance:.0e}); Core ML run: {'yes' if report.coreml_checked else 'no (not macOS)'}")
        for name in report.mismatches:
            print(f"  top-1 differs: {name}")
    return 0 if report.ok else 1


def _cmd_bench(args: argparse.Namespace) -> int:
    from service import benchmark, weights

    model, _ = weights.load(weights.resolve(args.weights, None))
    result = benchmark.run(args.images, photos=args.photos, batch=args.batch, train_batch=args.train_batch,
                           min_seconds=args.seconds, rounds=args.rounds, model=model, torch_peer=not args.no_torch)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"decode + resize: {result['decode']['ips']} photos/s ({result['decode']['workers']} workers)")
    for key, title in (("embed", f"embedding (batch {result['batch']})"),
                       ("train_step", f"fine-tuning step (batch {result['train_batch']}, {result['blocks']} blocks)")):
        row = result[key]
        peer = (f"PyTorch {row['torch_ips']} images/s, MLX/PyTorch {row['ratio']}" if row["torch_ips"]
                else "PyTorch not installed (pip install 'watchtrain[bench]')")
        print(f"{title}: MLX {row['mlx_ips']} images/s; {peer}")
    print(f"float32 matmul: {result['matmul_gflops']} GFLOPS (BLAS: {result['blas'] or 'bundled'}); "
          f"peak RSS {result['peak_rss_mb']} MB")
    return 0


def _cmd_service(args: argparse.Namespace) -> int:
    from daemon import launchagent

    if args.action == "install":
        if args.config is None:
            print("watchtrain service install: --config FILE is required", file=sys.stderr)
            return EXIT_USAGE
        from daemon.config import load

        load(args.config)  # refuse to install an agent that would crash-loop on a bad config
        print(launchagent.install(args.config))
    elif args.action == "uninstall":
        print(launchagent.uninstall())
    else:
        print(launchagent.status())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command not in ("run", "train"):  # those set up logging themselves; here stdout is for results
        logs.configure("warning", json=not sys.stderr.isatty())
    from daemon.config import ConfigError
    from service.dataset import DatasetError
    from service.images import ImageError
    from service.verify import VerificationError
    from service.weights import WeightsError

    handlers = {"run": _cmd_run, "train": _cmd_train, "predict": _cmd_predict, "evaluate": _cmd_evaluate,
                "verify": _cmd_verify, "bench": _cmd_bench, "service": _cmd_service}
    try:
        return handlers[args.command](args)
    except (ConfigError, DatasetError, WeightsError, ImageError, VerificationError, FileNotFoundError) as exc:
        print(f"watchtrain {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, ConfigError) else 1
