"""After fusion: recompute BatchNorm statistics, and measure the loss barrier between models.

A fused network's BatchNorm running statistics are averages of its parents' (transported
with their channels), not the statistics of its own activations; recomputing them on a few
batches of training data ("reset BN", as in OTFusion's ResNet experiments and REPAIR,
Jordan et al. 2023) restores much of the accuracy fusion loses on BN networks.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jfusion.core.errors import FusionInputError
from jfusion.core.nnx import fresh, graphdef_of, is_nnx
from jfusion.core.tree import PyTree, flatten, unflatten

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


def loss_barrier(
    loss_fn: Callable[[PyTree], jax.Array],
    params_a: PyTree,
    params_b: PyTree,
    num_points: int = 11,
) -> tuple[jax.Array, jax.Array]:
    """Loss barrier along the segment between two models (linear mode connectivity).

    ``B = max_t [L((1 - t) a + t b) - ((1 - t) L(a) + t L(b))]`` over ``num_points`` evenly
    spaced ``t`` in [0, 1] (Frankle et al. 2020; Entezari et al. 2022). A model aligned to
    another by fusion's plans typically shows a much lower barrier than the raw pair
    (Akash et al. 2022).

    Returns:
      ``(barrier, losses)`` with ``losses`` the ``(num_points,)`` losses along the segment.
    """
    ts = jnp.linspace(0.0, 1.0, num_points)

    def at(t):
        return loss_fn(jax.tree.map(lambda a, b: (1 - t) * a + t * b, params_a, params_b))

    losses = jax.lax.map(at, ts)
    linear = (1 - ts) * losses[0] + ts * losses[-1]
    return jnp.max(losses - linear), losses
