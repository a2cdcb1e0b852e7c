"""Generalized pruning: shrink a network to any widths by merging or deleting neurons.

Morelli & Eckstein (ICML 2026, §4) view fusion as pruning an ensemble network: per group,
the neurons are clustered into the width budget, a cluster's incoming weights are averaged
and its outgoing weights summed -- exact when the members are identical, so a network whose
neurons were duplicated compresses back to the original. Deleting a neuron (structured
pruning), keeping it alone (a singleton cluster) and linearly combining neurons are all
special cases of such a plan. Applied to the block-diagonal ensemble network
(:func:`jfusion.partial_fuse` with ``alpha = 1``) it gives the partial-fusion trade-off;
applied to one network it compresses it.

Clusters are found group by group in topological order on the same supports as alignment
(incoming weights after the already-clustered input groups are merged, or activations):
Lloyd's k-means from farthest-point seeds (the first seed is the largest-norm neuron).
Structured pruning keeps the neurons with the largest L1 norm of incoming weights
(Li et al. 2017; OTFusion §5.2 then fuses the dense model into the pruned one:
``fuse([pruned, dense], spec, target=0, solver=Sinkhorn())``).
"""

from __future__ import annotations

import functools
from typing import Literal, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jfusion.core.costs import GroundMetric
from jfusion.core.errors import FusionInputError
from jfusion.core.spec import Spec
from jfusion.core.support import (
    Activations,
    AlignmentMethod,
    activation_support,
    resolve_alignment,
    weight_support,
)
from jfusion.core.transport import group_map, transport_model
from jfusion.core.tree import PyTree, flatten, unflatten


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
) -> PyTree:
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
      alignment: the supports clustered: ``"weights"`` or :class:`jfusion.Activations`.
      inputs: the batch for activation supports.

    Returns:
      The compressed pytree (same structure, smaller groups). Jitted; pure.
    """
    if method not in ("merge", "delete"):
        raise FusionInputError(f"method must be 'merge' or 'delete', not {method!r}")
    leaves, treedef = flatten(params)
    current = spec.validate({p: np.shape(x) for p, x in leaves.items()}, "params")
    new_widths = _widths(widths, current, spec)
    alignment = resolve_alignment(alignment)
    if isinstance(alignment, Activations) and inputs is None:
        raise FusionInputError("activation supports need inputs=x, a batch to compute activations on")
    pruned = _prune(
        spec, treedef, tuple(sorted(new_widths.items())), method, iterations, alignment,
        {p: jnp.asarray(x) for p, x in leaves.items()}, inputs,
    )
    return unflatten(treedef, {p: pruned[p].astype(jnp.result_type(x)) for p, x in leaves.items()})


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _prune(spec, treedef, new_widths, method, iterations, alignment, leaves, inputs):
    new_widths = dict(new_widths)
    widths = spec.validate({p: x.shape for p, x in leaves.items()})
    activations = (
        dict(alignment.fn(unflatten(treedef, leaves), inputs)) if isinstance(alignment, Activations) else None
    )
    maps = {}
    for group in spec.groups:
        if activations is not None:
            support = activation_support(activations, group, widths[group])
        else:
            support = weight_support(leaves, spec, group, widths, maps, set(maps), alignment.outgoing)
        maps[group] = group_map(cluster_plan(support, new_widths[group], method, iterations))
    return transport_model(leaves, spec.leaves, maps, widths)
