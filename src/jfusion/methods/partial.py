"""Partial fusion: fuse only each layer's most similar neurons and keep the rest isolated.

Morelli & Eckstein, "Partial Fusion of Neural Networks: Efficient Tradeoffs Between
Ensembles and Weight Aggregation", ICML 2026. With ``alpha`` the fraction of every model's
neurons kept *isolated* (per group), ``alpha = 0`` is OT fusion and ``alpha = 1`` the
ensemble (a block-diagonal network whose logits are the weighted average of the models').

Partial OT is what every solver offers (``partial`` of :class:`jfusion.Solver`): a
fraction ``1 - alpha`` of each model's mass is transported between neurons and the rest goes
to a sink; the neurons sending their mass to the sink -- the worst matched -- stay isolated. Solved exactly, this is the best matching of
``n - round(alpha n)`` pairs; with Sinkhorn (the sink-point formulation), the
``round(alpha n)`` neurons sending most mass to the sink are isolated and a neuron split
between both keeps both shares.

Every model is aligned onto the target model (``target``, default 0). The fused group is
laid out ``[fused | isolated of each other model, in order]``: a target neuron no other
model matched is the target's own isolated neuron. A slot reached by several models
averages them with their model weights; an isolated slot keeps its model's neuron with
weight 1; the logits are the weighted average. This is a plan producer on jfusion's shared
engine, not a parallel implementation: ``alpha = 0`` is exactly :func:`jfusion.fuse`.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jfusion.core.align import prepare, run
from jfusion.core.costs import GroundMetric, resolve_metric
from jfusion.core.errors import FusionInputError
from jfusion.core.plans import solve_balanced
from jfusion.core.solvers import OTResult, Solver, resolve_solver
from jfusion.core.spec import Spec
from jfusion.core.support import AlignmentMethod
from jfusion.core.transport import permute_groups
from jfusion.core.tree import PyTree, flatten, unflatten


def isolated_count(alpha: float, width: int) -> int:
    """Neurons a model of ``width`` keeps isolated at ``alpha``: ``round(alpha * width)``."""
    return int(round(alpha * width))


@dataclasses.dataclass(frozen=True)
class PartialPlans:
    """Plan producer of partial fusion (see the module docstring).

    Attributes:
      solver, metric: how each model's neurons are matched to the target's.
      alphas: ``(group, alpha)`` pairs.
      isolated: ``(group, counts)``: the isolated neurons of every model, in model order
        (0 for the target, whose unmatched neurons keep their own slots).
    """

    solver: Solver
    metric: GroundMetric
    alphas: tuple[tuple[str, float], ...]
    isolated: tuple[tuple[str, tuple[int, ...]], ...]

    def output_width(self, group: str, reference_width: int) -> int:
        return reference_width + sum(dict(self.isolated)[group])

    def reference_plan(self, group: str, support: jax.Array) -> OTResult | None:
        m = support.shape[0]
        if self.output_width(group, m) == m:
            return None
        plan = jnp.zeros((m, self.output_width(group, m)), jnp.float32).at[:, :m].set(jnp.eye(m))
        return OTResult(plan, jnp.zeros((), jnp.float32), jnp.ones((), bool), jnp.zeros((), jnp.int32))

    def plan(self, group: str, support: jax.Array, reference_support: jax.Array, model: jax.Array) -> OTResult:
        n, m = support.shape[0], reference_support.shape[0]
        num_isolated = isolated_count(dict(self.alphas)[group], n)
        # Plans are scaled so a target neuron's full mass is 1: what a model sends to a
        # slot is then the share of it that model fills (see ``coverage``).
        if num_isolated == 0:
            result = solve_balanced(self.solver, self.metric, group, support, reference_support)
            plan, sink = result.plan * m, jnp.zeros((n,), jnp.float32)
        else:
            try:
                result, sink = self.solver.partial(self.metric(support, reference_support), num_isolated)
            except FusionInputError as err:
                raise FusionInputError(f"group {group!r}: {err}") from None
            plan = result.plan
        # The neurons sending most mass to the sink take this model's isolated slots.
        _, chosen = jax.lax.top_k(sink, num_isolated)
        chosen = jnp.sort(chosen)
        block = jnp.zeros((n, num_isolated), plan.dtype).at[chosen, jnp.arange(num_isolated)].set(sink[chosen])
        counts = dict(self.isolated)[group]
        offset = m + jnp.asarray(np.concatenate([[0], np.cumsum(counts)]), jnp.int32)[model]
        full = jnp.zeros((n, self.output_width(group, m)), plan.dtype).at[:, :m].set(plan)
        full = jax.lax.dynamic_update_slice(full, block, (0, offset))
        return result._replace(plan=full)

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
      plans: ``{group: OTResult}``, as :class:`jfusion.Fusion`'s (slots before reordering).
      owners: ``{group: (width,) int}``: -1 for a neuron fused from several models, else
        the model whose isolated neuron it is; ordered ``[fused | model 0 | model 1 | ...]``.
      num_parameters: total parameter count of ``params``.
      num_nonzero: non-zero parameters (isolated blocks leave zeros between models).
    """

    params: PyTree
    plans: dict[str, OTResult]
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
    solver: str | Solver = "exact",
    alignment: str | AlignmentMethod = "weights",
    metric: str | GroundMetric = "euclidean",
    model_weights: jax.Array | Sequence[float] | None = None,
    target: int = 0,
    inputs: jax.Array | None = None,
) -> PartialFusion:
    """Fuse the most similar neurons of K models and keep a fraction ``alpha`` of each isolated.

    Per group ``g``, every model ``k`` other than the target is partially aligned onto the
    target: ``n_k (1 - alpha_g)`` of its neurons are fused, ``round(alpha_g n_k)`` stay
    isolated in slots of their own. ``alpha = 0`` gives :func:`jfusion.fuse`; ``alpha = 1``
    the block-diagonal ensemble whose logits are ``sum_k w_k f_k(x)``. Hidden widths grow
    from ``m`` to ``m + sum_k round(alpha n_k)``; non-zero parameters per hidden layer from
    1x to Kx (Morelli & Eckstein 2026, §3).

    The other arguments are :func:`jfusion.fuse`'s.

    Args:
      alpha: the isolated fraction, one value or ``{group: alpha}`` (missing groups: 0).
      target: index of the model the others are aligned onto (default 0, as everywhere).

    Returns:
      A :class:`PartialFusion` with the fused params, its plans, each slot's owner and the
      parameter counts.

    Examples:
      Two networks of 8 hidden neurons at ``alpha = 0.5``: 4 neurons of each stay isolated,
      the other 4 pairs are fused, so the fused layer has 4 + 4 + 4 neurons.

      >>> import jax, jax.numpy as jnp, jfusion
      >>> from jfusion.models import MLP, mlp_spec
      >>> model, x, spec = MLP((8, 3)), jnp.ones((1, 4)), mlp_spec(2)  # 4 -> 8 (group h0) -> 3
      >>> params = model.init(jax.random.key(0), x)
      >>> other = model.init(jax.random.key(1), x)
      >>> result = jfusion.partial_fuse([params, other], spec, alpha=0.5)
      >>> result.params["params"]["Dense_0"]["kernel"].shape
      (4, 12)
      >>> result.owners["h0"]  # -1: fused from both; k: model k's isolated neuron
      Array([-1, -1, -1, -1,  0,  0,  0,  0,  1,  1,  1,  1], dtype=int32)

    References:
      - Fabian Morelli and Stephan Eckstein. *Partial Fusion of Neural Networks: Efficient
        Tradeoffs Between Ensembles and Weight Aggregation.* ICML 2026, arXiv:2605.22350.
    """
    if isinstance(target, bool) or not isinstance(target, (int, np.integer)):
        raise FusionInputError("partial fusion aligns onto one of the models: target must be a model index")
    alphas = _alphas(alpha, spec)
    solver, metric = resolve_solver(solver), resolve_metric(metric)
    # Widths first, then the producer they decide.
    shape_problem = prepare(params_list, spec, None, alignment=alignment, target=target, inputs=inputs)
    config = shape_problem.config
    widths = [dict(w) for w in config.model_widths]
    reference = config.reference
    counts = {
        g: tuple(0 if k == reference else isolated_count(alphas[g], widths[k][g]) for k in range(len(widths)))
        for g in spec.groups
    }
    for g in spec.groups:
        for k, count in enumerate(counts[g]):
            if k != reference and widths[k][g] - count > widths[reference][g]:
                raise FusionInputError(
                    f"group {g!r}: model {k} would fuse {widths[k][g] - count} neurons onto the target's "
                    f"{widths[reference][g]}; raise alpha or choose a wider target"
                )
    producer = PartialPlans(solver, metric, tuple(alphas.items()), tuple(counts.items()))
    problem = shape_problem.with_producer(producer)
    fused, out = run(problem, model_weights)
    # Put every group's slots in the order [fused | isolated of model 0 | model 1 | ...].
    # Eager: one jitted permutation of a whole ResNet compiles for far longer than its ops.
    owners = {g: _owners(producer.coverage(g, out.received[g])) for g in spec.groups}
    orders = {g: jnp.argsort(owners[g], stable=True) for g in spec.groups}
    leaves, treedef = flatten(fused)
    fused = unflatten(treedef, permute_groups(leaves, spec, orders, problem.config.output_widths))
    owners = {g: owners[g][orders[g]] for g in spec.groups}
    leaves = jax.tree.leaves(fused)
    return PartialFusion(
        fused,
        out.plans,
        owners,
        jnp.asarray(sum(int(np.prod(x.shape)) for x in leaves)),
        sum(jnp.count_nonzero(x) for x in leaves),
    )
