"""Generalized pruning: shrink a network to any widths by merging or deleting neurons.

Morelli & Eckstein (ICML 2026, §4) view fusion as pruning an ensemble network: per group,
the neurons are clustered into the width budget, a cluster's incoming weights are averaged
and its outgoing weights summed -- exact when the members are identical, so a network whose
neurons were duplicated compresses back to the original. Deleting a neuron (structured
pruning), keeping it alone (a singleton cluster) and linearly combining neurons are all
special cases of such a plan. Applied to the block-diagonal ensemble network
(:func:`jfusion.partial_fuse` with ``alpha = 1``) it gives the partial-fusion trade-off;
applied to one network it compresses it.

A plan producer on the shared engine whose reference is the network itself: clusters are
found group by group in topological order on the same supports as alignment (incoming
weights after the already-clustered input groups are merged, or activations -- with every
option of :class:`jfusion.ByWeights` and :class:`jfusion.ByActivations`):
Lloyd's k-means from farthest-point seeds (the first seed is the largest-norm neuron).
Structured pruning keeps the neurons with the largest L1 norm of incoming weights
(Li et al. 2017; OTFusion §5.2 then fuses the dense model into the pruned one:
``fuse([pruned, dense], spec, target=0, solver="sinkhorn")``).
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Mapping

import jax
import jax.numpy as jnp

from jfusion.core.align import prepare, run
from jfusion.core.costs import GroundMetric
from jfusion.core.errors import FusionInputError
from jfusion.core.solvers import OTResult
from jfusion.core.spec import Spec
from jfusion.core.support import AlignmentMethod
from jfusion.core.tree import PyTree
from jfusion.methods.fuse import Fusion


def _sq_distances(x: jax.Array, centers: jax.Array) -> jax.Array:
    return jnp.maximum(GroundMetric("sqeuclidean")(x, centers), 0.0)


def farthest_point_seeds(x: jax.Array, count: int) -> jax.Array:
    """Indices of ``count`` rows of ``x``: the largest-norm row, then each farthest from those chosen."""
    first = jnp.argmax(jnp.sum(x * x, axis=1))
    nearest = _sq_distances(x, x[first][None])[:, 0]
    seeds = jnp.zeros((count,), jnp.int32).at[0].set(first)

    def add(i, state):
        seeds, nearest = state
        chosen = jnp.argmax(nearest)
        return seeds.at[i].set(chosen), jnp.minimum(nearest, _sq_distances(x, x[chosen][None])[:, 0])

    seeds, _ = jax.lax.fori_loop(1, count, add, (seeds, nearest))
    return seeds


def kmeans(x: jax.Array, count: int, iterations: int) -> jax.Array:
    """Cluster of every row of ``x`` (``(n,)`` ints in ``[0, count)``), no cluster empty.

    Lloyd's iterations from :func:`farthest_point_seeds`. A cluster emptied on the way takes
    the point farthest from its centre among clusters that can spare one.
    """
    centers = x[farthest_point_seeds(x, count)]

    def assign(centers):
        return jnp.argmin(_sq_distances(x, centers), axis=1)

    def lloyd(_, centers):
        members = jax.nn.one_hot(assign(centers), count, dtype=x.dtype)
        sizes = members.sum(axis=0)
        means = (members.T @ x) / jnp.maximum(sizes, 1.0)[:, None]
        return jnp.where(sizes[:, None] > 0, means, centers)

    centers = jax.lax.fori_loop(0, iterations, lloyd, centers)
    labels = assign(centers)
    sizes = jnp.bincount(labels, length=count)
    spare = jnp.where(sizes[labels] > 1, jnp.sum((x - centers[labels]) ** 2, axis=1), -jnp.inf)
    rank = jnp.argsort(jnp.argsort(-spare))  # 0 for the point that can best be spared
    empty_first = jnp.argsort(sizes > 0, stable=True)
    return jnp.where(rank < jnp.sum(sizes == 0), empty_first[jnp.minimum(rank, count - 1)], labels)


def cluster_plan(support: jax.Array, width: int, method: str, iterations: int) -> jax.Array:
    """The ``(n, width)`` plan of one group: clusters (merge) or kept neurons (delete)."""
    n = support.shape[0]
    if method == "delete":
        kept = jnp.sort(jax.lax.top_k(jnp.sum(jnp.abs(support), axis=1), width)[1])
        return jnp.zeros((n, width), jnp.float32).at[kept, jnp.arange(width)].set(1.0 / n)
    return jax.nn.one_hot(kmeans(support, width, iterations), width, dtype=jnp.float32) / n


@dataclasses.dataclass(frozen=True)
class ClusterPlans:
    """Generalized pruning's producer: the reference's own neurons clustered into ``widths``.

    Its only model is the reference, so :meth:`plan` is never asked for.
    """

    widths: tuple[tuple[str, int], ...]
    method: Literal["merge", "delete"] = "merge"
    iterations: int = 20

    def output_width(self, group: str, reference_width: int) -> int:
        return dict(self.widths)[group]

    def reference_plan(self, group: str, support: jax.Array) -> OTResult:
        plan = cluster_plan(support, dict(self.widths)[group], self.method, self.iterations)
        return OTResult(plan, jnp.zeros((), jnp.float32), jnp.ones((), bool), jnp.zeros((), jnp.int32))

    def plan(self, group: str, support: jax.Array, reference_support: jax.Array, model: jax.Array) -> OTResult:
        raise NotImplementedError("pruning has one model, the reference; it has no other plans")

    def coverage(self, group: str, received: jax.Array) -> jax.Array:
        return jnp.ones_like(received)


def _widths(widths: Mapping[str, int] | float, current: Mapping[str, int], spec: Spec) -> dict[str, int]:
    if not isinstance(widths, Mapping):
        if not 0.0 < float(widths) <= 1.0:
            raise FusionInputError(f"a width multiplier must be in (0, 1], got {widths}")
        return {g: max(1, int(round(float(widths) * n))) for g, n in current.items()}
    unknown = set(widths) - set(spec.groups)
    if unknown:
        raise FusionInputError(f"widths names groups {sorted(unknown)} that the spec does not have ({spec.groups})")
    new = {**current, **{g: int(w) for g, w in widths.items()}}
    for g, w in new.items():
        if not 1 <= w <= current[g]:
            raise FusionInputError(f"group {g!r}: cannot prune {current[g]} neurons to {w}; pruning only shrinks")
    return new


def prune(
    params: PyTree,
    spec: Spec,
    widths: Mapping[str, int] | float,
    *,
    method: Literal["merge", "delete"] = "merge",
    iterations: int = 20,
    alignment: str | AlignmentMethod = "weights",
    inputs: jax.Array | None = None,
) -> Fusion:
    """Compress one network to ``widths`` by merging similar neurons or deleting weak ones.

    Args:
      params: the network's variables.
      spec: its layer topology.
      widths: ``{group: new width}`` (other groups keep theirs) or one multiplier in
        ``(0, 1]`` for every group.
      method: ``"merge"``: k-means clusters, a cluster's incoming weights averaged and its
        outgoing weights summed; ``"delete"``: keep the neurons whose supports have the
        largest L1 norm -- incoming weights (structured pruning), or activations.
      iterations: Lloyd iterations of ``"merge"``.
      alignment: the supports clustered: ``"weights"``, :class:`jfusion.ByWeights` (e.g.
        ``sweeps=2`` for residual streams and recurrent kernels) or
        :class:`jfusion.ByActivations`.
      inputs: the batch for activation supports.

    Returns:
      A :class:`jfusion.Fusion`: the compressed pytree (same structure, smaller groups)
      and each group's cluster plan (with a leading axis of one model). Jitted; pure.

    Examples:
      Merge 8 hidden neurons into 4, or keep the 4 of largest norm:

      >>> import jax, jax.numpy as jnp, jfusion
      >>> from jfusion.models import MLP, mlp_spec
      >>> model, x, spec = MLP((8, 3)), jnp.ones((1, 4)), mlp_spec(2)  # 4 -> 8 (group h0) -> 3
      >>> params = model.init(jax.random.key(0), x)
      >>> merged = jfusion.prune(params, spec, {"h0": 4}).params
      >>> merged["params"]["Dense_0"]["kernel"].shape, merged["params"]["Dense_1"]["kernel"].shape
      ((4, 4), (4, 3))
      >>> jfusion.prune(params, spec, 0.5, method="delete").params["params"]["Dense_0"]["bias"].shape
      (4,)

    References:
      - Fabian Morelli and Stephan Eckstein. *Partial Fusion of Neural Networks: Efficient
        Tradeoffs Between Ensembles and Weight Aggregation.* ICML 2026, arXiv:2605.22350.
      - Hao Li, Asim Kadav, Igor Durdanovic, Hanan Samet and Hans Peter Graf. *Pruning
        Filters for Efficient ConvNets.* ICLR 2017 (deletion by L1 norm).
    """
    if method not in ("merge", "delete"):
        raise FusionInputError(f"method must be 'merge' or 'delete', not {method!r}")
    problem = prepare([params], spec, None, alignment=alignment, target=0, inputs=inputs)
    current = dict(problem.config.reference_widths)
    producer = ClusterPlans(tuple(_widths(widths, current, problem.config.spec).items()), method, int(iterations))
    fused, out = run(problem.with_producer(producer))
    return Fusion(fused, out.plans)
