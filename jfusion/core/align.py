"""Group-by-group plans: align one model's neurons onto a target's.

For every group in topological order (OTFusion Algorithm 1): build the model's and the
target's supports, compute the ground cost, and solve OT between uniform measures
``a = 1/n_k`` and ``b = 1/m``. With weight alignment, each group's support sees the plans of
the groups feeding it (past correction).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jfusion.core.costs import GroundMetric
from jfusion.core.errors import ConvergenceWarning, FusionInputError
from jfusion.core.solvers import Exact, OTResult, Solver
from jfusion.core.spec import Spec
from jfusion.core.support import (
    Activations,
    AlignmentMethod,
    activation_support,
    resolve_alignment,
    weight_support,
)
from jfusion.core.transport import GroupMap, group_map, transport_model
from jfusion.core.tree import ModelStack, PyTree, first_difference, flatten, unflatten


def _uniform(n: int) -> jax.Array:
    return jnp.full((n,), 1.0 / n, jnp.float32)


def _identity_result(n: int) -> OTResult:
    return OTResult(
        jnp.eye(n, dtype=jnp.float32) / n,
        jnp.zeros((), jnp.float32),
        jnp.ones((), bool),
        jnp.zeros((), jnp.int32),
    )


def solve_balanced(solver: Solver, group: str, cost: jax.Array) -> OTResult:
    """OT between uniform measures on the cost's rows and columns."""
    n, m = cost.shape
    try:
        return solver(cost, _uniform(n), _uniform(m))
    except FusionInputError as err:
        raise FusionInputError(f"group {group!r}: {err}") from None


@dataclasses.dataclass(frozen=True)
class OTPlans:
    """OT fusion's plans: each model's neurons onto the target's, balanced (OTFusion).

    A *plan producer* decides what a group's plan is given the cost between a model's and the
    target's neurons; transport and combine are shared by every method. Producers are
    frozen dataclasses (static under ``jit``) with two methods:

    * ``solve(solver, group, cost, position) -> OTResult``: the plan ``(n_k, m_out)`` of the
      model at ``position`` among the aligned models (a traced int under ``vmap``);
    * ``target_result(group, width) -> OTResult | None``: the plan ``(m, m_out)`` of the
      model the target was taken from, None when it is the identity;
    * ``coverage(group, received) -> (K, m_out)``: from the mass ``received (K, m_out)`` each
      model's plan sends to each slot, the share of the slot each model fills; combine
      weights model k in slot q by ``w_k coverage_k[q]``.
    """

    def solve(self, solver: Solver, group: str, cost: jax.Array, position: Any) -> OTResult:
        return solve_balanced(solver, group, cost)

    def target_result(self, group: str, width: int) -> OTResult | None:
        return None

    def coverage(self, group: str, received: jax.Array) -> jax.Array:
        # Balanced plans fill every slot of every model: plain model weights.
        return jnp.ones_like(received)


@dataclasses.dataclass(frozen=True)
class PlanConfig:
    """Everything static about how plans are found (hashable: a ``jit`` static argument)."""

    spec: Spec
    solver: Solver
    alignment: AlignmentMethod
    metric: GroundMetric
    plans: Any = OTPlans()


def solve_model_plans(
    config: PlanConfig,
    leaves: Mapping[str, jax.Array],
    widths: Mapping[str, int],
    target_leaves: Mapping[str, jax.Array],
    target_widths: Mapping[str, int],
    activations: Mapping[str, jax.Array] | None = None,
    target_activations: Mapping[str, jax.Array] | None = None,
    position: Any = 0,
    target_maps: Mapping[str, GroupMap] | None = None,
) -> tuple[dict[str, OTResult], dict[str, GroupMap]]:
    """Plans sending one model's groups onto the target's, and the maps they induce.

    ``target_maps`` carries the target into the output layout when that is wider than the
    target (partial fusion), so both supports are read in one basis.
    """
    spec = config.spec
    results: dict[str, OTResult] = {}
    maps: dict[str, GroupMap] = {}
    by_weights = not isinstance(config.alignment, Activations)
    sweeps = config.alignment.sweeps if by_weights else 1
    for _ in range(sweeps):
        for group in spec.groups:
            if by_weights:
                # Plans from this sweep, or the previous one for groups not yet redone.
                solved, outgoing = set(maps), config.alignment.outgoing
                x = weight_support(leaves, spec, group, widths, maps, solved, outgoing)
                y = weight_support(
                    target_leaves, spec, group, target_widths, target_maps or {}, solved, outgoing
                )
            else:
                x = activation_support(activations, group, widths[group])
                y = activation_support(target_activations, group, target_widths[group])
            results[group] = config.plans.solve(config.solver, group, config.metric(x, y), position)
            maps[group] = group_map(results[group].plan)
    return results, maps


def _target_alignment(config, leaves, widths):
    """The target model's own plans (the identity unless the layout is wider) and leaves."""
    results, maps = {}, {}
    for group in config.spec.groups:
        result = config.plans.target_result(group, widths[group])
        if result is None:
            results[group] = _identity_result(widths[group])
        else:
            results[group], maps[group] = result, group_map(result.plan)
    aligned = transport_model(leaves, config.spec.leaves, maps, widths)
    return aligned, results, maps


class Alignment(NamedTuple):
    """Result of :func:`align`.

    Attributes:
      aligned: every model transported onto the target's neurons, in the target's widths
        and tree structure: one pytree stacked along a leading K axis when the models were
        given stacked, else a list of K pytrees.
      plans: ``{group: OTResult}``; each field has a leading K axis when the models share
        their widths, else it is a tuple of K per-model results.
    """

    aligned: PyTree
    plans: dict[str, OTResult]


@dataclasses.dataclass(frozen=True)
class _Problem:
    """Validated inputs of an alignment: the jitted core's static and array arguments."""

    config: PlanConfig
    models: ModelStack
    target_index: int | None
    target_leaves: dict[str, jax.Array] | None
    target_treedef: Any
    inputs: jax.Array | None


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_finite(leaves: Mapping[str, Any], what: str, model_axis: bool = False) -> None:
    """Raise on NaN/Inf in concrete leaves (traced ones cannot be inspected)."""
    checked = {
        path: x
        for path, x in leaves.items()
        if _is_concrete(x) and jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    }
    if not checked:
        return
    # One reduction per leaf on the device and one transfer; details only for a bad leaf.
    finite = np.asarray(jnp.stack([jnp.all(jnp.isfinite(x)) for x in checked.values()]))
    for (path, x), ok in zip(checked.items(), finite):
        if not ok:
            index = np.argwhere(~np.isfinite(np.asarray(x)))[0].tolist()
            name = f"model {index.pop(0)}" if model_axis else what
            raise FusionInputError(
                f"{name}: leaf {path} has NaN or Inf values (first at index {index}); "
                f"fusion would spread them to every neuron they are averaged into"
            )


def prepare(
    params_list: PyTree | Sequence[PyTree],
    spec: Spec,
    solver: Solver,
    alignment: str | AlignmentMethod,
    metric: GroundMetric,
    target: int | PyTree,
    inputs: jax.Array | None,
    plans: Any = OTPlans(),
) -> _Problem:
    """Validate everything that can be checked before tracing; raise named errors."""
    if not isinstance(spec, Spec):
        raise TypeError(f"spec must be a jfusion.Spec, not {type(spec).__name__}; wrap your dict in Spec(...)")
    config = PlanConfig(spec, solver, resolve_alignment(alignment), metric, plans)
    models = ModelStack(params_list)
    num = models.num_models
    all_widths = [spec.validate(models.shapes(k), f"model {k}") for k in range(num)]
    if models.stacked is not None:
        _check_finite(models.stacked, "models", model_axis=True)
    else:
        for k, leaves in enumerate(models.models):
            _check_finite(leaves, f"model {k}")
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
        if not -num <= target < num:
            raise FusionInputError(f"target={target} is not a model index for K={num} models")
        target_index, target_leaves, target_treedef = int(target) % num, None, models.treedef
        target_shapes, target_widths = models.shapes(target_index), all_widths[target_index]
    else:
        target_index = None
        target_leaves, target_treedef = flatten(target)
        if set(target_leaves) != set(models.paths):
            raise FusionInputError(
                f"target has a different tree from the models: {first_difference(models.model(0), target_leaves)}"
            )
        target_leaves = {p: jnp.asarray(target_leaves[p]) for p in models.paths}
        target_shapes = {p: tuple(x.shape) for p, x in target_leaves.items()}
        target_widths = spec.validate(target_shapes, "target")
        _check_finite(target_leaves, "target")
    for k in range(num):
        shapes = models.shapes(k)
        for leaf in spec.leaves:
            expected = leaf.shape_for(shapes[leaf.path], all_widths[k], target_widths)
            found = target_shapes[leaf.path]
            for axis, (e, f) in enumerate(zip(expected, found)):
                if e != f:
                    raise FusionInputError(
                        f"model {k}: {leaf.path} axis {axis} has size {shapes[leaf.path][axis]}, "
                        f"which maps to {e} in the target, but the target has {f} there; "
                        f"ungrouped axes must agree between models"
                    )
    if isinstance(config.alignment, Activations) and inputs is None:
        raise FusionInputError("activation alignment needs inputs=x, a batch to compute activations on")
    return _Problem(config, models, target_index, target_leaves, target_treedef, inputs)


def _model_activations(config, treedef, leaves, inputs, of_target=False, index=None):
    """Each group's activations of model ``index`` or of the target pytree (None by weights)."""
    alignment = config.alignment
    if not isinstance(alignment, Activations):
        return None
    if of_target and alignment.target_fn is not None:
        fn = alignment.target_fn
    elif index is not None and alignment.model_fns is not None:
        fn = alignment.model_fns[index]
    else:
        fn = alignment.fn
    return dict(fn(unflatten(treedef, leaves), inputs))


@functools.partial(jax.jit, static_argnames=("config", "target_index", "treedef", "target_treedef"))
def align_flat(config, stacked, model_list, target_leaves, inputs, target_index, treedef, target_treedef):
    """The traced core: per-model plans and transported leaves.

    Models of equal widths are aligned under one ``vmap``; the model the target was taken
    from is left out of it (its plans are fixed, and an approximate solver would only blur
    it against itself). ``position`` counts the aligned models in order, skipping it.
    """
    spec = config.spec
    if stacked is None:
        all_widths = [spec.validate({p: x.shape for p, x in leaves.items()}) for leaves in model_list]
        if target_index is not None:
            target_leaves, target_treedef = model_list[target_index], treedef
        target_widths = spec.validate({p: x.shape for p, x in target_leaves.items()})
        target_acts = _model_activations(
            config, target_treedef, target_leaves, inputs, of_target=target_index is None, index=target_index
        )
        target_aligned, target_results, target_maps = _target_alignment(config, target_leaves, target_widths)
        aligned, results = [], []
        others = [k for k in range(len(model_list)) if k != target_index]
        for k, (leaves, widths) in enumerate(zip(model_list, all_widths)):
            if k == target_index:
                aligned.append(target_aligned)
                results.append(target_results)
                continue
            acts = _model_activations(config, treedef, leaves, inputs, index=k)
            res, maps = solve_model_plans(
                config, leaves, widths, target_leaves, target_widths, acts, target_acts,
                others.index(k), target_maps,
            )
            aligned.append(transport_model(leaves, spec.leaves, maps, widths))
            results.append(res)
        return aligned, results

    widths = spec.validate({p: x.shape[1:] for p, x in stacked.items()})
    all_acts = (
        jax.vmap(lambda leaves: _model_activations(config, treedef, leaves, inputs))(stacked)
        if isinstance(config.alignment, Activations)
        else None
    )

    def take(tree, index):
        return jax.tree.map(lambda x: x[index], tree)

    num = next(iter(stacked.values())).shape[0]
    if target_index is None:
        target_widths = spec.validate({p: x.shape for p, x in target_leaves.items()})
        target_acts = _model_activations(config, target_treedef, target_leaves, inputs, of_target=True)
        target_maps = {}
        others = np.arange(num)
    else:
        target_leaves, target_widths = take(stacked, target_index), widths
        target_acts = take(all_acts, target_index)
        itself, itself_results, target_maps = _target_alignment(config, target_leaves, widths)
        others = np.array([k for k in range(num) if k != target_index], dtype=np.int32)

    def align_one(leaves, acts, position):
        results, maps = solve_model_plans(
            config, leaves, widths, target_leaves, target_widths, acts, target_acts, position, target_maps
        )
        return transport_model(leaves, spec.leaves, maps, widths), results

    if others.size:
        aligned = jax.vmap(align_one)(take(stacked, others), take(all_acts, others), jnp.arange(others.size))
    if target_index is None:
        return aligned
    if not others.size:
        return jax.tree.map(lambda x: x[None], (itself, itself_results))
    return jax.tree.map(
        lambda rest, own: jnp.concatenate([rest[:target_index], own[None], rest[target_index:]]),
        aligned,
        (itself, itself_results),
    )


def align_problem(problem: _Problem):
    """Run the jitted core on a prepared problem: ``(aligned leaves, per-model results)``."""
    models = problem.models
    return align_flat(
        problem.config,
        models.stacked,
        models.models,
        problem.target_leaves,
        problem.inputs,
        problem.target_index,
        models.treedef,
        problem.target_treedef,
    )


def align(
    params_list: PyTree | Sequence[PyTree],
    spec: Spec,
    *,
    solver: Solver = Exact(),
    alignment: str | AlignmentMethod = "weights",
    metric: GroundMetric = GroundMetric(),
    target: int | PyTree = 0,
    inputs: jax.Array | None = None,
) -> Alignment:
    """Align every model's neurons onto a target's, group by group (OTFusion Algorithm 1).

    For each group ``l`` in topological order and each model ``k``: supports ``X_k`` (rows
    of the incoming weights after past correction, or activations on ``inputs``) and ``Y``
    of the target; cost ``C = d(X_k, Y)``; plan ``T_k = OT(1/n_k, 1/m, C)``; then every
    leaf is transported, output dims by ``T diag(1/beta)`` and input dims by
    ``diag(1/alpha) T``.

    Args:
      params_list: K pytrees of one structure, or one pytree stacked along a leading K axis.
      spec: the layer topology (:class:`jfusion.Spec`).
      solver: :class:`jfusion.Exact` (default) or :class:`jfusion.Sinkhorn`.
      alignment: ``"weights"``, :class:`jfusion.Weights` or :class:`jfusion.Activations`.
      metric: ground metric between supports.
      target: index of the model to align onto, or a params pytree of the target
        architecture (other widths: fusing into a smaller or larger model).
      inputs: the batch activation alignment runs on.

    Reference: Singh & Jaggi, "Model Fusion via Optimal Transport", NeurIPS 2020.
    """
    problem = prepare(params_list, spec, solver, alignment, metric, target, inputs)
    aligned, results = align_problem(problem)
    if problem.models.stacked is not None:
        aligned = unflatten(problem.target_treedef, aligned)
        if isinstance(params_list, (list, tuple)):
            aligned = [jax.tree.map(lambda x, k=k: x[k], aligned) for k in range(problem.models.num_models)]
    else:
        aligned = [unflatten(problem.target_treedef, a) for a in aligned]
    plans = group_plans(results, spec.groups)
    warn_unconverged(plans)
    return Alignment(aligned, plans)


def group_plans(
    results: Mapping[str, OTResult] | Sequence[Mapping[str, OTResult]], groups: Sequence[str]
) -> dict[str, OTResult | tuple[OTResult, ...]]:
    """``{group: results}``: stacked results as they are, a list of per-model dicts regrouped."""
    if isinstance(results, Mapping):
        return dict(results)
    return {g: tuple(r[g] for r in results) for g in groups}


def warn_unconverged(plans: Mapping[str, OTResult | tuple[OTResult, ...]], stacklevel: int = 3) -> None:
    """Warn (eagerly; a no-op under tracing) about every plan whose solver did not converge.

    ``stacklevel`` points the warning at the user's call: 3 when the public function calls
    this directly.
    """
    for group, result in plans.items():
        per_model = [result] if isinstance(result, OTResult) else result
        flags = [np.atleast_1d(np.asarray(r.converged)) for r in per_model if _is_concrete(r.converged)]
        iters = [np.atleast_1d(np.asarray(r.iterations)) for r in per_model if _is_concrete(r.iterations)]
        if not flags:
            continue
        flags, iters = np.concatenate(flags), np.concatenate(iters)
        if not flags.all():
            bad = np.flatnonzero(~flags).tolist()
            warnings.warn(
                f"group {group!r}: the OT solver did not converge for models {bad} "
                f"(stopped after {', '.join(str(i) for i in iters[bad])} iterations); raise "
                f"max_iterations or epsilon, or use jfusion.Exact()",
                ConvergenceWarning,
                stacklevel=stacklevel,
            )
