"""The ``jfusion`` command: train models into checkpoints, fuse checkpoints, run the demo.

::

    jfusion demo --epochs 10 --out results
    jfusion train --model mlp --data digits --seeds 0 1 2 --epochs 10 --out runs
    jfusion train --model mypackage.models:Net --data digits --seeds 0 1 --epochs 10 --out runs
    jfusion fuse runs/model_0 runs/model_1 runs/model_2 --out runs/fused --evaluate

``--model`` is a reference model's name or your own, ``package.module:Factory``: an
importable callable returning a flax.linen Module, or an nnx Module when it takes ``rngs``
(the current directory is importable, as with ``python -m``). A checkpoint written by
``train`` holds the model's variables, its Spec (``module.spec()``, or traced from the
model when it has none) and metadata naming the model (:func:`jfusion.models.describe`) and
the data, so ``fuse`` needs nothing else to rebuild the module (activation alignment,
BatchNorm recalibration, evaluation). Rebuilding your model imports and calls your code:
fuse only checkpoints you trust.

Every command turns on JAX's persistent compilation cache in ``$XDG_CACHE_HOME/jfusion/xla``
(``~/.cache/jfusion/xla``), so a second run of the same fusion does not compile it again;
``--no-compile-cache`` or ``JFUSION_NO_COMPILE_CACHE=1`` turns it off
(:func:`jfusion.workflow.compile_cache.enable_compile_cache`).

Progress goes to stderr (bars when it is a terminal) and results to stdout, so
``jfusion ... > results.txt`` keeps only the results. Bad inputs (a missing checkpoint, an
unknown name, an invalid number, models that cannot be fused) end the command with one line
on stderr and exit code 2, not a traceback -- and arguments are checked before any data or
checkpoint is loaded.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import jax
import numpy as np

from jfusion.core.errors import JFusionError
from jfusion.core.plans import IMPORTANCES
from jfusion.core.solvers import Exact, Sinkhorn, Solver
from jfusion.core.spec import Spec
from jfusion.core.support import ByWeights
from jfusion.core.tree import flatten
from jfusion.methods.baselines import vanilla_average
from jfusion.methods.fuse import fuse
from jfusion.models.registry import MODELS, model_arguments
from jfusion.models.rnn import CELL_KINDS
from jfusion.pytrees import take_model
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
from jfusion.workflow.handle import ModelHandle, ensemble_accuracy
from jfusion.workflow.progress import Progress, log
from jfusion.workflow.results import check_writable, results_document, write_chart, write_json

# Model constructor arguments settable by flags of the same name (--num-classes ...).
MODEL_FLAGS = ("num_classes", "width", "features", "conv_features", "dense_features", "hidden", "cell")
# Arguments the data decides, given to a model that takes them (unless a flag sets them).
DATA_ARGUMENTS = ("num_classes", "image_size")

SPLIT_FORMS = "full, iid, special:CLASS:FRACTION or dirichlet:ALPHA"


class UsageError(JFusionError):
    """A command line that asks for something inconsistent (e.g. --epsilon with the exact solver)."""


_log = log  # progress lines on stderr (kept under the old name)


def _at_least(args: argparse.Namespace, minimum: int | float, *names: str, what: str = "") -> None:
    """UsageError unless every flag ``names`` that was given (all its values) is >= ``minimum``."""
    for name in names:
        value = getattr(args, name, None)
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v >= minimum):
                flag = "--" + name.replace("_", "-")
                raise UsageError(f"{flag} must be at least {minimum}{what}, not {v}")


# --- demo ---------------------------------------------------------------------------------


def _run_demo(args: argparse.Namespace) -> None:
    _at_least(args, 1, "models")
    _at_least(args, 0, "epochs")
    run_demo(num_models=args.models, epochs=args.epochs, seed=args.seed, out=args.out, overwrite=args.overwrite)


# --- train --------------------------------------------------------------------------------


def _parse_split(text: str) -> tuple[str, tuple[float, ...]]:
    kind, *values = text.split(":")
    arity = {"full": 0, "iid": 0, "special": 2, "dirichlet": 1}
    try:
        if arity.get(kind) != len(values):
            raise ValueError
        numbers = tuple(float(v) for v in values)
        if not all(map(math.isfinite, numbers)):
            raise ValueError
        if kind == "special" and (not numbers[0].is_integer() or numbers[0] < 0 or not 0 <= numbers[1] <= 1):
            raise ValueError
        if kind == "dirichlet" and numbers[0] <= 0:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected {SPLIT_FORMS} (CLASS a class index, FRACTION in [0, 1], ALPHA > 0)"
        ) from None
    return kind, numbers


def _split_arg(text: str) -> str:
    # Parsed when the command line is, so a typo fails before the data loads and training starts.
    _parse_split(text)
    return text


def _check_split_models(split: str, num_models: int) -> None:
    if _parse_split(split)[0] == "special" and num_models != 2:
        raise UsageError(
            f"--split {split} trains a specialist and a generalist: give exactly two --seeds, not {num_models}"
        )


def split_indices(split: str, labels: np.ndarray, num_models: int) -> list[np.ndarray] | None:
    """Each model's training-example indices under ``split`` (None: all models share all data).

    ``full``: every model trains on the whole training set (only seeds differ); ``iid``:
    disjoint class-balanced equal shares; ``special:CLASS:FRACTION``: OTFusion's
    specialist/generalist pair (:func:`jfusion.data.special_class_split`);
    ``dirichlet:ALPHA``: non-iid clients (:func:`jfusion.data.dirichlet_split`).
    """
    kind, values = _parse_split(split)
    _check_split_models(split, num_models)
    if kind == "full":
        return None
    if kind == "iid":
        return proportion_split(labels, [1.0] * num_models)
    if kind == "special":
        return list(special_class_split(labels, int(values[0]), values[1]))
    return dirichlet_split(labels, num_models, values[0])


def _given_model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in MODEL_FLAGS if getattr(args, name, None) is not None}


def _model_kwargs(args: argparse.Namespace, data: DatasetSplits) -> dict[str, Any]:
    """The flags given, plus what the data decides (classes, image size) where the model takes it."""
    takes = model_arguments(args.model)
    from_data = {"num_classes": data.num_classes, "image_size": list(data.train_images.shape[1:3])}
    return {**{k: v for k, v in from_data.items() if k in takes}, **_given_model_kwargs(args)}


def _check_model_before_data(args: argparse.Namespace) -> None:
    """Resolve ``--model`` and build it from the flags alone, so that an unknown name, a
    failing import, a flag the model does not take or a value it refuses (``--width 0.5``
    for a ResNet) fails before the data loads."""
    takes = model_arguments(args.model)  # resolves the name: import errors surface here
    given = _given_model_kwargs(args)
    required = [a for a, default in takes.items() if default is inspect.Parameter.empty and a not in given]
    missing = [a for a in required if a not in DATA_ARGUMENTS]
    if missing:
        raise UsageError(
            f"model {args.model!r} needs {', '.join(missing)}, which no flag of jfusion train sets; give "
            f"them defaults (or wrap the factory: def make(): return Net({missing[0]}=...))"
        )
    if not required:  # buildable now; otherwise it needs what the data says
        ModelHandle({"model": args.model, "kwargs": given}).check_trainable()


def _check_free(path: Path, overwrite: bool) -> None:
    # Checked before the work, not only when writing (save_checkpoint checks again).
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")


def _run_train(args: argparse.Namespace) -> None:
    seeds = args.seeds
    _at_least(args, 0, "epochs")
    _at_least(args, 1, "batch_size", "num_classes", "features", "conv_features", "dense_features", "hidden")
    if args.width is not None and not (math.isfinite(args.width) and args.width > 0):
        raise UsageError(f"--width must be a positive multiplier, not {args.width}")
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds {' '.join(map(str, seeds))} repeats a seed: the models would be identical")
    _check_split_models(args.split, len(seeds))
    outs = [Path(args.out) / f"model_{k}" for k in range(len(seeds))]
    for out in outs:
        _check_free(out, args.overwrite)
    _check_model_before_data(args)

    _log(f"loading {args.data}")
    data = load_dataset(args.data, data_dir=args.data_dir)
    handle = ModelHandle({"model": args.model, "kwargs": _model_kwargs(args, data)})
    description = handle.description
    outputs = handle.num_outputs(data.train_images[:1])
    # A model with fewer logits than classes would train on out-of-range labels silently.
    if outputs != data.num_classes:
        raise UsageError(
            f"the model has {outputs} outputs but {data.name} has {data.num_classes} classes; make its last "
            f"layer {data.num_classes} wide (--features/--dense-features ... {data.num_classes}, or "
            f"--num-classes {data.num_classes})"
        )
    parts = split_indices(args.split, data.train_labels, len(seeds))
    if parts is None:
        subsets: Any = (data.train_images, data.train_labels)
        sizes = [len(data.train_labels)] * len(seeds)
    else:
        subsets = [(data.train_images[idx], data.train_labels[idx]) for idx in parts]
        sizes = [len(idx) for idx in parts]
    _log(
        f"training {len(seeds)} x {args.model} {description['kwargs']} ({'nnx' if handle.is_nnx else 'linen'}) "
        f"on {data.name} (split {args.split}: {', '.join(map(str, sizes))} examples) for {args.epochs} epochs"
    )

    start = time.perf_counter()
    with Progress(args.epochs, "epoch") as bar:
        variables = jax.block_until_ready(
            handle.train(
                subsets, seeds, epochs=args.epochs, batch_size=args.batch_size,
                progress=lambda epoch, epochs, losses: bar.step(
                    "training loss " + " ".join(f"{loss:.4f}" for loss in losses)
                ),
            )
        )
    _log(f"trained in {time.perf_counter() - start:.1f} s (including compilation)")
    if handle.has_spec():
        spec = handle.module.spec()
    else:
        _log("tracing the spec from the model (it has no spec() method)")
        spec = handle.trace(take_model(variables, 0), data.train_images[:2])
    _log("evaluating")
    accuracies = handle.evaluate_models(variables, data.test_images, data.test_labels)
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
            handle.to_saved(take_model(variables, k)),
            spec,
            metadata={**description, "data": data.name, "training": training},
            overwrite=args.overwrite,
        )
        print(f"{out}  seed {seed}  test accuracy {100 * accuracies[k]:.2f}%")


# --- fuse ---------------------------------------------------------------------------------


def _solver(args: argparse.Namespace) -> Solver:
    """The solver the flags ask for; Sinkhorn's own flags need ``--solver sinkhorn``."""
    sinkhorn_flags = {
        "--epsilon": (args.epsilon, "Sinkhorn's regularisation"),
        "--tau-a": (args.tau_a, "unbalanced Sinkhorn's marginal penalty"),
        "--tau-b": (args.tau_b, "unbalanced Sinkhorn's marginal penalty"),
    }
    if args.solver == "exact":
        for flag, (value, what) in sinkhorn_flags.items():
            if value is not None:
                raise UsageError(f"{flag} is {what}; it needs --solver sinkhorn")
        if args.importance != "uniform":
            raise UsageError(
                f"--importance {args.importance} gives non-uniform marginals, which the exact solver "
                f"(an assignment) cannot meet; add --solver sinkhorn"
            )
        return Exact()
    given = {"epsilon": args.epsilon, "tau_a": args.tau_a, "tau_b": args.tau_b}
    return Sinkhorn(**{name: value for name, value in given.items() if value is not None})


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


def _description(args: argparse.Namespace, path: str, checkpoint: Checkpoint) -> dict[str, Any]:
    """The model of a checkpoint: ``--model`` if given (with the checkpoint's arguments when it
    names the same model), else the one its metadata names."""
    name, kwargs = _model_of(checkpoint)
    if args.model is not None:
        return {"model": args.model, "kwargs": (kwargs or {}) if name == args.model else {}}
    if name is None:
        raise UsageError(
            f"{path} names no model in its metadata; pass --model NAME (one of {', '.join(MODELS)}, "
            f"or package.module:Factory)"
        )
    return {"model": name, "kwargs": kwargs or {}}


class _Handles:
    """One :class:`ModelHandle` per distinct description (their compiled programs are shared)."""

    def __init__(self) -> None:
        self._handles: dict[str, ModelHandle] = {}

    def __call__(self, description: dict[str, Any]) -> ModelHandle:
        key = json.dumps(description, sort_keys=True)
        if key not in self._handles:
            self._handles[key] = ModelHandle(description)
        return self._handles[key]


def _fusion_spec(
    args: argparse.Namespace, paths: Sequence[str], loaded: Sequence[Checkpoint], handles: _Handles
) -> Spec:
    """``--spec NAME``'s Spec (built with the first checkpoint's arguments when it is that
    model, e.g. a CNN's image size), else the one the checkpoints store."""
    if args.spec is not None:
        name, kwargs = _model_of(loaded[0])
        handle = handles({"model": args.spec, "kwargs": (kwargs or {}) if name == args.spec else {}})
        if not handle.has_spec():
            raise UsageError(f"model {args.spec!r} has no spec() method; use --trace-spec instead of --spec")
        return handle.module.spec()
    first = loaded[0].spec
    if first is None:
        raise UsageError(f"{paths[0]} stores no spec; pass --spec NAME (one of {', '.join(MODELS)}) or --trace-spec")
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


def _recalibration_batches(args: argparse.Namespace, data: DatasetSplits) -> np.ndarray:
    """``--recalibrate`` shuffled training batches of ``--batch-size`` images."""
    shuffled = batches(data.train_images, data.train_labels, args.batch_size, seed=args.seed, drop_last=True)
    chosen = [x for x, _ in itertools.islice(shuffled, args.recalibrate)]
    if len(chosen) < args.recalibrate:
        raise UsageError(
            f"--recalibrate {args.recalibrate} needs that many batches of {args.batch_size}, but "
            f"{data.name} has {len(data.train_labels)} training images; lower --recalibrate or --batch-size"
        )
    return np.stack(chosen)


def _print_accuracies(rows: Sequence[tuple[str, float | None]]) -> None:
    width = max(len(name) for name, _ in rows)
    print(f"{'model':<{width}}  {'test acc':>8}")
    for name, accuracy in rows:
        print(f"{name:<{width}}  {'-':>8}" if accuracy is None else f"{name:<{width}}  {100 * accuracy:>7.2f}%")


def results_paths(out: Path) -> tuple[Path, Path]:
    """Where ``jfusion fuse --out DIR --evaluate`` writes its results: beside the checkpoint,
    ``DIR.results.json`` and ``DIR.results.png`` (inside it they would not be the checkpoint's)."""
    return out.with_name(f"{out.name}.results.json"), out.with_name(f"{out.name}.results.png")


def _check_fuse_arguments(args: argparse.Namespace) -> None:
    """Everything about the command line that can be checked before anything is loaded."""
    paths = args.checkpoints
    if not -len(paths) <= args.target < len(paths):
        raise UsageError(f"--target {args.target} is not a checkpoint index for {len(paths)} checkpoints")
    if args.sweeps < 1:
        raise UsageError(f"--sweeps must be at least 1, not {args.sweeps}")
    if args.samples < 1:
        raise UsageError(f"--samples must be at least 1 (training images for activation alignment), not {args.samples}")
    _at_least(args, 1, "recalibrate", "batch_size")
    if args.alignment == "activations" and args.sweeps != 1:
        raise UsageError("--sweeps is for weight alignment; activation alignment needs none")
    if args.trace_spec and args.spec is not None:
        raise UsageError("--trace-spec reads the spec off the model; it cannot be combined with --spec")
    if args.weights is not None:
        if len(args.weights) != len(paths):
            raise UsageError(f"--weights gives {len(args.weights)} weights for {len(paths)} checkpoints; give one each")
        if not all(math.isfinite(w) and w >= 0 for w in args.weights) or sum(args.weights) <= 0:
            raise UsageError(f"--weights must be finite, non-negative and not all zero, not {args.weights}")
    for name in (args.model, args.spec):
        if name is not None:
            model_arguments(name)  # resolves it: an unknown name or failing import fails now


def _run_fuse(args: argparse.Namespace) -> None:
    out = Path(args.out)
    paths = args.checkpoints
    _check_fuse_arguments(args)
    _check_free(out, args.overwrite)
    if args.evaluate:
        check_writable(results_paths(out), args.overwrite)
    solver = _solver(args)
    target = args.target % len(paths)
    by_activations = args.alignment == "activations"
    needs_model = by_activations or bool(args.recalibrate) or args.evaluate or args.trace_spec

    with Progress(len(paths), "loading checkpoints") as bar:
        loaded = []
        for path in paths:
            loaded.append(_load(path))
            bar.step(str(path))
    handles = _Handles()
    data = None
    members: list[tuple[ModelHandle, Any]] = []  # each parent's model and variables
    if needs_model:
        # Models first (an unknown or unimportable one fails before the data loads).
        for path, checkpoint in zip(paths, loaded):
            handle = handles(_description(args, path, checkpoint))
            members.append((handle, handle.from_saved(checkpoint.variables)))
        handle = members[target][0]  # the fused model has the target's architecture
        _log(f"model: {handle.name} {handle.description['kwargs']} ({'nnx' if handle.is_nnx else 'linen'})")
        data = _fusion_data(args, loaded[0])
        variables = [v for _, v in members]
    else:
        variables = [checkpoint.variables for checkpoint in loaded]

    if args.trace_spec:
        _log("tracing the spec from the model")
        spec = handle.trace(variables[target], data.train_images[:2])
    else:
        spec = _fusion_spec(args, paths, loaded, handles)
    alignment, inputs = ByWeights(sweeps=args.sweeps), None
    if by_activations:
        first = members[0][0].description
        for path, (member, _) in zip(paths, members):
            if member.description != first:
                raise UsageError(
                    f"activation alignment runs one module for every model, but {path} describes another "
                    f"model than {paths[0]} ({first['model']} {first['kwargs']})"
                )
        alignment = handle.activations(variables[target], spec, traced=args.trace_spec)
        inputs = next(batches(data.train_images, data.train_labels, args.samples, seed=args.seed))[0]
    recalibration = None
    if args.recalibrate:
        if not handle.has_batch_stats(variables[target]):
            raise UsageError("--recalibrate recomputes BatchNorm statistics, but the models have no batch_stats")
        recalibration = _recalibration_batches(args, data)

    what = f"{args.solver} solver, {args.alignment} alignment" + (f" on {args.samples} images" if by_activations else "")
    _log(f"fusing {len(paths)} models ({what}) onto model {target}: tracing, compiling and solving")
    start = time.perf_counter()
    fused = fuse(
        variables, spec, solver=solver, alignment=alignment, importance=args.importance,
        model_weights=args.weights, target=target, inputs=inputs,
    ).params
    jax.block_until_ready(fused)
    fusion_s = time.perf_counter() - start
    if recalibration is not None:
        _log(f"recalibrating the BatchNorm statistics on {args.recalibrate} batches of {args.batch_size}")
        fused = jax.block_until_ready(handle.recalibrate(fused, recalibration))
    elapsed = time.perf_counter() - start
    _log(f"fused in {elapsed:.1f} s (including compilation)")

    record: dict[str, Any] = {
        "parents": [str(Path(p).resolve()) for p in paths],
        "solver": args.solver,
        "epsilon": args.epsilon,
        "tau_a": args.tau_a,
        "tau_b": args.tau_b,
        "importance": args.importance,
        "alignment": args.alignment,
        "sweeps": None if by_activations else args.sweeps,
        "samples": args.samples if by_activations else None,
        "weights": args.weights,
        "target": target,
        "recalibrate_batches": args.recalibrate,
        "data": None if data is None else data.name,
        "spec": "traced" if args.trace_spec else (args.spec or "stored"),
    }
    settings = dict(record)  # before the results join the record
    if args.evaluate:
        rows = _evaluate(args, members, fused, handle, data, recalibration, out)
        record["test_accuracy"] = rows[-1]["test_accuracy"]
        record["parents_test_accuracy"] = [r["test_accuracy"] for r in rows if r["kind"] == "parent"]
        record["baselines_test_accuracy"] = {r["name"]: r["test_accuracy"] for r in rows if r["kind"] == "baseline"}
        _print_accuracies([(r["label"], r["test_accuracy"]) for r in rows])

    _log(f"writing {out}")
    # The target's description (model, data), but not its training record: fusion made this model.
    metadata = {k: v for k, v in (loaded[target].metadata or {}).items() if k != "training"}
    if needs_model:
        metadata.update(handle.description)
    saved = handle.to_saved(fused) if needs_model else fused
    save_checkpoint(out, saved, spec, metadata={**metadata, "fusion": record}, overwrite=args.overwrite)
    if args.evaluate:
        _write_fuse_results(args, out, settings, rows, fusion_s, elapsed)
    else:
        print(out)


def _evaluate(
    args: argparse.Namespace,
    members: Sequence[tuple[ModelHandle, Any]],
    fused: Any,
    handle: ModelHandle,
    data: DatasetSplits,
    recalibration: np.ndarray | None,
    out: Path,
) -> list[dict[str, Any]]:
    """Test accuracy of the parents, the two baselines and the fused model, as rows
    ``{"name", "label", "kind", "test_accuracy"}`` (the fused model last)."""
    images, labels = data.test_images, data.test_labels
    variables = [v for _, v in members]
    shapes = [{path: np.shape(x) for path, x in flatten(v)[0].items()} for v in variables]
    same_shapes = all(s == shapes[0] for s in shapes)
    rows: list[dict[str, Any]] = []
    with Progress(len(members) + 3, "evaluating") as bar:
        for path, (member, v) in zip(args.checkpoints, members):
            bar.status(str(path))
            rows.append({"name": str(path), "label": str(path), "kind": "parent", "test_accuracy": member.evaluate(v, images, labels)})
            bar.step()
        bar.status("ensemble (logits)")
        accuracy = ensemble_accuracy(members, images, labels, args.weights)
        rows.append({"name": "ensemble (logits)", "label": "ensemble (logits)", "kind": "baseline", "test_accuracy": accuracy})
        bar.step()
        bar.status("vanilla average")
        vanilla = None
        if same_shapes:  # unaligned averaging needs equal widths
            averaged = vanilla_average(variables, model_weights=args.weights).params
            if recalibration is not None:
                averaged = handle.recalibrate(averaged, recalibration)
            vanilla = handle.evaluate(averaged, images, labels)
        label = "vanilla average" + (" (+ BN recalibration)" if recalibration is not None else "")
        rows.append({"name": "vanilla average", "label": label if same_shapes else label + " (widths differ)",
                     "kind": "baseline", "test_accuracy": vanilla})
        bar.step()
        bar.status("fused")
        rows.append({"name": "fused", "label": f"{out} (fused)", "kind": "fused", "test_accuracy": handle.evaluate(fused, images, labels)})
        bar.step()
    return rows


def _write_fuse_results(
    args: argparse.Namespace, out: Path, settings: dict[str, Any], rows: Sequence[dict[str, Any]], fusion_s: float, elapsed: float
) -> None:
    json_path, chart_path = results_paths(out)
    settings = {**settings, "checkpoint": str(out.resolve()), "model": args.model, "seed": args.seed,
                "batch_size": args.batch_size if args.recalibrate else None}
    document = results_document(
        "jfusion fuse", settings, rows, fusion_s=fusion_s, fusion_and_recalibration_s=elapsed,
        argv=args.argv, units={"test_accuracy": "fraction in [0, 1]", "fusion_s": "s, including compilation"},
    )
    _log(f"writing {write_json(json_path, document, overwrite=args.overwrite)}")
    bars = [(r["label"], r["test_accuracy"], r["kind"]) for r in rows if r["test_accuracy"] is not None]
    title = f"jfusion fuse: {len(args.checkpoints)} models, {args.solver} solver, {args.alignment} alignment"
    chart = write_chart(chart_path, bars, title=title, overwrite=args.overwrite)
    if chart is None:
        _log(f"matplotlib is not installed, so no chart: wrote only {json_path}")
    else:
        _log(f"writing {chart}")


# --- command line -------------------------------------------------------------------------


def _number(text: str) -> int | float:
    # Integral widths stay ints: a ResNet multiplies channel counts by them.
    value = float(text)
    return int(value) if value.is_integer() else value


MODEL_HELP = "a reference model ({}) or your own, package.module:Factory (a callable returning a flax module)"


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
    demo.add_argument(
        "--out", metavar="DIR",
        help="also write DIR/demo.json (settings, versions, every number) and DIR/demo.png (a chart; needs matplotlib)",
    )
    demo.add_argument("--overwrite", action="store_true", help="replace demo.json / demo.png that jfusion wrote")
    demo.set_defaults(run=_run_demo)

    train = commands.add_parser(
        "train",
        parents=[common],
        help="train K models at once, one checkpoint each",
        description="Train one model per seed, all at once, and write DIR/model_0, DIR/model_1, ...",
    )
    train.add_argument("--model", required=True, metavar="NAME", help=MODEL_HELP.format(models))
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
    fusion.add_argument(
        "--model", metavar="NAME",
        help="the checkpoints' model, " + MODEL_HELP.format(models) + " (default: the one their metadata names)",
    )
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
    fusion.add_argument(
        "--tau-a", type=float, metavar="T",
        help="unbalanced Sinkhorn: how strictly the models' neuron masses are met, in (0, 1] (default: 1, balanced)",
    )
    fusion.add_argument(
        "--tau-b", type=float, metavar="T",
        help="unbalanced Sinkhorn: the same for the target's neuron masses (default: 1, balanced)",
    )
    fusion.add_argument(
        "--importance", choices=IMPORTANCES, default="uniform",
        help="neuron masses: uniform, or proportional to the l1 / l2 norm of each neuron's weights "
        "(OTFusion's --importance; needs --solver sinkhorn)" + default,
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
    fusion.add_argument(
        "--evaluate", action="store_true",
        help="print the test accuracy of the parents, their ensemble, their vanilla average and the fused "
        "model, and write them to DIR.results.json (and DIR.results.png with matplotlib)",
    )
    fusion.add_argument(
        "--overwrite", action="store_true", help="replace an existing checkpoint (and results) at --out"
    )
    fusion.set_defaults(run=_run_fuse)
    return parser


def _current_directory_importable() -> None:
    # The console script's sys.path starts at its own bin directory; `python -m` would have
    # the current directory, where a user's --model package.module usually lives. Appended,
    # so nothing there shadows an installed package.
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``jfusion`` command line; returns the exit code (2 for bad inputs)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:  # --help (0), or a malformed command line (2; argparse said why)
        return int(exit.code or 0)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what the results record
    _current_directory_importable()
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
