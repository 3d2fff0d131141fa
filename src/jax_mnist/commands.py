"""The handlers of ``jax-mnist``'s subcommands: parsed arguments in, exit code out.

:mod:`jax_mnist.cli` parses the command line and calls one of these; each calls the library
and prints what it returns. They import what they use when they run (JAX, Orbax, matplotlib),
so that importing this module stays as light as the parser.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

from jax_mnist.config import FIELDS, PRESETS, Config, flag_name, load_config_file, preset_config
from jax_mnist.errors import ConfigError, UserError


def cmd_train(args: argparse.Namespace) -> int:
    from jax_mnist.resume import may_hold_checkpoints, resolve_run
    from jax_mnist.rundir import TRAIN_HOLDER, TRAIN_LOCK, check_can_write
    from jax_mnist.runtime import use_deterministic_ops

    if args.resume and not args.workdir:
        raise UserError("--resume: give the run directory to resume with --workdir DIR")
    flags = {name: getattr(args, name) for name in FIELDS if hasattr(args, name)}
    workdir = args.workdir or Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    # A new run's config comes from the flags, the config file and the preset alone: settle it
    # now, so that a bad flag or config file is refused in a fraction of a second, before JAX
    # starts (a run to resume is read from its checkpoints, after JAX is set up below).
    if args.process_id in (None, 0):  # process 0 writes, and holds the run's lock
        check_can_write(workdir, TRAIN_LOCK, TRAIN_HOLDER)  # before JAX starts: refused at once
    config = None
    if not may_hold_checkpoints(workdir):
        config = resolve_run(workdir, flags, config_file=args.config, resume=args.resume)
    # XLA reads XLA_FLAGS when JAX starts its backend, which reading a stored run does: so
    # from the flags and the config file, before that (a resumed run's stored setting
    # cannot turn it off; it only makes the GPU kernels deterministic).
    deterministic = getattr(args, "deterministic", None)
    if deterministic is None and args.config is not None:
        deterministic = load_config_file(args.config).get("deterministic")
    if deterministic is not False:
        use_deterministic_ops(warn=_warn)
    from jax_mnist.parallel import DistributedSettings, initialize_distributed
    from jax_mnist.train import train_and_evaluate

    # Then, before anything (Orbax included) touches a device.
    distributed = DistributedSettings(
        args.coordinator, args.num_processes, args.process_id, args.distributed, args.coordinator_timeout
    )
    if distributed.requested and args.workdir is None:
        raise UserError("--workdir: a multi-process run needs a run directory that every process sees")
    initialize_distributed(distributed, on_timeout=_exit_with_error)
    if config is None:
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
