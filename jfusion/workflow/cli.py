"""The ``jfusion`` command: train reference models into checkpoints, fuse checkpoints, run the demo.

::

    jfusion demo --epochs 10
    jfusion train --model mlp --data digits --seeds 0 1 2 --epochs 10 --out runs
    jfusion fuse runs/model_0 runs/model_1 runs/model_2 --out runs/fused --evaluate

A checkpoint written by ``train`` holds the model's variables, its Spec and metadata naming
the model (:func:`jfusion.models.describe`) and the data, so ``fuse`` needs nothing else to
rebuild the module (activation alignment, BatchNorm recalibration, evaluation).

Every command turns on JAX's persistent compilation cache in ``$XDG_CACHE_HOME/jfusion/xla``
(``~/.cache/jfusion/xla``), so a second run of the same fusion does not compile it again;
``--no-compile-cache`` or ``JFUSION_NO_COMPILE_CACHE=1`` turns it off
(:func:`jfusion.workflow.compile_cache.enable_compile_cache`).

Progress goes to stderr and results to stdout, so ``jfusion ... > results.txt`` keeps only
the results. Bad inputs (a missing checkpoint, an unknown name, models that cannot be fused)
end the command with one line on stderr and exit code 2, not a traceback.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import numpy as np

from jfusion.workflow.checkpoint import load_checkpoint, save_checkpoint
from jfusion.workflow.data import (
    DATASETS,
    DatasetSplits,
    batches,
    dirichlet_split,
    load_dataset,
    proportion_split,
    special_class_split,
)
from jfusion.workflow.compile_cache import enable_compile_cache
from jfusion.workflow.demo import run_demo
from jfusion.core.errors import JFusionError
from jfusion.evaluate import TrainApply, recalibrate_batch_stats
from jfusion.methods.fuse import fuse
from jfusion.trace import trace_spec
from jfusion.models.registry import MODELS, build_model, describe, from_metadata, model_arguments
from jfusion.models.rnn import CELL_KINDS
from jfusion.core.solvers import Exact, Sinkhorn, Solver
from jfusion.core.spec import Spec
from jfusion.core.support import ByActivations, ByWeights
from jfusion.workflow.train import evaluate, evaluate_models, takes_train, train_models

# Model constructor arguments settable by flags of the same name (--num-classes ...).
MODEL_FLAGS = ("num_classes", "width", "features", "conv_features", "dense_features", "hidden", "cell")

SPLIT_FORMS = "full, iid, special:CLASS:FRACTION or dirichlet:ALPHA"


class UsageError(JFusionError):
    """A command line that asks for something inconsistent (e.g. --epsilon with the exact solver)."""


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- demo ---------------------------------------------------------------------------------


def _run_demo(args: argparse.Namespace) -> None:
    _log(f"training {args.models} MLPs on digits for {args.epochs} epochs, then fusing them")
    run_demo(num_models=args.models, epochs=args.epochs, seed=args.seed)


# --- train --------------------------------------------------------------------------------


def _parse_split(text: str) -> tuple[str, tuple[float, ...]]:
    kind, *values = text.split(":")
    arity = {"full": 0, "iid": 0, "special": 2, "dirichlet": 1}
    try:
        if arity.get(kind) != len(values):
            raise ValueError
        numbers = tuple(float(v) for v in values)
        if kind == "special" and not numbers[0].is_integer():
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected {SPLIT_FORMS}") from None
    return kind, numbers


def _split_arg(text: str) -> str:
    # Parsed when the command line is, so a typo fails before the data loads and training starts.
    _parse_split(text)
    return text


def split_indices(split: str, labels: np.ndarray, num_models: int) -> list[np.ndarray] | None:
    """Each model's training-example indices under ``split`` (None: all models share all data).

    ``full``: every model trains on the whole training set (only seeds differ); ``iid``:
    disjoint class-balanced equal shares; ``special:CLASS:FRACTION``: OTFusion's
    specialist/generalist pair (:func:`jfusion.data.special_class_split`);
    ``dirichlet:ALPHA``: non-iid clients (:func:`jfusion.data.dirichlet_split`).
    """
    kind, values = _parse_split(split)
    if kind == "full":
        return None
    if kind == "iid":
        return proportion_split(labels, [1.0] * num_models)
    if kind == "special":
        if num_models != 2:
            raise UsageError(
                f"--split {split} trains a specialist and a generalist: give exactly two --seeds, "
                f"not {num_models}"
            )
        return list(special_class_split(labels, int(values[0]), values[1]))
    return dirichlet_split(labels, num_models, values[0])


def _model_kwargs(args: argparse.Namespace, data: DatasetSplits) -> dict[str, Any]:
    """The flags given, plus what the data decides (classes, image size) where the model takes it."""
    takes = model_arguments(args.model)
    from_data = {"num_classes": data.num_classes, "image_size": list(data.train_images.shape[1:3])}
    given = {name: getattr(args, name) for name in MODEL_FLAGS if getattr(args, name) is not None}
    return {**{k: v for k, v in from_data.items() if k in takes}, **given}


def _check_outputs(module: nn.Module, sample: np.ndarray, data: DatasetSplits) -> None:
    # A model with fewer logits than classes would train on out-of-range labels silently.
    logits = jax.eval_shape(lambda x: module.init_with_output(jax.random.key(0), x)[0], sample)
    if logits.shape[-1] != data.num_classes:
        raise UsageError(
            f"the model has {logits.shape[-1]} outputs but {data.name} has {data.num_classes} "
            f"classes; make its last layer {data.num_classes} wide (--features/--dense-features ... "
            f"{data.num_classes}, or --num-classes {data.num_classes})"
        )


def _check_free(path: Path, overwrite: bool) -> None:
    # Checked before the work, not only when writing (save_checkpoint checks again).
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")


def _run_train(args: argparse.Namespace) -> None:
    seeds = args.seeds
    outs = [Path(args.out) / f"model_{k}" for k in range(len(seeds))]
    for out in outs:
        _check_free(out, args.overwrite)
    _log(f"loading {args.data}")
    data = load_dataset(args.data, data_dir=args.data_dir)
    description = describe(args.model, **_model_kwargs(args, data))
    module = from_metadata(description)
    spec = module.spec()
    _check_outputs(module, data.train_images[:1], data)
    parts = split_indices(args.split, data.train_labels, len(seeds))
    if parts is None:
        subsets: Any = (data.train_images, data.train_labels)
        sizes = [len(data.train_labels)] * len(seeds)
    else:
        subsets = [(data.train_images[idx], data.train_labels[idx]) for idx in parts]
        sizes = [len(idx) for idx in parts]
    _log(
        f"training {len(seeds)} x {args.model} {description['kwargs']} on {data.name} "
        f"(split {args.split}: {', '.join(map(str, sizes))} examples) for {args.epochs} epochs"
    )

    def progress(epoch: int, epochs: int, losses: np.ndarray) -> None:
        _log(f"epoch {epoch}/{epochs}: training loss {' '.join(f'{loss:.4f}' for loss in losses)}")

    start = time.perf_counter()
    variables = jax.block_until_ready(
        train_models(
            module, subsets, seeds, epochs=args.epochs, batch_size=args.batch_size, progress=progress
        )
    )
    _log(f"trained in {time.perf_counter() - start:.1f} s (including compilation)")
    accuracies = evaluate_models(module, variables, data.test_images, data.test_labels)
    for k, (out, seed, size) in enumerate(zip(outs, seeds, sizes)):
        training = {
            "seed": seed,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "split": args.split,
            "part": k,
            "train_examples": size,
            "test_accuracy": float(accuracies[k]),
        }
        _log(f"writing {out}")
        save_checkpoint(
            out,
            jax.tree.map(lambda a: a[k], variables),
            spec,
            metadata={**description, "data": data.name, "training": training},
            overwrite=args.overwrite,
        )
        print(f"{out}  seed {seed}  test accuracy {100 * accuracies[k]:.2f}%")


# --- fuse ---------------------------------------------------------------------------------


def _solver(name: str, epsilon: float | None) -> Solver:
    if name == "exact":
        if epsilon is not None:
            raise UsageError("--epsilon is Sinkhorn's regularisation; it needs --solver sinkhorn")
        return Exact()
    return Sinkhorn() if epsilon is None else Sinkhorn(epsilon=epsilon)


class Checkpoint(NamedTuple):
    """What :func:`jfusion.checkpoint.load_checkpoint` returns, by name."""

    variables: Any
    spec: Spec | None
    metadata: dict[str, Any] | None


def _load(directory: str) -> Checkpoint:
    # load_checkpoint says what is missing or damaged (FileNotFoundError, CheckpointError), and
    # first completes a save killed mid-swap, which a check for the directory here would miss.
    return Checkpoint(*load_checkpoint(directory))


def _model_of(checkpoint: Checkpoint) -> tuple[Any, Any]:
    metadata = checkpoint.metadata or {}
    return metadata.get("model"), metadata.get("kwargs")


def _fusion_spec(spec_name: str | None, paths: Sequence[str], loaded: Sequence[Checkpoint]) -> Spec:
    """``--spec NAME``'s Spec (built with the first checkpoint's arguments when it is that
    model, e.g. a CNN's image size), else the one the checkpoints store."""
    if spec_name is not None:
        name, kwargs = _model_of(loaded[0])
        return build_model(spec_name, **(kwargs if name == spec_name else {})).spec()
    first = loaded[0].spec
    if first is None:
        raise UsageError(f"{paths[0]} stores no spec; pass --spec NAME (one of {', '.join(MODELS)})")
    for path, checkpoint in zip(paths[1:], loaded[1:]):
        if checkpoint.spec != first:
            raise UsageError(
                f"{path} stores a different spec from {paths[0]}; pass --spec NAME to choose one"
            )
    return first


def _fusion_data(args: argparse.Namespace, first: Checkpoint) -> DatasetSplits:
    # The data the parents were trained on, unless --data says otherwise.
    name = args.data or (first.metadata or {}).get("data")
    if name is None:
        raise UsageError(
            "activation alignment, --recalibrate and --evaluate need data, and the checkpoints "
            "do not name theirs: pass --data NAME"
        )
    _log(f"loading {name}")
    return load_dataset(name, data_dir=args.data_dir)


def _activation_alignment(
    args: argparse.Namespace, module: nn.Module, loaded: Sequence[Checkpoint], data: DatasetSplits, spec: Spec
) -> tuple[ByActivations, np.ndarray]:
    """``ByActivations`` of the rebuilt module, and ``--samples`` shuffled training images."""
    first = _model_of(loaded[0])
    for path, checkpoint in zip(args.checkpoints, loaded):
        if _model_of(checkpoint) != first:
            raise UsageError(
                f"activation alignment runs one module for every model, but {path} describes another "
                f"model than {args.checkpoints[0]} ({first[0]} {first[1]})"
            )
    # Inference mode for models that have one (BatchNorm running averages).
    kwargs = {"train": False} if takes_train(module, loaded[0].variables) else {}
    inputs = next(batches(data.train_images, data.train_labels, args.samples, seed=args.seed))[0]
    # A traced spec names its groups after modules, not after what the reference models sow.
    points = spec if args.trace_spec else None
    return ByActivations.from_module(module, points=points, **kwargs), inputs


def _recalibration(
    args: argparse.Namespace, module: nn.Module, variables: Any, data: DatasetSplits
) -> tuple[TrainApply, np.ndarray]:
    """What :func:`jfusion.recalibrate_batch_stats` takes: training-mode apply and ``--recalibrate`` batches."""
    if "batch_stats" not in variables:
        raise UsageError("--recalibrate recomputes BatchNorm statistics, but the models have no batch_stats")
    shuffled = batches(data.train_images, data.train_labels, args.batch_size, seed=args.seed, drop_last=True)
    chosen = [x for x, _ in itertools.islice(shuffled, args.recalibrate)]
    if len(chosen) < args.recalibrate:
        raise UsageError(
            f"--recalibrate {args.recalibrate} needs that many batches of {args.batch_size}, but "
            f"{data.name} has {len(data.train_labels)} training images; lower --recalibrate or --batch-size"
        )
    return lambda v, x: module.apply(v, x, train=True, mutable=["batch_stats"]), np.stack(chosen)


def _print_accuracies(rows: Sequence[tuple[str, float]]) -> None:
    width = max(len(name) for name, _ in rows)
    print(f"{'checkpoint':<{width}}  {'test acc':>8}")
    for name, accuracy in rows:
        print(f"{name:<{width}}  {100 * accuracy:>7.2f}%")


def _run_fuse(args: argparse.Namespace) -> None:
    out = Path(args.out)
    _check_free(out, args.overwrite)
    solver = _solver(args.solver, args.epsilon)
    paths = args.checkpoints
    if not -len(paths) <= args.target < len(paths):
        raise UsageError(f"--target {args.target} is not a checkpoint index for {len(paths)} checkpoints")
    target = args.target % len(paths)
    if args.sweeps < 1:
        raise UsageError(f"--sweeps must be at least 1, not {args.sweeps}")
    if args.samples < 1:
        raise UsageError(f"--samples must be at least 1 (training images for activation alignment), not {args.samples}")
    if args.alignment == "activations" and args.sweeps != 1:
        raise UsageError("--sweeps is for weight alignment; activation alignment needs none")
    _log(f"loading {len(paths)} checkpoints")
    loaded = [_load(path) for path in paths]
    if args.trace_spec and args.spec is not None:
        raise UsageError("--trace-spec reads the spec off the model; it cannot be combined with --spec")
    by_activations = args.alignment == "activations"
    data = module = None
    if by_activations or args.recalibrate or args.evaluate or args.trace_spec:
        data = _fusion_data(args, loaded[0])
        module = from_metadata(loaded[target].metadata)  # the fused model has the target's architecture
    if args.trace_spec:
        _log("tracing the spec from the model")
        variables = loaded[target].variables
        kwargs = {"train": False} if takes_train(module, variables) else {}
        spec = trace_spec(module.apply, variables, data.train_images[:2], **kwargs)
    else:
        spec = _fusion_spec(args.spec, paths, loaded)
    alignment, inputs = ByWeights(sweeps=args.sweeps), None
    if by_activations:
        alignment, inputs = _activation_alignment(args, module, loaded, data, spec)
    recalibrate = _recalibration(args, module, loaded[target].variables, data) if args.recalibrate else None

    _log(f"fusing {len(paths)} models ({args.solver} solver, {args.alignment} alignment) onto model {target}")
    start = time.perf_counter()
    fused = fuse(
        [checkpoint.variables for checkpoint in loaded],
        spec,
        solver=solver,
        alignment=alignment,
        model_weights=args.weights,
        target=target,
        inputs=inputs,
    ).params
    if recalibrate is not None:
        train_apply, recalibration_batches = recalibrate
        fused = recalibrate_batch_stats(train_apply, fused, recalibration_batches)
    jax.block_until_ready(fused)
    _log(f"fused in {time.perf_counter() - start:.1f} s (including compilation)")

    record: dict[str, Any] = {
        "parents": [str(Path(p).resolve()) for p in paths],
        "solver": args.solver,
        "epsilon": args.epsilon,
        "alignment": args.alignment,
        "sweeps": None if by_activations else args.sweeps,
        "samples": args.samples if by_activations else None,
        "weights": args.weights,
        "target": target,
        "recalibrate_batches": args.recalibrate,
        "data": None if data is None else data.name,
    }
    if args.evaluate:
        _log("evaluating")
        rows = [
            (path, evaluate(from_metadata(c.metadata), c.variables, data.test_images, data.test_labels))
            for path, c in zip(paths, loaded)
        ]
        record["test_accuracy"] = evaluate(module, fused, data.test_images, data.test_labels)
        _print_accuracies([*rows, (f"{out} (fused)", record["test_accuracy"])])

    _log(f"writing {out}")
    # The target's description (model, data), but not its training record: fusion made this model.
    metadata = {k: v for k, v in (loaded[target].metadata or {}).items() if k != "training"}
    save_checkpoint(out, fused, spec, metadata={**metadata, "fusion": record}, overwrite=args.overwrite)
    if not args.evaluate:
        print(out)


# --- command line -------------------------------------------------------------------------


def _number(text: str) -> int | float:
    # Integral widths stay ints: a ResNet multiplies channel counts by them.
    value = float(text)
    return int(value) if value.is_integer() else value


def build_parser() -> argparse.ArgumentParser:
    """The ``jfusion`` argument parser; each subcommand sets ``run`` to its function."""
    parser = argparse.ArgumentParser(
        prog="jfusion",
        description="Fuse trained neural networks with optimal transport (OTFusion, Singh & Jaggi 2020).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--no-compile-cache", action="store_true",
        help="do not use JAX's persistent compilation cache in $XDG_CACHE_HOME/jfusion/xla "
        "(or ~/.cache/jfusion/xla); JFUSION_NO_COMPILE_CACHE=1 does the same",
    )
    models = ", ".join(MODELS)
    default = " (default: %(default)s)"

    demo = commands.add_parser(
        "demo",
        parents=[common],
        help="train MLPs on digits, fuse them, print a table",
        description="Train MLPs on scikit-learn's digits from different seeds, fuse them with every "
        "method, and print their test accuracies and fusion times (jfusion.demo.run_demo).",
    )
    # run_demo's own defaults, so the two cannot drift apart.
    demo_defaults = {name: p.default for name, p in inspect.signature(run_demo).parameters.items()}
    demo.add_argument("--models", type=int, default=demo_defaults["num_models"], metavar="K", help=default[1:])
    demo.add_argument("--epochs", type=int, default=demo_defaults["epochs"], metavar="E", help=default[1:])
    demo.add_argument("--seed", type=int, default=demo_defaults["seed"], metavar="S", help="of model 0" + default)
    demo.set_defaults(run=_run_demo)

    train = commands.add_parser(
        "train",
        parents=[common],
        help="train K reference models at once, one checkpoint each",
        description="Train one model per seed, all at once, and write DIR/model_0, DIR/model_1, ...",
    )
    train.add_argument("--model", required=True, metavar="NAME", help=f"one of {models}")
    train.add_argument("--num-classes", type=int, metavar="N", help="(default: the dataset's)")
    train.add_argument("--width", type=_number, metavar="W", help="width multiplier (vgg11*, resnet*)")
    train.add_argument("--features", type=int, nargs="+", metavar="N", help="mlp's widths, the last = classes")
    train.add_argument("--conv-features", type=int, nargs="+", metavar="N", help="cnn's conv widths")
    train.add_argument("--dense-features", type=int, nargs="+", metavar="N", help="cnn's dense widths")
    train.add_argument("--hidden", type=int, nargs="+", metavar="N", help="rnn's recurrent layer widths")
    train.add_argument("--cell", choices=CELL_KINDS, help="rnn's cell (default lstm)")
    train.add_argument("--data", required=True, choices=DATASETS)
    train.add_argument("--data-dir", metavar="DIR", help="where the dataset is (see jfusion.data)")
    train.add_argument("--seeds", type=int, nargs="+", required=True, metavar="S", help="one model per seed")
    train.add_argument("--epochs", type=int, required=True, metavar="E")
    train.add_argument("--batch-size", type=int, default=128, metavar="B", help=default[1:])
    train.add_argument(
        "--split", type=_split_arg, default="full",
        help=f"{SPLIT_FORMS}: all data for every model (default), equal disjoint class-balanced "
        "shares, OTFusion's specialist/generalist pair, or Dirichlet non-iid clients",
    )
    train.add_argument("--out", required=True, metavar="DIR")
    train.add_argument("--overwrite", action="store_true", help="replace existing checkpoints")
    train.set_defaults(run=_run_train)

    fusion = commands.add_parser(
        "fuse",
        parents=[common],
        help="fuse checkpoints into one",
        description="Fuse the models of CKPT_DIR... by optimal-transport alignment and weighted averaging.",
    )
    fusion.add_argument("checkpoints", nargs="+", metavar="CKPT_DIR")
    fusion.add_argument("--out", required=True, metavar="DIR", help="where to write the fused checkpoint")
    fusion.add_argument("--spec", metavar="NAME", help=f"use this model's Spec ({models}), not the stored one")
    fusion.add_argument(
        "--trace-spec", action="store_true",
        help="trace the Spec from the model (jfusion.trace_spec) instead of the stored or registry one",
    )
    fusion.add_argument("--solver", choices=("exact", "sinkhorn"), default="exact", help=default[1:])
    fusion.add_argument(
        "--epsilon", type=float, metavar="E",
        help=f"Sinkhorn's regularisation, relative to the mean cost (default: {Sinkhorn().epsilon})",
    )
    fusion.add_argument("--alignment", choices=("weights", "activations"), default="weights", help=default[1:])
    fusion.add_argument(
        "--sweeps", type=int, default=1, metavar="S",
        help="passes of weight alignment over the groups; later ones also match on weights that read a group "
        "solved later, e.g. an RNN's hidden-to-hidden kernels" + default,
    )
    fusion.add_argument("--weights", type=float, nargs="+", metavar="W", help="one per model (default: uniform)")
    fusion.add_argument(
        "--target", type=int, default=0, metavar="INDEX", help="the model whose widths the fused one has" + default
    )
    fusion.add_argument("--data", choices=DATASETS, help="(default: the data the checkpoints name)")
    fusion.add_argument("--data-dir", metavar="DIR")
    fusion.add_argument(
        "--samples", type=int, default=200, metavar="S", help="training images for activation alignment" + default
    )
    fusion.add_argument(
        "--recalibrate", type=int, metavar="BATCHES", help="recompute BatchNorm statistics on this many batches"
    )
    fusion.add_argument("--batch-size", type=int, default=128, metavar="B", help="of --recalibrate" + default)
    fusion.add_argument(
        "--seed", type=int, default=0, help="shuffle of the training images of --samples, --recalibrate" + default
    )
    fusion.add_argument("--evaluate", action="store_true", help="print the fused and the parents' test accuracy")
    fusion.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at --out")
    fusion.set_defaults(run=_run_fuse)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``jfusion`` command line; returns the exit code (2 for bad inputs)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:  # --help (0), or a malformed command line (2; argparse said why)
        return int(exit.code or 0)
    enable_compile_cache(not args.no_compile_cache)
    try:
        args.run(args)
    except (OSError, ValueError) as err:  # JFusionError is a ValueError, as are jfusion's other input errors
        message = " ".join(str(err).split())
        print(f"jfusion {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
