"""After fusion: recompute BatchNorm statistics, and measure the loss barrier between models.

A fused network's BatchNorm running statistics are averages of its parents' (transported
with their channels), not the statistics of its own activations; recomputing them on a few
batches of training data ("reset BN", as in OTFusion's ResNet experiments and REPAIR,
Jordan et al. 2023) restores much of the accuracy fusion loses on BN networks.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jfusion.core.errors import FusionInputError
from jfusion.core.tree import PyTree, flatten

TrainApply = Callable[[PyTree, jax.Array], tuple[Any, PyTree]]


def _stack_batches(batches: jax.Array | Sequence[jax.Array]) -> jax.Array:
    if isinstance(batches, (list, tuple)):
        shapes = {np.shape(b) for b in batches}
        if len(shapes) != 1:
            raise FusionInputError(f"batches must share one shape to be scanned over; got {sorted(shapes)}")
        return jnp.stack([jnp.asarray(b) for b in batches])
    return jnp.asarray(batches)


def recalibrate_batch_stats(
    train_apply: TrainApply, variables: PyTree, batches: jax.Array | Sequence[jax.Array]
) -> PyTree:
    """Replace ``variables["batch_stats"]`` by the average batch statistics over ``batches``.

    ``train_apply(variables, x)`` must run the model in training mode and return
    ``(outputs, {"batch_stats": updated})``, e.g.
    ``lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])``.

    Flax updates running statistics as ``s <- m s + (1 - m) b`` with the batch's statistics
    ``b``. Applying the model with ``s = 0`` gives ``(1 - m) b``, and once with ``s = 1``
    gives ``m + (1 - m) b``, which identifies ``m``; the result is the plain mean of ``b``
    over the batches (PyTorch's cumulative ``momentum=None`` reset), whatever the
    module's momentum. Every layer is normalised by its own batch statistics, as in training.
    Jitted and scanned over the batches (pass the same ``train_apply`` object again to reuse
    the compiled program); nothing but ``batch_stats`` changes.

    Args:
      train_apply: the training-mode apply function described above.
      variables: a linen variable dict with ``"batch_stats"``.
      batches: inputs ``(num_batches, batch_size, ...)`` or a list of equal-shape batches.
    """
    if "batch_stats" not in variables:
        raise FusionInputError(
            f"recalibrate_batch_stats: the variables have no 'batch_stats' collection "
            f"(collections: {sorted(variables)})"
        )
    stacked = _stack_batches(batches)
    if stacked.shape[0] == 0:
        raise FusionInputError("recalibrate_batch_stats needs at least one batch")
    stats = _recalibrated(train_apply, variables, stacked)
    for path, value in flatten(stats)[0].items():
        if not isinstance(value, jax.core.Tracer) and not np.isfinite(np.asarray(value)).all():
            raise FusionInputError(
                f"recalibrated batch_stats/{path} is not finite: the module's statistics do not "
                f"update in training mode (momentum 1?), or the inputs overflow"
            )
    return {**variables, "batch_stats": stats}


@functools.partial(jax.jit, static_argnums=0)
def _recalibrated(train_apply: TrainApply, variables: PyTree, batches: jax.Array) -> PyTree:
    stats = variables["batch_stats"]

    def updated(start, x):
        _, state = train_apply({**variables, "batch_stats": start}, x)
        return state["batch_stats"]

    zeros = jax.tree.map(jnp.zeros_like, stats)
    from_zero = updated(zeros, batches[0])
    from_one = updated(jax.tree.map(jnp.ones_like, stats), batches[0])
    # (1 - m) per statistic; the module's momentum, identified from the first batch.
    kept = jax.tree.map(lambda one, zero: 1.0 - (one - zero), from_one, from_zero)

    def accumulate(total, x):
        return jax.tree.map(jnp.add, total, updated(zeros, x)), None

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
