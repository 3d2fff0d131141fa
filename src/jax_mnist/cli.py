"""The ``jax-mnist`` command: parses arguments and dispatches to library functions.

Every flag of ``jax-mnist train`` is generated from a field of :class:`jax_mnist.config.Config`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import sys
from pathlib import Path

from jax_mnist.config import FIELDS, PRESETS, Config, field_type, flag_name, preset_config
from jax_mnist.errors import ConfigError, UserError
from jax_mnist.serve import ENGINES as SERVE_ENGINES  # the serve package imports nothing heavy


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """Adds one flag per config field. Defaults are suppressed so we know what was given."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for field in dataclasses.fields(Config):
        meta = field.metadata
        group = groups.get(meta["group"]) or groups.setdefault(
            meta["group"], parser.add_argument_group(meta["group"])
        )
        kind = field_type(field.name)
        help_text = f"{meta['help']} (default: {field.default})"
        kwargs = {"default": argparse.SUPPRESS, "help": help_text, "dest": field.name}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = kind
            kwargs["metavar"] = (
                "|".join(meta["choices"]) if meta["choices"] else field.name.split("_")[-1].upper()
            )
        group.add_argument(flag_name(field.name), **kwargs)


def add_distributed_flags(parser: argparse.ArgumentParser) -> None:
    """Flags that join this process to a multi-process run. They are not config fields:
    they differ between the processes of one run and are neither saved nor compared on resume."""
    group = parser.add_argument_group(
        "processes", "several processes or machines in one run (see README: several machines)"
    )
    group.add_argument(
        "--coordinator", metavar="HOST:PORT", help="address of process 0, which every process connects to"
    )
    group.add_argument("--num-processes", type=int, metavar="N", help="how many processes take part")
    group.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0 to N-1")
    group.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-process run, detecting what is not given from the cluster "
        "(SLURM, Open MPI, Kubernetes, Cloud TPU)",
    )
    group.add_argument(
        "--coordinator-timeout",
        type=int,
        default=300,
        metavar="SECONDS",
        help="give up if not every process has joined within this time (default: 300)",
    )


def add_checkpoint_flag(parser: argparse.ArgumentParser, what: str, default: str | None = "best") -> None:
    """``--checkpoint latest|best|STEP``, checked by :func:`_checkpoint_choice` when used."""
    parser.add_argument(
        "--checkpoint",
        default=default,
        metavar="latest|best|STEP",
        help=f"{what} (default: best by validation accuracy)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jax-mnist", description="Train and use convolutional networks on MNIST with JAX."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser(
        "train",
        help="train a model (the seed CNN by default)",
        description="Train a model. Every flag overrides the preset.",
    )
    train.add_argument(
        "--config", type=Path, metavar="FILE", help="TOML, YAML or JSON file of settings; flags override it"
    )
    train.add_argument(
        "--workdir",
        type=Path,
        metavar="DIR",
        help="run directory for config, metrics and checkpoints; an existing "
        "one with checkpoints resumes (default: runs/<timestamp>)",
    )
    train.add_argument(
        "--resume",
        action="store_true",
        help="resume from the latest checkpoint in --workdir (an error if none)",
    )
    add_config_flags(train)
    add_distributed_flags(train)

    evaluate = sub.add_parser(
        "evaluate",
        help="test metrics of trained runs; several runs are also evaluated as an ensemble",
        description="Print test loss, accuracy, per-class accuracy and the confusion matrix of "
        "each run, and of their ensemble (averaged probabilities) when several are given.",
    )
    evaluate.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run directories")
    add_checkpoint_flag(evaluate, "which checkpoint of each run")
    evaluate.add_argument(
        "--split",
        choices=("test", "val"),
        default="test",
        help="evaluate on the test set, or on the validation images the runs held out (default: test)",
    )
    evaluate.add_argument(
        "--tta",
        action="store_true",
        help="test-time augmentation: average each model over the image and its 1-pixel shifts",
    )
    evaluate.add_argument("--data-dir", metavar="DIR", help="read the test set from this folder")
    evaluate.add_argument("--json", action="store_true", help="print JSON for scripts")

    predict = sub.add_parser(
        "predict",
        help="predict the digit in image files or .npy arrays",
        description="Predict the class of each input. Images of any size and either polarity are "
        "brought to MNIST's form first (grayscale, white on black, fitted in 20x20, "
        "centred by centre of mass in 28x28).",
    )
    predict.add_argument("run", type=Path, metavar="RUN", help="run directory")
    predict.add_argument(
        "inputs",
        nargs="+",
        type=Path,
        metavar="FILE",
        help="image files (PNG, JPEG, ...) or .npy arrays [H, W] or [N, H, W]",
    )
    add_checkpoint_flag(predict, "which checkpoint")
    predict.add_argument("--top", type=int, default=1, metavar="K", help="show the K most likely classes")
    predict.add_argument("--json", action="store_true", help="print JSON for scripts")

    sub.add_parser("models", help="list the architectures")
    sub.add_parser("presets", help="list the presets and what they set")
    datasets = sub.add_parser("datasets", help="list the datasets, their sizes and whether each is cached")
    datasets.add_argument(
        "--cache-dir", metavar="DIR", help="the download cache (default: user cache folder)"
    )
    datasets.add_argument(
        "--files", action="store_true", help="list each file to download: URL, size, cache path, SHA-256"
    )
    download = sub.add_parser(
        "download",
        help="download a dataset into the cache and verify it (training downloads it too)",
        description="Download a dataset's files from their official location (or $JAX_MNIST_MIRROR) "
        "into the cache, resuming a partial download, and check their SHA-256.",
    )
    download.add_argument("name", metavar="NAME", help="a dataset from `jax-mnist datasets`")
    download.add_argument(
        "--cache-dir", metavar="DIR", help="the download cache (default: user cache folder)"
    )

    report = sub.add_parser(
        "report",
        help="figures and an HTML page of runs; several runs are also compared on one chart",
        description="Write into each run directory curves.png, confusion.png, mistakes.png and "
        "a self-contained report.html. With several runs, also write comparison.png and "
        "comparison.html into --out.",
    )
    report.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run directories")
    report.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="where the comparison of several runs goes (default: the directory holding the runs)",
    )
    export = sub.add_parser(
        "export",
        help="export a trained model to ONNX or StableHLO (jax.export), runnable without jax-mnist",
        description="Write the model of a run as one file that takes raw pixels [N, 28, 28] and "
        "returns logits [N, C] (normalization inside), plus a JSON description beside it "
        "(<out>.json: classes, input contract, source run, test accuracy, SHA-256).",
    )
    export.add_argument("run", type=Path, metavar="RUN", help="run directory")
    export.add_argument(
        "--format",
        required=True,
        metavar="onnx|stablehlo",
        help="ONNX (ONNX Runtime) or a jax.export artifact",
    )
    add_checkpoint_flag(export, "which checkpoint")
    export.add_argument(
        "--out",
        type=Path,
        metavar="FILE",
        help="the file to write (default: RUN/model.onnx or RUN/model.stablehlo)",
    )
    export.add_argument(
        "--input-dtype",
        default="float32",
        metavar="float32|uint8",
        help="pixels the artifact takes: float32 in [0, 1] or uint8 0-255 (default: float32)",
    )
    serve = sub.add_parser(
        "serve",
        help="a draw-a-digit page and an HTTP API for a trained model",
        description="Serve a trained model: a page to draw or upload digits at /, the HTTP API "
        "POST /api/predict and GET /api/model, its docs at /docs; /healthz, /readyz and /metrics for "
        "operators. Needs: pip install 'jax-mnist[serve]'.",
    )
    serve.add_argument(
        "model", type=Path, metavar="RUN|EXPORTED_FILE", help="a run directory or an exported model file"
    )
    add_checkpoint_flag(serve, "which checkpoint of a run", default=None)
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)"
    )
    serve.add_argument(
        "--port", type=int, default=8000, help="port to listen on (default: 8000; 0: any free)"
    )
    serve.add_argument(
        "--engine",
        default="auto",
        choices=SERVE_ENGINES,
        help="what runs a run directory's model: jax, onnx (ONNX Runtime, converted in memory; "
        "needs the export extra), or auto: ONNX Runtime for lenet5, vgg and resnet on a CPU, "
        "where it is faster, JAX otherwise (default: auto)",
    )
    serve.add_argument(
        "--max-batch",
        type=int,
        default=64,
        metavar="N",
        help="concurrent requests share one model call of up to N images; 1 turns batching off (default: 64)",
    )
    serve.add_argument(
        "--max-wait-ms",
        type=float,
        default=5.0,
        metavar="MS",
        help="how long a batch waits for more requests after its first (default: 5)",
    )
    serve.add_argument(
        "--max-queue",
        type=int,
        default=256,
        metavar="N",
        help="at most N prediction requests in the server at once; more are answered 503 with "
        "Retry-After at once; 0: no bound (default: 256)",
    )
    serve.add_argument(
        "--request-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="a prediction not answered within S seconds is answered 504; 0: no limit (default: 10)",
    )
    serve.add_argument(
        "--drain-timeout",
        type=float,
        default=15.0,
        metavar="S",
        help="on SIGTERM or Ctrl-C, stop accepting and finish the requests in flight for at most "
        "S seconds, then exit (default: 15)",
    )
    serve.add_argument(
        "--no-metrics",
        dest="metrics",
        action="store_false",
        help="no GET /metrics (Prometheus) and nothing counted for it",
    )
    tune = sub.add_parser(
        "tune",
        help="search hyperparameters on the validation split with Optuna (pip install 'jax-mnist[tune]')",
        description="Search hyperparameters with Optuna, scored by validation accuracy; the test set is "
        "never read. Every trial is a run directory STUDY/trial-NNNN. Flags of `jax-mnist train` fix "
        "those settings for every trial. Running the same command again continues the study.",
    )
    tune.add_argument(
        "--study", type=Path, required=True, metavar="DIR", help="folder of the study and its trials"
    )
    tune.add_argument(
        "--trials", type=int, required=True, metavar="N", help="finish when N trials are complete or pruned"
    )
    tune.add_argument(
        "--workers", type=int, default=1, metavar="K", help="trial processes on this machine (default: 1)"
    )
    tune.add_argument(
        "--space",
        type=Path,
        metavar="FILE",
        help="TOML or YAML file of the searched settings (default: a built-in space for the model)",
    )
    tune.add_argument(
        "--storage",
        metavar="URL",
        help="Optuna storage shared by workers on several machines, e.g. "
        "postgresql://user:password@host/db (default: sqlite in DIR/study.db)",
    )
    tune.add_argument(
        "--study-name", metavar="NAME", help="name of the study in the storage (default: DIR's name)"
    )
    tune.add_argument("--sampler", choices=("tpe", "random"), default="tpe", help="default: tpe")
    tune.add_argument(
        "--pruner",
        choices=("median", "halving", "none"),
        default="median",
        help="stop hopeless trials from their per-epoch validation accuracy (default: median)",
    )
    tune.add_argument(
        "--sampler-seed", type=int, default=0, metavar="S", help="seed of the sampler (default: 0)"
    )
    tune.add_argument(
        "--cost-target",
        type=float,
        metavar="ACC",
        help="also minimize the training cost (images x forward FLOPs per image) to first reach this "
        "validation accuracy, e.g. 0.991: a two-objective search with a Pareto front (no pruning)",
    )
    tune.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML, YAML or JSON file of fixed settings; flags override it",
    )
    add_config_flags(tune)

    runs = sub.add_parser("runs", help="list the runs under a directory with their results")
    runs.add_argument("root", nargs="?", type=Path, default=Path("runs"), metavar="DIR", help="default: runs")
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from jax_mnist.config import load_config_file
    from jax_mnist.parallel import DistributedSettings, initialize_distributed
    from jax_mnist.runtime import use_deterministic_ops
    from jax_mnist.train import resolve_run, train_and_evaluate

    # XLA reads XLA_FLAGS when JAX starts its backend, which reading a stored run does: so
    # from the flags and the config file, before that (a resumed run's stored setting
    # cannot turn it off; it only makes the GPU kernels deterministic).
    deterministic = getattr(args, "deterministic", None)
    if deterministic is None and args.config is not None:
        deterministic = load_config_file(args.config).get("deterministic")
    if deterministic is not False:
        use_deterministic_ops(warn=_warn)
    # Then, before anything (Orbax included) touches a device.
    distributed = DistributedSettings(
        args.coordinator, args.num_processes, args.process_id, args.distributed, args.coordinator_timeout
    )
    if distributed.requested and args.workdir is None:
        raise UserError("--workdir: a multi-process run needs a run directory that every process sees")
    if args.resume and not args.workdir:
        raise UserError("--resume: give the run directory to resume with --workdir DIR")
    initialize_distributed(distributed, on_timeout=_exit_with_error)
    flags = {name: getattr(args, name) for name in FIELDS if hasattr(args, name)}
    workdir = args.workdir or Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    config = resolve_run(workdir, flags, config_file=args.config, resume=args.resume)
    train_and_evaluate(config, workdir, resume=args.resume)
    return 0


def _checkpoint_choice(value: str) -> str | int:
    if value in ("latest", "best"):
        return value
    if value.isdigit():
        return int(value)
    raise ConfigError("--checkpoint", f"must be latest, best or a step number, got {value!r}")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from jax_mnist.evaluate import evaluate_runs, format_metrics

    which = _checkpoint_choice(args.checkpoint)
    result = evaluate_runs(
        args.runs, which, split=args.split, tta=args.tta, data_dir=args.data_dir, warn=_warn
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    names, split = result["class_names"], result["split"]
    for member in result["members"]:
        print(format_metrics(f"{member['workdir']} (step {member['step']})", member, names, split) + "\n")
    if result["ensemble"] is not None:
        print(format_metrics(f"ensemble of {len(result['members'])}", result["ensemble"], names, split))
        for member in result["members"]:
            print(f"  member {member['workdir']}: {100 * member['accuracy']:.2f}%")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from jax_mnist.predict import predict_files

    if args.top < 1:
        raise ConfigError("--top", f"must be at least 1, got {args.top}")
    predictions, errors = predict_files(
        args.run, args.inputs, which=_checkpoint_choice(args.checkpoint), top=args.top, warn=_warn
    )
    if args.json:
        print(json.dumps({"predictions": predictions, "errors": errors}, indent=2))
    else:
        for p in predictions:
            best = ", ".join(f"{label} ({100 * prob:.1f}%)" for label, prob in p["top"])
            print(f"{p['input']}: {best}")
    for line in errors:
        print(f"jax-mnist: error: {line}", file=sys.stderr)
    return 1 if errors else 0


def cmd_export(args: argparse.Namespace) -> int:
    from jax_mnist.export import export_run, sidecar_path

    which = _checkpoint_choice(args.checkpoint)
    path = export_run(args.run, args.format, args.out, which=which, input_dtype=args.input_dtype, warn=_warn)
    print(path)
    print(sidecar_path(path))
    return 0


def _warn(message: str) -> None:
    print(message, file=sys.stderr)


def _exit_with_error(message: str) -> None:
    # Called from a watchdog thread while JAX waits in C++: no exception can reach main().
    print(f"jax-mnist: error: {message}", file=sys.stderr, flush=True)
    os._exit(UserError.exit_code)


def cmd_serve(args: argparse.Namespace) -> int:
    from jax_mnist.serve import serve

    which = None if args.checkpoint is None else _checkpoint_choice(args.checkpoint)
    serve(
        args.model,
        which=which,
        host=args.host,
        port=args.port,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        engine=args.engine,
        max_queue=args.max_queue,
        request_timeout=args.request_timeout,
        drain_timeout=args.drain_timeout,
        metrics=args.metrics,
        warn=_warn,
    )
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from jax_mnist.models import MODELS, abstract_model, count_params, flops_per_image

    print(f"{'model':<10} {'parameters':>12} {'MFLOP/image':>12}  description")
    for name, entry in MODELS.items():
        model = abstract_model(name)  # shapes only: nothing is initialized or compiled
        print(
            f"{name:<10} {count_params(model):>12,} {flops_per_image(model) / 1e6:>12.2f}  "
            f"{entry.description}"
        )
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    default = Config()
    for name, preset in PRESETS.items():
        config = preset_config(name)
        changes = {k: v for k, v in config.to_dict().items() if k != "preset" and v != getattr(default, k)}
        settings = ", ".join(f"{flag_name(k)} {v}" for k, v in changes.items()) or "the defaults"
        print(f"{name:<6} {preset.__doc__.strip().splitlines()[0]}\n       sets: {settings}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from jax_mnist.report import compare_runs, write_report

    for run in args.runs:
        for path in write_report(run):
            print(path)
    if len(args.runs) > 1:
        for path in compare_runs(args.runs, args.out):
            print(path)
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from jax_mnist.runs import format_runs, summarize_runs

    summaries = summarize_runs(args.root)
    print(format_runs(summaries, args.root) if summaries else f"no runs under {args.root}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from jax_mnist.tune import make_settings, tune

    flags = {name: getattr(args, name) for name in FIELDS if hasattr(args, name)}
    settings = make_settings(
        args.study,
        args.trials,
        flags,
        config_file=args.config,
        space_file=args.space,
        workers=args.workers,
        storage=args.storage,
        study_name=args.study_name,
        sampler=args.sampler,
        pruner=args.pruner,
        sampler_seed=args.sampler_seed,
        cost_target=args.cost_target,
    )
    tune(settings)
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from jax_mnist.data.download import describe, format_datasets, format_files, resolve_cache_dir

    if args.files:
        print(format_files(args.cache_dir))
        return 0
    print(f"cache: {resolve_cache_dir(args.cache_dir)}\n{format_datasets(describe(args.cache_dir))}")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from jax_mnist.data.datasets import DATASETS
    from jax_mnist.data.download import fetch_dataset

    if args.name not in DATASETS:
        raise UserError(f"unknown dataset {args.name!r}; choose from {', '.join(DATASETS)}")
    print(fetch_dataset(DATASETS[args.name], args.cache_dir))
    return 0


COMMANDS = {
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "predict": cmd_predict,
    "models": cmd_models,
    "presets": cmd_presets,
    "datasets": cmd_datasets,
    "download": cmd_download,
    "report": cmd_report,
    "runs": cmd_runs,
    "export": cmd_export,
    "serve": cmd_serve,
    "tune": cmd_tune,
}


def main(argv: list[str] | None = None) -> int:
    """Runs ``jax-mnist`` with ``argv``; returns the exit code."""
    args = build_parser().parse_args(argv)
    # Orbax logs through absl at WARNING for routine events (opening a run read-only).
    logging.getLogger("absl").setLevel(logging.ERROR)
    try:
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # here, so that a closed pipe is noticed below rather than at exit
        return code
    except UserError as e:
        print(f"jax-mnist: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("jax-mnist: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of our output left early (`jax-mnist runs | head`): stop quietly, and
        # point stdout at /dev/null so that flushing it at exit raises nothing either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a command killed by it


if __name__ == "__main__":
    sys.exit(main())
