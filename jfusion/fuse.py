"""Fusion: align every model onto a target, then average the aligned weights.

``W_F = sum_k w_k W~_k`` where ``W~_k`` is model k transported by its plans (see
:func:`jfusion.align`) and ``w_k`` are the model weights (OTFusion eq. 3 and its
multi-model extension).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jfusion.align import align_problem, prepare, warn_unconverged
from jfusion.costs import GroundMetric
from jfusion.errors import FusionInputError
from jfusion.evaluate import TrainApply, recalibrate_batch_stats
from jfusion.solvers import Exact, Solver
from jfusion.spec import Spec
from jfusion.support import AlignmentMethod
from jfusion.tree import PyTree, unflatten


def model_weights(weights: jax.Array | Sequence[float] | None, num_models: int) -> jax.Array:
    """Model weights normalised to sum to one (uniform when None); checked when concrete."""
    if weights is None:
        return jnp.full((num_models,), 1.0 / num_models, jnp.float32)
    w = jnp.asarray(weights, jnp.float32)
    if w.shape != (num_models,):
        raise FusionInputError(f"weights has shape {w.shape}; expected ({num_models},), one per model")
    if not isinstance(w, jax.core.Tracer):
        values = np.asarray(w)
        if not np.isfinite(values).all() or (values < 0).any() or values.sum() <= 0:
            raise FusionInputError(f"weights must be finite, non-negative and not all zero; got {values.tolist()}")
    return w / jnp.sum(w)


def combine(
    aligned: Mapping[str, jax.Array] | Sequence[Mapping[str, jax.Array]],
    weights: jax.Array,
    dtypes: Mapping[str, jnp.dtype],
) -> dict[str, jax.Array]:
    """``sum_k w_k aligned_k`` per leaf: ``aligned`` stacked on a leading K axis or a list."""
    if isinstance(aligned, Mapping):
        return {
            p: jnp.tensordot(weights, x, axes=1, precision=jax.lax.Precision.HIGHEST).astype(dtypes[p])
            for p, x in aligned.items()
        }
    return {
        p: sum(w * a[p] for w, a in zip(weights, aligned)).astype(dtypes[p]) for p in aligned[0]
    }


def fuse(
    params_list: PyTree | Sequence[PyTree],
    spec: Spec,
    *,
    solver: Solver = Exact(),
    alignment: str | AlignmentMethod = "weights",
    metric: GroundMetric = GroundMetric(),
    weights: jax.Array | Sequence[float] | None = None,
    target: int | PyTree = 0,
    inputs: jax.Array | None = None,
    recalibrate: tuple[TrainApply, jax.Array] | None = None,
) -> PyTree:
    """Fuse K models into one by optimal-transport alignment and weighted averaging.

    ``W_F = sum_k w_k diag(1/beta) T_k^T W^_k`` per layer, where ``T_k`` aligns model k to
    the target (OTFusion, Singh & Jaggi 2020, eqs. 1-3). With ``target`` a model index the
    fused model has that model's widths; with ``target`` a params pytree of other widths
    the models are fused into that architecture (e.g. a pruned one).

    Pure and traceable: ``jax.jit(fuse, static_argnames=...)``, ``lax.scan`` over rounds and
    ``vmap`` over many fusions all work; models of equal widths are aligned under ``vmap``
    so the whole pass is one XLA program. Called eagerly, it warns with
    :class:`jfusion.ConvergenceWarning` when an iterative solver did not converge.

    Args: as :func:`jfusion.align`, plus
      weights: model weights ``w_k`` (K,), normalised to sum to one; uniform by default.
      recalibrate: ``(train_apply, batches)``: recompute the fused model's BatchNorm
        statistics on these batches (see :func:`jfusion.recalibrate_batch_stats`).

    Returns:
      The fused pytree, with the target's structure, widths and dtypes.
    """
    problem = prepare(params_list, spec, solver, alignment, metric, target, inputs)
    w = model_weights(weights, problem.models.num_models)
    aligned, results = align_problem(problem)
    dtypes = (
        problem.models.dtypes
        if problem.target_leaves is None
        else {p: jnp.result_type(x) for p, x in problem.target_leaves.items()}
    )
    fused = combine(aligned, w, dtypes)
    if isinstance(results, list):
        results = {g: tuple(r[g] for r in results) for g in spec.groups}
    warn_unconverged(results)
    fused = unflatten(problem.target_treedef, fused)
    if recalibrate is not None:
        train_apply, batches = recalibrate
        fused = recalibrate_batch_stats(train_apply, fused, batches)
    return fused
