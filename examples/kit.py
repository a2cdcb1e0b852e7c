"""What the example scripts share: data, training a set of models, evaluating a dict of methods,
writing the numbers (markdown + JSON + PNGs), and a few diagnostics.

A script is: settings -> ``load_data`` -> ``train_set`` -> ``evaluate_methods`` over the cases
(pairs, seeds) -> ``write_report``. The scripts write numbers only; the hand-written reading of a
full run lives in ``examples/results/<name>.md`` beside the ``<name>_numbers.{md,json}`` it quotes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

import jfusion  # noqa: E402
from jfusion.workflow.data import load_dataset  # noqa: E402
from jfusion.workflow.results import atomic_write  # noqa: E402
from jfusion.workflow.train import fit_models, init_models  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

Models = list[Any]  # K variable pytrees, one per model
Method = Callable[[Models, Any], Any]  # (models, inputs) -> fused variables


# --- data -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Data:
    """Train and test arrays (images float32 ``(N, H, W, C)`` in [0, 1], labels int32)."""

    name: str
    xtr: np.ndarray
    ytr: np.ndarray
    xte: np.ndarray
    yte: np.ndarray


def quick_dataset() -> str:
    """The dataset of a ``--quick`` run: Fashion-MNIST when its IDX files are installed, else digits."""
    return "fashion_mnist" if FASHION_MNIST_DIR.is_dir() else "digits"


def load_data(name: str = "fashion_mnist", train_subsample: int | None = None, test_subsample: int | None = None) -> Data:
    """``name`` via ``jfusion.workflow.data.load_dataset``, optionally a class-balanced subsample of each split."""
    d = load_dataset(name)
    xtr, ytr, xte, yte = d.train_images, d.train_labels, d.test_images, d.test_labels
    if train_subsample and train_subsample < len(ytr):
        xtr, ytr = stratified(xtr, ytr, train_subsample)
    if test_subsample and test_subsample < len(yte):
        xte, yte = stratified(xte, yte, test_subsample)
    return Data(d.name, xtr, ytr, xte, yte)


def stratified(x: np.ndarray, y: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n // 10`` random examples of each of the ten classes, in their original order."""
    rng = np.random.default_rng(0)
    idx = np.concatenate([rng.permutation(np.flatnonzero(y == c))[: n // 10] for c in range(10)])
    idx = np.sort(idx)
    return x[idx], y[idx]


def activation_batch(data: Data, n: int, seed: int) -> jax.Array:
    """``n`` random training images (all classes) for activation supports."""
    idx = np.random.default_rng(10_000 + seed).choice(len(data.ytr), size=min(n, len(data.ytr)), replace=False)
    return jnp.asarray(data.xtr[np.sort(idx)])


def recalibration_batches(images: np.ndarray, batches: int, batch: int, rng: np.random.Generator) -> jax.Array:
    """``(batches, batch, ...)`` random images for ``jfusion.recalibrate_batch_stats``."""
    idx = rng.choice(len(images), batches * batch, replace=False)
    return jnp.asarray(images[idx].reshape(batches, batch, *images.shape[1:]))


# --- models -----------------------------------------------------------------------------------


def pick(stacked: Any, k: int | Sequence[int]) -> Any:
    """Model ``k`` (or the models ``k``, still stacked) of a pytree stacked along a leading axis."""
    return jax.tree.map(lambda a: a[jnp.asarray(k)], stacked)


def stack(models: Sequence[Any]) -> Any:
    """K pytrees of one structure stacked along a new leading axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *models)


def train_set(
    model: Any,
    subsets: tuple[Any, Any] | Sequence[tuple[Any, Any]],
    seeds: Sequence[int],
    *,
    init_seeds: Sequence[int] | None = None,
    epochs: int,
    batch_size: int,
    optimizer: optax.GradientTransformation | None = None,
) -> Any:
    """Train ``len(seeds)`` models at once (``jfusion.workflow.train``), stacked along K.

    ``subsets`` is one ``(images, labels)`` pair shared by all models or one per model; seed k
    sets model k's batch order and, unless ``init_seeds`` are given, its initialisation.
    Models of one call take ``max_k n_k // batch_size`` steps per epoch, so give equal-sized
    subsets when every model must make exactly ``epochs`` passes over its own data.
    """
    first = subsets if isinstance(subsets, tuple) else subsets[0]
    init = init_models(model, list(init_seeds or seeds), np.asarray(first[0][:1], np.float32))
    trained = fit_models(model, init, subsets, list(seeds), epochs=epochs, batch_size=batch_size, optimizer=optimizer)
    return jax.block_until_ready(trained)  # dispatch is asynchronous: wait, so timings are honest


def finetune_set(
    model: Any,
    models: Models,
    subset: tuple[Any, Any],
    *,
    steps: int,
    batch_size: int,
    optimizer: optax.GradientTransformation,
    seed: int = 12345,
) -> Models:
    """Fine-tune every model of ``models`` with one budget: ``steps`` steps of ``optimizer`` (a fresh
    state per model) on the same batches, drawn in one seeded order from the first ``steps *
    batch_size`` examples of a seeded shuffle of ``subset``; trained together under one ``vmap``."""
    images, labels = subset
    idx = np.random.default_rng(seed).permutation(len(labels))[: steps * batch_size]
    if len(idx) < steps * batch_size:
        raise ValueError(f"{steps} steps of {batch_size} need {steps * batch_size} examples, got {len(labels)}")
    trained = fit_models(model, stack(models), (images[idx], labels[idx]), [seed] * len(models), epochs=1,
                         batch_size=batch_size, optimizer=optimizer)
    trained = jax.block_until_ready(trained)
    return [pick(trained, k) for k in range(len(models))]


def count_params(variables: Any) -> tuple[int, int]:
    """(total, non-zero) entries of every leaf."""
    leaves = [np.asarray(x) for x in jax.tree.leaves(variables)]
    return int(sum(x.size for x in leaves)), int(sum(np.count_nonzero(x) for x in leaves))


def predictions(apply: Callable[[Any, Any], Any], variables: Any, images: np.ndarray, batch: int = 1000) -> np.ndarray:
    """``apply(variables, x)`` (logits) over ``images`` in batches, as one numpy array."""
    return np.concatenate([np.asarray(apply(variables, images[i : i + batch])) for i in range(0, len(images), batch)])


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in [0, 1]."""
    return float(np.mean(np.argmax(logits, -1) == labels))


def ensemble_accuracy(
    apply: Callable[[Any, Any], Any], models: Models, images: np.ndarray, labels: np.ndarray, weights: Sequence[float] | None = None
) -> float:
    """Accuracy of the (weighted) logit average of ``models`` (``jfusion.ensemble_apply``).

    ``apply`` is a static jit argument: pass the same function every time (``model.apply``)."""
    k = len(models)
    w = jnp.asarray(np.full(k, 1.0 / k) if weights is None else weights, jnp.float32)
    logits = predictions(lambda m, x: _ENSEMBLE(apply, m, x, w), stack(models), images)
    return accuracy(logits, labels)


_ENSEMBLE = jax.jit(jfusion.ensemble_apply, static_argnums=0)


# --- evaluating methods -------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    """One method over the cases: accuracies in [0, 1], parameter counts, fusion times in seconds."""

    name: str
    accuracy: list[float]
    params: int | None = None
    nonzero: int | None = None
    first_s: float | None = None  # trace + compile + run, first case
    warm_s: list[float] = dataclasses.field(default_factory=list)  # one warm call per case


@dataclasses.dataclass(frozen=True)
class Case:
    """What a method is applied to: K models and the inputs of activation alignment."""

    models: Models
    inputs: Any = None


def evaluate_methods(
    methods: Mapping[str, Method],
    cases: Sequence[Case],
    score: Callable[[Any], float] | Mapping[str, Callable[[Any], float]],
    *,
    repeats: int = 1,
    jit: bool = True,
) -> list[Row]:
    """Every method on every case: ``method(case.models, case.inputs) -> variables``, scored.

    Each method is wrapped in ``jax.jit`` (one compilation, reused over the cases); ``first_s``
    is its first call and ``warm_s`` the median of ``repeats`` more per case. ``score`` maps the
    fused variables to an accuracy; a mapping ``{suffix: score}`` gives one row per suffix
    (e.g. ``{"": plain, " + BN recal": recalibrated}``), all from the same fusion.
    """
    scores = {"": score} if callable(score) else dict(score)
    rows = []
    for name, method in methods.items():
        fn = jax.jit(method) if jit else method
        by_suffix = {suffix: Row(name + suffix, []) for suffix in scores}
        first = None
        warm = []
        for case in cases:
            start = time.perf_counter()
            fused = jax.block_until_ready(fn(case.models, case.inputs))
            first = time.perf_counter() - start if first is None else first
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                fused = jax.block_until_ready(fn(case.models, case.inputs))
                times.append(time.perf_counter() - start)
            warm.append(statistics.median(times) if times else float("nan"))
            for suffix, fn_score in scores.items():
                by_suffix[suffix].accuracy.append(fn_score(fused))
        total, nonzero = count_params(fused)
        for row in by_suffix.values():
            row.params, row.nonzero, row.first_s, row.warm_s = total, nonzero, first, warm
            rows.append(row)
    return rows


def cached(path: Path | None, compute: Callable[[], Any]) -> Any:
    """``compute()`` brought to the host, or what an earlier run saved at ``path`` (None: no cache).
    Saved atomically, so an interrupted run leaves no half-written cache file."""
    if path is not None and path.exists():
        with path.open("rb") as f:
            return pickle.load(f)
    value = jax.device_get(compute())
    if path is not None:
        atomic_write(path, lambda f: pickle.dump(value, f), overwrite=False)
    return value


def classification_metrics(apply: Callable[[Any, Any], Any], images: Any, labels: Any) -> Callable[[Any], dict[str, jax.Array]]:
    """``variables -> {"loss": mean cross-entropy, "accuracy"}`` on one batch (what ``jfusion.loss_barrier`` traces)."""
    images, labels = jnp.asarray(images), jnp.asarray(labels)

    def metrics(variables):
        logits = apply(variables, images)
        return {"loss": optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(),
                "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}

    return metrics


NAIVE = "naive (model 2 as it is)"


def barrier_curves(
    apply: Callable[[Any, Any], Any],
    fusions: Mapping[str, Callable[[Sequence[Any], Any, Any], Any]],
    cases: Sequence[Case],
    images: np.ndarray,
    labels: np.ndarray,
) -> dict[str, list[jfusion.BarrierResult]]:
    """Per method, ``jfusion.loss_barrier`` (test loss and accuracy) from model 1 to model 2 aligned onto
    it -- the method's ``fusion(pair, inputs, model_weights)`` with weights (0, 1) -- for every case;
    vanilla averaging's curve is the naive one (model 2 as it is). Pass jitted fusions: each is called
    once per case."""
    metrics = classification_metrics(apply, images, labels)
    curve = jax.jit(lambda a, b: jfusion.loss_barrier(metrics, a, b))
    onto_first = jnp.array([0.0, 1.0])
    return {
        NAIVE if name == "vanilla average" else name: [curve(case.models[0], fusion(case.models, case.inputs, onto_first)) for case in cases]
        for name, fusion in fusions.items()
    }


# --- numbers out ------------------------------------------------------------------------------


def mean_std(values: Sequence[float], *, scale: float = 100.0, digits: int = 2, ddof: int = 1) -> str:
    """``mean ± std`` of ``scale * values`` (just the value for one), e.g. accuracies in percent."""
    v = scale * np.asarray(values, np.float64)
    if v.size == 1:
        return f"{v[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=ddof):.{digits}f}"


@dataclasses.dataclass
class Table:
    """A table of already formatted cells."""

    header: list[str]
    rows: list[list[Any]]

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.header) + " |", "|" + "|".join("---" for _ in self.header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in self.rows])


def rows_table(rows: Sequence[Row], *, ddof: int = 1, cases: str = "case") -> Table:
    """The standard table of method rows: accuracy %, per case, parameters, warm fusion time."""
    header = [
        "model / method", f"test acc. % (mean ± std over {cases}s)", f"per {cases}",
        "params", "non-zero", "fuse: first call s", "fuse: warm ms",
    ]
    body = []
    for r in rows:
        per = " / ".join(f"{100 * a:.2f}" for a in r.accuracy) if len(r.accuracy) > 1 else ""
        first = "–" if r.first_s is None else f"{r.first_s:.2f}"
        warm = "–" if not r.warm_s else f"{1000 * float(np.median(r.warm_s)):.1f}"
        body.append([r.name, mean_std(r.accuracy, ddof=ddof), per, _count(r.params), _count(r.nonzero), first, warm])
    return Table(header, body)


def _count(n: int | None) -> str:
    return "–" if n is None else f"{n:,}"


def output_dir(out: str | os.PathLike | None, quick: bool, name: str) -> Path:
    """``--out`` if given; else ``examples/results`` for a full run and a new temporary directory
    for a quick one, so that a smoke test never overwrites the committed results."""
    if out is not None:
        return Path(out)
    return Path(tempfile.mkdtemp(prefix=f"{name}_quick_")) if quick else RESULTS


def versions() -> dict[str, str]:
    """What produced the numbers: software versions and the machine."""
    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "cpu_count": str(os.cpu_count()),
        "machine": platform.machine(),
    }


def write_report(
    out: str | os.PathLike,
    name: str,
    *,
    title: str,
    settings: Mapping[str, Any],
    tables: Mapping[str, Table],
    data: Any = None,
    figures: Mapping[str, Any] | None = None,
    script: str,
    argv: Sequence[str] | None = None,
    runtime_s: float | None = None,
) -> list[Path]:
    """Write ``<name>_numbers.md`` (settings and tables) and ``<name>_numbers.json`` (the same plus
    ``data``, the raw numbers) into ``out``, and each matplotlib figure of ``figures`` as
    ``out/<filename>``. ``script`` and ``argv`` (``sys.argv[1:]`` when None) give the command
    line recorded. Returns the paths written. No prose: readings are written by hand."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python", f"examples/{script}", *(sys.argv[1:] if argv is None else argv)])
    meta = {"command": command, "runtime_s": runtime_s, "versions": versions(), "settings": dict(settings)}
    paths = []
    for filename, fig in (figures or {}).items():
        fig.savefig(out / filename, dpi=110)
        plt.close(fig)
        paths.append(out / filename)
    lines = [f"# {title}: numbers", f"Written by `{command}`" + (f" in {runtime_s:.0f} s" if runtime_s else "") + "."]
    lines += ["## Settings", "\n".join(f"- {k}: {_setting(v)}" for k, v in meta["settings"].items())]
    lines += ["## Versions", ", ".join(f"{k} {v}" for k, v in meta["versions"].items())]
    for heading, table in tables.items():
        lines += [f"## {heading}", table.markdown()]
    lines += [f"![{f}]({f})" for f in (figures or {})]
    md = out / f"{name}_numbers.md"
    md.write_text("\n\n".join(lines) + "\n")
    blob = {**meta, "tables": {h: dataclasses.asdict(t) for h, t in tables.items()}, "data": data}
    js = out / f"{name}_numbers.json"
    js.write_text(json.dumps(blob, indent=1, default=_json_default) + "\n")
    return [md, js, *paths]


def _setting(value: Any) -> str:
    return f"`{value}`" if isinstance(value, (tuple, list, dict)) else str(value)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.ndarray, jax.Array)):
        return np.asarray(value).tolist()
    if isinstance(value, np.generic):
        return value.item()
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return str(value)
