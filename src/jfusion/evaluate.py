"""After fusion: recompute BatchNorm statistics, measure and plot the barrier between models.

A fused network's BatchNorm running statistics are averages of its parents' (transported
with their channels), not the statistics of its own activations; recomputing them on a few
batches of training data ("reset BN", as in OTFusion's ResNet experiments and REPAIR,
Jordan et al. 2023) restores much of the accuracy fusion loses on BN networks.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any, Callable, Collection, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jfusion.core.errors import FusionInputError
from jfusion.core.nnx import fresh, graphdef_of, is_nnx
from jfusion.core.tree import PyTree, flatten, unflatten
from jfusion.workflow.results import save_png

TrainApply = Callable[[PyTree, jax.Array], tuple[Any, PyTree]]


def _stack_batches(batches: jax.Array | Sequence[jax.Array]) -> jax.Array:
    if isinstance(batches, (list, tuple)):
        shapes = {np.shape(b) for b in batches}
        if len(shapes) != 1:
            raise FusionInputError(f"batches must share one shape to be scanned over; got {sorted(shapes)}")
        return jnp.stack([jnp.asarray(b) for b in batches])
    return jnp.asarray(batches)


@dataclasses.dataclass(frozen=True)
class _LinenStats:
    """``train_apply``'s new ``batch_stats`` from given ones."""

    train_apply: TrainApply

    def __call__(self, stats: PyTree, rest: PyTree, x: jax.Array) -> PyTree:
        return self.train_apply({**rest, "batch_stats": stats}, x)[1]["batch_stats"]


@dataclasses.dataclass(frozen=True)
class _NnxStats:
    """An nnx model's new ``nnx.BatchStat`` state from given ones: a fresh module in training mode."""

    graphdef: nnx.GraphDef

    def __call__(self, stats: nnx.State, rest: nnx.State, x: jax.Array) -> nnx.State:
        module = fresh(self.graphdef, rest, stats, train=True)
        module(x)
        return nnx.state(module, nnx.BatchStat)


def recalibrate_batch_stats(
    train_apply: TrainApply | nnx.Module | nnx.GraphDef, variables: PyTree, batches: jax.Array | Sequence[jax.Array]
) -> PyTree:
    """Replace the running BatchNorm statistics by the average batch statistics over ``batches``.

    linen: ``train_apply(variables, x)`` must run the model in training mode and return
    ``(outputs, {"batch_stats": updated})``, e.g.
    ``lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])``; ``variables``
    has a ``"batch_stats"`` collection. flax.nnx: pass the model (an ``nnx.Module`` or its
    ``GraphDef``) instead and its ``nnx.State``; its ``nnx.BatchStat`` leaves (nnx.BatchNorm's
    ``mean`` and ``var``) are recomputed, each batch on a fresh module from the state in
    training mode (``Module.train()``), so the module passed in is never changed.

    Flax updates running statistics as ``s <- m s + (1 - m) b`` with the batch's statistics
    ``b`` (linen and nnx alike). Applying the model with ``s = 0`` gives ``(1 - m) b``, and
    once with ``s = 1`` gives ``m + (1 - m) b``, which identifies ``m``; the result is the
    plain mean of ``b`` over the batches (PyTorch's cumulative ``momentum=None`` reset),
    whatever the module's momentum. Every layer is normalised by its own batch statistics, as
    in training. Jitted and scanned over the batches (pass the same ``train_apply`` object or
    graph again to reuse the compiled program); nothing but the statistics changes.

    Args:
      train_apply: the training-mode apply function described above, or an nnx model.
      variables: a linen variable dict with ``"batch_stats"``, or an ``nnx.State``.
      batches: inputs ``(num_batches, batch_size, ...)`` or a list of equal-shape batches.
    """
    if is_nnx(train_apply):
        update, prefix = _NnxStats(graphdef_of(train_apply)), ""
        stats, rest = nnx.split_state(variables, nnx.BatchStat, ...)
        if not flatten(stats)[0]:
            raise FusionInputError("recalibrate_batch_stats: the nnx state has no nnx.BatchStat variables (no BatchNorm?)")
    else:
        if "batch_stats" not in variables:
            raise FusionInputError(
                f"recalibrate_batch_stats: the variables have no 'batch_stats' collection "
                f"(collections: {sorted(variables)})"
            )
        update, prefix = _LinenStats(train_apply), "batch_stats/"
        stats, rest = variables["batch_stats"], {c: v for c, v in variables.items() if c != "batch_stats"}
    stacked = _stack_batches(batches)
    if stacked.shape[0] == 0:
        raise FusionInputError("recalibrate_batch_stats needs at least one batch")
    stats = _recalibrated(update, stats, rest, stacked)
    for path, value in flatten(stats)[0].items():
        if not isinstance(value, jax.core.Tracer) and not np.isfinite(np.asarray(value)).all():
            raise FusionInputError(
                f"recalibrated {prefix}{path} is not finite: the module's statistics do not "
                f"update in training mode (momentum 1?), or the inputs overflow"
            )
    if prefix:
        return {**variables, "batch_stats": stats}
    # The state's own structure (merge_state would reorder it): only the statistics change.
    new = flatten(stats)[0]
    leaves, treedef = flatten(variables)
    return unflatten(treedef, {p: new.get(p, x) for p, x in leaves.items()})


@functools.partial(jax.jit, static_argnums=0)
def _recalibrated(update: Callable[[PyTree, PyTree, jax.Array], PyTree], stats: PyTree, rest: PyTree, batches: jax.Array) -> PyTree:
    zeros = jax.tree.map(jnp.zeros_like, stats)
    from_zero = update(zeros, rest, batches[0])
    from_one = update(jax.tree.map(jnp.ones_like, stats), rest, batches[0])
    # (1 - m) per statistic; the module's momentum, identified from the first batch.
    kept = jax.tree.map(lambda one, zero: 1.0 - (one - zero), from_one, from_zero)

    def accumulate(total, x):
        return jax.tree.map(jnp.add, total, update(zeros, rest, x)), None

    total, _ = jax.lax.scan(accumulate, from_zero, batches[1:])
    return jax.tree.map(lambda t, k: t / (k * batches.shape[0]), total, kept)


class BarrierResult(NamedTuple):
    """Result of :func:`loss_barrier`: the metrics along the segment and their barriers.

    Attributes:
      lambdas: the ``(P,)`` interpolation weights, from 0 (model a) to 1 (model b).
      values: ``{metric: (P,)}`` each metric at every lambda (a metrics function returning
        one number gives ``{"loss": ...}``).
      barriers: ``{metric: ()}`` each metric's barrier: how much worse the path gets than the
        mean of its endpoints (losses: ``max - mean``; accuracies: ``mean - min``).
    """

    lambdas: jax.Array
    values: dict[str, jax.Array]
    barriers: dict[str, jax.Array]

    @property
    def barrier(self) -> jax.Array:
        """The loss barrier (the ``"loss"`` metric's, else the first metric's)."""
        return self.barriers["loss"] if "loss" in self.barriers else next(iter(self.barriers.values()))


def _higher_is_better(name: str, names: Collection[str] | None) -> bool:
    return name in names if names is not None else name.endswith(("accuracy", "acc"))


def loss_barrier(
    metrics_fn: Callable[[PyTree], jax.Array | Mapping[str, jax.Array]],
    params_a: PyTree,
    params_b: PyTree,
    *,
    num_points: int = 25,
    higher_is_better: Collection[str] | None = None,
) -> BarrierResult:
    """Metrics along the segment between two models, and their barriers (linear mode connectivity).

    Git Re-Basin's protocol (Ainsworth et al. 2023): ``num_points`` evenly spaced
    ``lambda`` in [0, 1] (25 by default), ``theta(lambda) = (1 - lambda) a + lambda b``, and
    the barrier ``max_lambda L(theta(lambda)) - (L(a) + L(b)) / 2``; for a metric where
    higher is better (accuracy) ``(A(a) + A(b)) / 2 - min_lambda A(theta(lambda))``. (Entezari
    et al. 2022 subtract the straight line between the endpoints instead; the two agree when
    the endpoints' losses do.) A model aligned to another by fusion's plans typically shows a
    much lower barrier than the raw pair.

    Args:
      metrics_fn: ``params -> loss`` or ``params -> {name: value}`` (e.g. loss and accuracy
        on training and test data). Traced once and mapped over the lambdas.
      params_a, params_b: the two endpoints (pytrees of one structure).
      num_points: lambdas, at least 2.
      higher_is_better: the metric names where higher is better; by default those ending
        in ``"accuracy"`` or ``"acc"``.

    Returns:
      A :class:`BarrierResult`; ``.barrier`` is the loss barrier.

    Examples:
      >>> import jax.numpy as jnp, jfusion
      >>> a, b = {"w": jnp.array(1.0)}, {"w": jnp.array(-1.0)}
      >>> result = jfusion.loss_barrier(lambda p: {"loss": 1 - p["w"] ** 2, "accuracy": p["w"] ** 2}, a, b)
      >>> result.lambdas.shape, round(float(result.barrier), 4), round(float(result.barriers["accuracy"]), 4)
      ((25,), 1.0, 1.0)
    """
    if not isinstance(num_points, int) or isinstance(num_points, bool) or num_points < 2:
        raise ValueError(f"num_points must be an int >= 2 (the two endpoints at least), not {num_points!r}")
    lambdas = jnp.linspace(0.0, 1.0, num_points)

    def at(t):
        values = metrics_fn(jax.tree.map(lambda a, b: (1 - t) * a + t * b, params_a, params_b))
        values = dict(values) if isinstance(values, Mapping) else {"loss": values}
        return {name: jnp.asarray(v, jnp.float32).reshape(()) for name, v in values.items()}

    values = jax.lax.map(at, lambdas)
    barriers = {}
    for name, v in values.items():
        ends = (v[0] + v[-1]) / 2
        barriers[name] = ends - jnp.min(v) if _higher_is_better(name, higher_is_better) else jnp.max(v) - ends
    return BarrierResult(lambdas, values, barriers)


def plot_interpolation(
    curves: Mapping[str, BarrierResult],
    path: str | os.PathLike,
    *,
    title: str | None = None,
    overwrite: bool = False,
) -> Path | None:
    """Draw interpolation curves (one :class:`BarrierResult` per label) as a PNG at ``path``.

    One panel per metric (the union over the curves, in order of appearance), each curve
    labelled with its barrier: e.g. ``{"naive": ..., "weights": ..., "activations + repair": ...}``.

    Returns:
      The path written, or None when matplotlib is not installed (nothing is written).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    if not curves:
        raise ValueError("plot_interpolation needs at least one curve")
    metrics = list(dict.fromkeys(name for curve in curves.values() for name in curve.values))
    figure = Figure(figsize=(4.6 * len(metrics), 3.8), layout="constrained")
    FigureCanvasAgg(figure)
    for i, metric in enumerate(metrics):
        axes = figure.add_subplot(1, len(metrics), i + 1)
        for label, curve in curves.items():
            if metric in curve.values:
                barrier = float(curve.barriers[metric])
                axes.plot(np.asarray(curve.lambdas), np.asarray(curve.values[metric]), marker=".", label=f"{label} (barrier {barrier:.3g})")
        axes.set_xlabel("lambda (0: model a, 1: model b)")
        axes.set_ylabel(metric)
        axes.legend(fontsize=7)
    if title:
        figure.suptitle(title, fontsize=9)
    return save_png(figure, path, overwrite)
