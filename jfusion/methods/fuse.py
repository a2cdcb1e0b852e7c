"""Fusion: align every model onto a target, then average the aligned weights.

``W_F = sum_k w_k W~_k`` where ``W~_k`` is model k transported by its plans (see
:func:`jfusion.align`) and ``w_k`` are the model weights (OTFusion eq. 3 and its
multi-model extension).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jfusion.core.align import PlanConfig, align_flat, align_problem, group_plans, prepare, warn_unconverged
from jfusion.core.costs import GroundMetric
from jfusion.core.errors import ConvergenceWarning, FusionInputError
from jfusion.evaluate import TrainApply, recalibrate_batch_stats
from jfusion.core.solvers import Exact, OTResult, Solver
from jfusion.core.spec import Spec
from jfusion.core.support import AlignmentMethod
from jfusion.methods.prune import prune
from jfusion.core.tree import ModelStack, PyTree, unflatten


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


def weighted_sum(
    stacked: Mapping[str, jax.Array], weights: jax.Array, dtypes: Mapping[str, jnp.dtype]
) -> dict[str, jax.Array]:
    """``sum_k w_k x_k`` per leaf of leaves stacked on a leading K axis."""
    return {
        p: jnp.tensordot(weights, x, axes=1, precision=jax.lax.Precision.HIGHEST).astype(dtypes[p])
        for p, x in stacked.items()
    }


def slot_weights(coverage: jax.Array, weights: jax.Array) -> jax.Array:
    """Per-model weight of every target slot: ``Lambda_k[q] = w_k c_k[q] / sum_j w_j c_j[q]``.

    ``coverage (K, m)`` is the share of slot q each model fills. In OT fusion every model
    fills every slot, so ``Lambda_k = w_k``; a slot only some models fill (a partial
    fusion's isolated neuron) averages those alone, so an isolated neuron keeps weight 1.
    """
    share = weights[:, None] * coverage
    total = jnp.sum(share, axis=0, keepdims=True)
    return share / jnp.where(total > 0, total, 1.0)


def received_mass(
    results: Mapping[str, OTResult] | Sequence[Mapping[str, OTResult]], groups: Sequence[str]
) -> dict[str, jax.Array]:
    """``{group: (K, m)}``: the mass each model's plan sends to each of the target's slots."""
    if isinstance(results, Mapping):
        return {g: results[g].plan.sum(axis=-2) for g in groups}
    return {g: jnp.stack([r[g].plan.sum(axis=0) for r in results]) for g in groups}


def combine(
    config: PlanConfig,
    aligned: Mapping[str, jax.Array] | Sequence[Mapping[str, jax.Array]],
    results: Mapping[str, OTResult] | Sequence[Mapping[str, OTResult]],
    weights: jax.Array,
    dtypes: Mapping[str, jnp.dtype],
) -> dict[str, jax.Array]:
    """``sum_k Lambda_k ⊙ aligned_k`` per leaf, ``Lambda`` read on each leaf's output group.

    ``aligned`` and ``results`` are stacked on a leading K axis, or lists of K per-model
    dicts (models of different widths; aligned leaves then share the target's shapes).
    The plan producer turns the mass each plan sends to each slot into coverage.
    """
    spec = config.spec
    if not isinstance(aligned, Mapping):
        aligned = {p: jnp.stack([a[p] for a in aligned]) for p in aligned[0]}
    received = received_mass(results, spec.groups)
    lambdas = {g: slot_weights(config.plans.coverage(g, received[g]), weights) for g in spec.groups}
    fused = weighted_sum({p: x for p, x in aligned.items() if spec[p].output_group is None}, weights, dtypes)
    for leaf in spec.leaves:
        group = leaf.output_group
        if group is None:
            continue
        x = aligned[leaf.path]
        lam = lambdas[group]
        # The output group is the leaf's last view dim, the fastest-varying in C order.
        view = x.reshape(x.shape[0], -1, lam.shape[1])
        out = jnp.einsum("km,kim->im", lam, view, precision=jax.lax.Precision.HIGHEST)
        fused[leaf.path] = out.reshape(x.shape[1:]).astype(dtypes[leaf.path])
    return {p: fused[p] for p in aligned}


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
    return_plans: bool = False,
) -> PyTree | tuple[PyTree, dict[str, OTResult | tuple[OTResult, ...]]]:
    """Fuse K models into one by optimal-transport alignment and weighted averaging.

    ``W_F = sum_k w_k diag(1/beta) T_k^T W^_k`` per layer, where ``T_k`` aligns model k to
    the target (OTFusion, Singh & Jaggi 2020, eqs. 1-3). With ``target`` a model index the
    fused model has that model's widths; with ``target`` a params pytree of other widths
    the models are fused into that architecture (e.g. a pruned one).

    Pure and traceable: ``jax.jit(fuse, static_argnames=...)``, ``lax.scan`` over rounds and
    ``vmap`` over many fusions all work; models of equal widths are aligned under ``vmap``
    so the whole pass is one XLA program. Called eagerly, it warns with
    :class:`jfusion.ConvergenceWarning` when an iterative solver did not converge; under
    ``jit`` a warning cannot see traced flags, so ask for ``return_plans=True`` and check
    ``plans[group].converged`` on the result.

    Args: as :func:`jfusion.align`, plus
      weights: model weights ``w_k`` (K,), normalised to sum to one; uniform by default.
      recalibrate: ``(train_apply, batches)``: recompute the fused model's BatchNorm
        statistics on these batches (see :func:`jfusion.recalibrate_batch_stats`).
      return_plans: also return the plans with their diagnostics, as :func:`jfusion.align`
        does (``{group: OTResult}``); static under ``jit``.

    Returns:
      The fused pytree, with the target's structure, widths and dtypes; with
      ``return_plans``, the pair ``(fused, plans)``.
    """
    problem = prepare(params_list, spec, solver, alignment, metric, target, inputs)
    fused, results = fuse_problem(problem, weights, recalibrate)
    return (fused, group_plans(results, spec.groups)) if return_plans else fused


def fuse_problem(
    problem: Any,
    weights: jax.Array | Sequence[float] | None,
    recalibrate: tuple[TrainApply, jax.Array] | None,
) -> tuple[PyTree, Any]:
    """Align, combine and (optionally) recalibrate a validated problem (see :func:`fuse`).

    Returns the fused pytree and the per-model results (stacked, or a list of dicts).
    """
    spec = problem.config.spec
    w = model_weights(weights, problem.models.num_models)
    aligned, results = align_problem(problem)
    dtypes = (
        problem.models.dtypes
        if problem.target_leaves is None
        else {p: jnp.result_type(x) for p, x in problem.target_leaves.items()}
    )
    fused = combine(problem.config, aligned, results, w, dtypes)
    warn_unconverged(group_plans(results, spec.groups), stacklevel=4)  # user -> fuse -> here
    fused = unflatten(problem.target_treedef, fused)
    if recalibrate is not None:
        train_apply, batches = recalibrate
        fused = recalibrate_batch_stats(train_apply, fused, batches)
    return fused, results


class Barycenter(NamedTuple):
    """Result of :func:`barycenter_fuse` (arrays, so it can leave ``jit``).

    Attributes:
      params: the fused pytree, in the initial estimate's widths and structure.
      iterations: align-and-average steps taken.
      change: relative change ``||F_t - F_{t-1}|| / ||F_{t-1}||`` of the last step.
      converged: ``change <= tolerance`` (False: stopped at ``max_iterations``).
    """

    params: PyTree
    iterations: jax.Array
    change: jax.Array
    converged: jax.Array


def barycenter_fuse(
    params_list: PyTree | Sequence[PyTree],
    spec: Spec,
    *,
    init: int | PyTree = 0,
    widths: Mapping[str, int] | float | None = None,
    solver: Solver = Exact(),
    alignment: str | AlignmentMethod = "weights",
    metric: GroundMetric = GroundMetric(),
    weights: jax.Array | Sequence[float] | None = None,
    inputs: jax.Array | None = None,
    max_iterations: int = 100,
    tolerance: float = 1e-5,
) -> Barycenter:
    """Wasserstein-barycenter fusion: align onto the fused estimate and average, repeatedly.

    ``F_{t+1} = sum_k w_k T~_k(F_t)``, where ``T~_k(F_t)`` is model k aligned onto the
    current estimate, at least once and until ``||F_{t+1} - F_t|| <= tolerance ||F_t||`` or
    ``max_iterations`` (Akash, Li & García Trillos 2022, WB fusion; one step from a model is
    OTFusion). The fused layer is then a barycenter of the K layer measures; its widths are
    the initial estimate's, so they may be smaller or larger than the models'.

    Args: as :func:`jfusion.fuse`, plus
      init: the first estimate: a model index or a params pytree of the target architecture.
      widths: compress the initial estimate to these widths first (``{group: width}`` or a
        multiplier; :func:`jfusion.prune` by merging), i.e. start from "a model fused into
        the target widths".
      max_iterations, tolerance: the stopping rule; the result reports both outcomes, and an
        eager call warns with :class:`jfusion.ConvergenceWarning` when it stopped at the cap.
    """
    models = ModelStack(params_list)
    if isinstance(init, (int, np.integer)) and not isinstance(init, bool):
        if not -models.num_models <= init < models.num_models:
            raise FusionInputError(f"init={init} is not a model index for K={models.num_models} models")
        init = unflatten(models.treedef, models.model(int(init)))
    if widths is not None:
        init = prune(init, spec, widths, method="merge")
    problem = prepare(params_list, spec, solver, alignment, metric, init, inputs)
    w = model_weights(weights, models.num_models)
    params, iterations, change = _barycenter(
        problem.config,
        problem.models.stacked,
        problem.models.models,
        problem.target_leaves,
        inputs,
        w,
        jnp.float32(tolerance),
        problem.models.treedef,
        problem.target_treedef,
        int(max_iterations),
    )
    converged = change <= tolerance
    if not isinstance(converged, jax.core.Tracer) and not bool(converged):
        warnings.warn(
            f"barycenter fusion stopped at max_iterations={max_iterations} with relative change "
            f"{float(change):.3g} > tolerance {tolerance}",
            ConvergenceWarning,
            stacklevel=2,
        )
    return Barycenter(unflatten(problem.target_treedef, params), iterations, change, converged)


@functools.partial(jax.jit, static_argnames=("config", "treedef", "target_treedef", "max_iterations"))
def _barycenter(config, stacked, model_list, start, inputs, weights, tolerance, treedef, target_treedef, max_iterations):
    dtypes = {p: x.dtype for p, x in start.items()}

    def step(estimate):
        aligned, results = align_flat(config, stacked, model_list, estimate, inputs, None, treedef, target_treedef)
        return combine(config, aligned, results, weights, dtypes)

    def norm(tree):
        return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in tree.values()))

    def keep_going(state):
        iteration, change, _ = state
        return (iteration < max_iterations) & ((iteration == 0) | (change > tolerance))

    def iterate(state):
        iteration, _, estimate = state
        new = step(estimate)
        change = norm({p: new[p] - estimate[p] for p in new}) / jnp.maximum(norm(estimate), 1e-30)
        return iteration + 1, change, new

    iteration, change, estimate = jax.lax.while_loop(
        keep_going, iterate, (jnp.int32(0), jnp.float32(jnp.inf), start)
    )
    return estimate, iteration, change
