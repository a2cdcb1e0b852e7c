"""Partial fusion: fuse only each layer's most similar neurons and keep the rest isolated.

Morelli & Eckstein, "Partial Fusion of Neural Networks: Efficient Tradeoffs Between
Ensembles and Weight Aggregation", ICML 2026. With ``alpha`` the fraction of every model's
neurons kept *isolated* (per group), ``alpha = 0`` is OT fusion and ``alpha = 1`` the
ensemble (a block-diagonal network whose logits are the weighted average of the models').

Partial OT by a sink point: with ``s = alpha / (1 + alpha)``, marginals
``a = [(1-s)/n, ..., s]``, ``b = [(1-s)/m, ..., s]`` and the cost extended by a sink
row and column (neuron-sink cost 0, sink-sink ``max(C) + 1``), a fraction ``1 - alpha`` of
each model's mass is transported between neurons; the neurons sending their mass to the
sink -- the worst matched -- stay isolated. Solved exactly, this is the best matching of
``r = n - round(alpha n)`` pairs, found by the Hungarian algorithm on the cost padded with
``n - r`` (and ``m - r``) zero-cost sink copies; with Sinkhorn, the ``round(alpha n)``
neurons sending most mass to the sink are isolated and a neuron split between both keeps
both shares.

Every model is aligned onto the target model (for K = 2 the paper's B). The fused group is
laid out ``[fused | isolated of model 0 | ... | isolated of model K-1]``: a target neuron no
other model matched is the target's own isolated neuron. A slot reached by several models
averages them with their model weights; an isolated slot keeps its model's neuron with
weight 1; the logits are the weighted average. These are plan producers on jfusion's shared
transport and combine, not a parallel implementation: ``alpha = 0`` is exactly
:func:`jfusion.fuse`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jfusion.core.align import prepare, solve_balanced
from jfusion.core.costs import GroundMetric
from jfusion.core.errors import FusionInputError
from jfusion.evaluate import TrainApply
from jfusion.methods.fuse import fuse_problem, received_mass
from jfusion.core.solvers import Exact, OTResult, Solver
from jfusion.core.spec import Spec
from jfusion.core.support import AlignmentMethod
from jfusion.core.transport import permute_groups
from jfusion.core.tree import PyTree, flatten, unflatten


def isolated_count(alpha: float, width: int) -> int:
    """Neurons a model of ``width`` keeps isolated at ``alpha``: ``round(alpha * width)``."""
    return int(round(alpha * width))


def partial_assignment(cost: jax.Array, matched: int) -> tuple[jax.Array, jax.Array]:
    """Exact partial OT with unit masses: the cheapest matching of ``matched`` pairs.

    Returns ``(plan, sink)``: ``plan (n, m)`` has ``1/N`` on the matched pairs
    (``N = n + m - matched``) and ``sink (n,)`` has ``1/N`` for the unmatched source
    neurons. Unmatched rows take zero-cost sink columns and unmatched columns zero-cost sink
    rows; sink-to-sink costs ``max(C) + 1``, so exactly ``matched`` real pairs are formed.
    """
    n, m = cost.shape
    if not 0 <= matched <= min(n, m):
        raise FusionInputError(f"cannot match {matched} pairs between {n} and {m} neurons")
    size = n + m - matched
    if matched == 0:
        return jnp.zeros((n, m), cost.dtype), jnp.full((n,), 1.0 / size, cost.dtype)
    padded = jnp.zeros((size, size), cost.dtype)
    padded = padded.at[:n, :m].set(cost).at[n:, m:].set(jnp.max(cost) + 1.0)
    rows, cols = optax.assignment.hungarian_algorithm(padded)
    full = jnp.zeros((size, size), cost.dtype).at[rows, cols].set(1.0 / size)
    return full[:n, :m], full[:n, m:].sum(axis=1)


def partial_sinkhorn(solver: Solver, cost: jax.Array, alpha: float) -> tuple[jax.Array, jax.Array, OTResult]:
    """The sink-point partial OT problem solved by ``solver``: ``(plan, sink, result)``."""
    n, m = cost.shape
    s = alpha / (1.0 + alpha)
    a = jnp.concatenate([jnp.full((n,), (1.0 - s) / n), jnp.array([s])])
    b = jnp.concatenate([jnp.full((m,), (1.0 - s) / m), jnp.array([s])])
    extended = jnp.zeros((n + 1, m + 1), cost.dtype).at[:n, :m].set(cost).at[n, m].set(jnp.max(cost) + 1.0)
    result = solver(extended, a, b)
    return result.plan[:n, :m], result.plan[:n, m], result


@dataclasses.dataclass(frozen=True)
class PartialPlans:
    """Plan producer of partial fusion (see the module docstring).

    Attributes:
      alphas: ``(group, alpha)`` pairs.
      isolated: ``(group, counts)``: isolated neurons of each aligned model, in order.
      target_widths: ``(group, m)``: the target's widths.
    """

    alphas: tuple[tuple[str, float], ...]
    isolated: tuple[tuple[str, tuple[int, ...]], ...]
    target_widths: tuple[tuple[str, int], ...]

    def out_width(self, group: str) -> int:
        return dict(self.target_widths)[group] + sum(dict(self.isolated)[group])

    def solve(self, solver: Solver, group: str, cost: jax.Array, position: Any) -> OTResult:
        n, m = cost.shape
        alpha = dict(self.alphas)[group]
        counts = dict(self.isolated)[group]
        num_isolated = isolated_count(alpha, n)
        # Plans are scaled so a target neuron's full mass is 1: what a model sends to a
        # slot is then the share of it that model fills (see ``coverage``).
        if num_isolated == 0:
            result = solve_balanced(solver, group, cost)
            plan, sink = result.plan * m, jnp.zeros((n,), cost.dtype)
        elif isinstance(solver, Exact):
            plan, sink = partial_assignment(cost, n - num_isolated)
            size = n + m - (n - num_isolated)
            plan, sink = plan * size, sink * size
            result = OTResult(plan, jnp.sum(plan * cost) / size, jnp.ones((), bool), jnp.zeros((), jnp.int32))
        else:
            plan, sink, result = partial_sinkhorn(solver, cost, alpha)
            scale = m * (1.0 + alpha)  # a target neuron's mass is (1 - s) / m = 1 / (m (1 + alpha))
            plan, sink = plan * scale, sink * scale
        # The neurons sending most mass to the sink take this model's isolated slots.
        _, chosen = jax.lax.top_k(sink, num_isolated)
        chosen = jnp.sort(chosen)
        block = jnp.zeros((n, num_isolated), plan.dtype).at[chosen, jnp.arange(num_isolated)].set(sink[chosen])
        offset = m + jnp.asarray(np.concatenate([[0], np.cumsum(counts)]), jnp.int32)[position]
        full = jnp.zeros((n, self.out_width(group)), plan.dtype).at[:, :m].set(plan)
        full = jax.lax.dynamic_update_slice(full, block, (0, offset))
        return OTResult(full, result.cost, result.converged, result.iterations)

    def target_result(self, group: str, width: int) -> OTResult:
        plan = jnp.zeros((width, self.out_width(group)), jnp.float32).at[:, :width].set(jnp.eye(width))
        return OTResult(plan, jnp.zeros((), jnp.float32), jnp.ones((), bool), jnp.zeros((), jnp.int32))

    def coverage(self, group: str, received: jax.Array) -> jax.Array:
        if sum(dict(self.isolated)[group]) == 0:
            return jnp.ones_like(received)  # nothing isolated: OT fusion's plain model weights
        # The target fills its own slots (1 each) and a model its isolated slots; a model's
        # share of a target slot is the mass it sends there (a soft plan leaks a little).
        fills = jnp.max(received, axis=0, keepdims=True)
        return jnp.clip(received / jnp.where(fills > 0, fills, 1.0), 0.0, 1.0)


class PartialFusion(NamedTuple):
    """Result of :func:`partial_fuse` (every field an array, so it can leave ``jit``).

    Attributes:
      params: the fused pytree; group ``g`` has ``m_g + sum_k round(alpha_g n_k)`` neurons.
      owners: ``{group: (width,) int}``: -1 for a neuron fused from several models, else
        the model whose isolated neuron it is; ordered ``[fused | model 0 | model 1 | ...]``.
      num_parameters: total parameter count of ``params``.
      num_nonzero: non-zero parameters (isolated blocks leave zeros between models).
    """

    params: PyTree
    owners: dict[str, jax.Array]
    num_parameters: jax.Array
    num_nonzero: jax.Array


def _alphas(alpha: float | Mapping[str, float], spec: Spec) -> dict[str, float]:
    alphas = {g: float(alpha) for g in spec.groups} if not isinstance(alpha, Mapping) else dict(alpha)
    unknown = set(alphas) - set(spec.groups)
    if unknown:
        raise FusionInputError(f"alpha names groups {sorted(unknown)} that the spec does not have ({spec.groups})")
    for g in spec.groups:
        alphas.setdefault(g, 0.0)
        if not 0.0 <= alphas[g] <= 1.0:
            raise FusionInputError(f"alpha for group {g!r} is {alphas[g]}; it must be in [0, 1]")
    return alphas


def _owners(coverage: jax.Array) -> jax.Array:
    """-1 where several models fill at least half a slot each, else the model filling most."""
    shared = jnp.sum(coverage >= 0.5, axis=0) > 1
    return jnp.where(shared, -1, jnp.argmax(coverage, axis=0))


def partial_fuse(
    params_list: PyTree | Sequence[PyTree],
    spec: Spec,
    alpha: float | Mapping[str, float],
    *,
    solver: Solver = Exact(),
    alignment: str | AlignmentMethod = "weights",
    metric: GroundMetric = GroundMetric(),
    weights: jax.Array | Sequence[float] | None = None,
    target: int = -1,
    inputs: jax.Array | None = None,
    recalibrate: tuple[TrainApply, jax.Array] | None = None,
) -> PartialFusion:
    """Fuse the most similar neurons of K models and keep a fraction ``alpha`` of each isolated.

    Per group ``g``, every model ``k`` other than the target is partially aligned onto the
    target: ``n_k (1 - alpha_g)`` of its neurons are fused, ``round(alpha_g n_k)`` stay
    isolated in slots of their own. ``alpha = 0`` gives :func:`jfusion.fuse`; ``alpha = 1``
    the block-diagonal ensemble whose logits are ``sum_k w_k f_k(x)``. Hidden widths grow
    from ``m`` to ``m + sum_k round(alpha n_k)``; non-zero parameters per hidden layer from
    1x to Kx (Morelli & Eckstein 2026, §3).

    Args: as :func:`jfusion.fuse`, plus
      alpha: the isolated fraction, one value or ``{group: alpha}`` (missing groups: 0).
      target: index of the model the others are aligned onto (default: the last, the
        paper's B).

    Returns:
      A :class:`PartialFusion` with the fused params, each slot's owner and the parameter
      counts.
    """
    if isinstance(target, bool) or not isinstance(target, (int, np.integer)):
        raise FusionInputError("partial fusion aligns onto one of the models: target must be a model index")
    alphas = _alphas(alpha, spec)
    problem = prepare(params_list, spec, solver, alignment, metric, target, inputs)
    models = problem.models
    widths = [spec.validate(models.shapes(k), f"model {k}") for k in range(models.num_models)]
    others = [k for k in range(models.num_models) if k != problem.target_index]
    target_widths = widths[problem.target_index]
    for g in spec.groups:
        for k in others:
            fused_count = widths[k][g] - isolated_count(alphas[g], widths[k][g])
            if fused_count > target_widths[g]:
                raise FusionInputError(
                    f"group {g!r}: model {k} would fuse {fused_count} neurons onto the target's "
                    f"{target_widths[g]}; raise alpha or choose a wider target"
                )
    plans = PartialPlans(
        alphas=tuple(alphas.items()),
        isolated=tuple((g, tuple(isolated_count(alphas[g], widths[k][g]) for k in others)) for g in spec.groups),
        target_widths=tuple(target_widths.items()),
    )
    problem = dataclasses.replace(problem, config=dataclasses.replace(problem.config, plans=plans))
    fused, results = fuse_problem(problem, weights, recalibrate)
    received = received_mass(results, spec.groups)
    # Put every group's slots in the order [fused | isolated of model 0 | model 1 | ...].
    owners = {g: _owners(plans.coverage(g, received[g])) for g in spec.groups}
    orders = {g: jnp.argsort(owners[g], stable=True) for g in spec.groups}
    leaves, treedef = flatten(fused)
    widths = spec.validate({p: x.shape for p, x in leaves.items()})
    fused = unflatten(treedef, permute_groups(leaves, spec, orders, widths))
    owners = {g: owners[g][orders[g]] for g in spec.groups}
    leaves = jax.tree.leaves(fused)
    return PartialFusion(
        fused,
        owners,
        jnp.asarray(sum(int(np.prod(x.shape)) for x in leaves)),
        sum(jnp.count_nonzero(x) for x in leaves),
    )
