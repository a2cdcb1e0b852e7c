"""Apply transport plans to leaves, preserving the network's function.

For a group with plan ``T (n x m)``:

* output dims (a neuron's own incoming weights, bias, norm parameters) use the barycentric
  map ``T diag(1 / T^T 1)``: each target neuron is the plan-weighted average of the source
  neurons sent to it (OTFusion eq. 2);
* input dims (the next layer's weights reading the group) use ``diag(1 / T 1) T``: each
  source neuron's outgoing contribution is split among the target neurons it was sent to.

With an exact plan between equal widths both are the same permutation. For other widths only
this pairing preserves the function: a network whose neurons were duplicated (outgoing
weights halved), sent back to the original width, is the original network again. Using the
plan's own row and column sums (rather than the marginals it was asked to meet) keeps every
combination convex even for an approximate plan, and lets plans leave neurons out entirely
(structured pruning: a zero row) or give a model no mass in a target slot (partial fusion).
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from jfusion.core.spec import Heads, LeafSpec

_HIGHEST = jax.lax.Precision.HIGHEST


class GroupMap(NamedTuple):
    """The two normalisations of one plan ``T (n x m)``."""

    to_output: jax.Array  # T / column sums: target neuron = average of its sources
    to_input: jax.Array  # T / row sums: source contribution split among its targets


def _safe_divide(x: jax.Array, d: jax.Array) -> jax.Array:
    return jnp.where(d > 0, x / jnp.where(d > 0, d, 1.0), 0.0)


def group_map(plan: jax.Array) -> GroupMap:
    plan = plan.astype(jnp.float32)
    return GroupMap(
        to_output=_safe_divide(plan, plan.sum(axis=0, keepdims=True)),
        to_input=_safe_divide(plan, plan.sum(axis=1, keepdims=True)),
    )


def transport_view(
    v: jax.Array,
    leaf: LeafSpec,
    maps: Mapping[str, GroupMap],
    dims: Sequence[int] | None = None,
) -> jax.Array:
    """Transport the dims of a leaf in view layout whose groups have a map.

    ``dims`` restricts the transport to those view dims (e.g. all but the one a support is
    read along). The last view dim is the leaf's output dim and gets the barycentric map.
    """
    last = v.ndim - 1
    for i, g in enumerate(leaf.dim_groups):
        if g is None or g not in maps or (dims is not None and i not in dims):
            continue
        m = maps[g].to_output if i == last else maps[g].to_input
        v = jnp.moveaxis(jnp.tensordot(v, m, axes=([i], [0]), precision=_HIGHEST), -1, i)
    return v


def transport_leaf(
    x: jax.Array, leaf: LeafSpec, maps: Mapping[str, GroupMap], widths: Mapping[str, int]
) -> jax.Array:
    """Transport every dim of ``x`` whose group has a map; float32, original layout.

    ``widths`` are the group widths of the model ``x`` comes from; transported groups take
    their plan's target width.
    """
    v = x.astype(jnp.float32).reshape(leaf.view_shape(x.shape, widths))
    v = transport_view(v, leaf, maps)
    new_widths = {**widths, **{g: maps[g].to_output.shape[1] for g in leaf.groups if g in maps}}
    dims = [d for axis in leaf.axis_dims for d in axis]
    for heads, member in zip(dims, dims[1:]):  # structured plans keep the head size: the head count follows
        if isinstance(heads, Heads) and member in maps:
            new_widths[heads.name] = new_widths[member] // (widths[member] // widths[heads.name])
    return v.reshape(leaf.shape_for(x.shape, widths, new_widths))


def transport_model(
    leaves: Mapping[str, jax.Array],
    spec_leaves: Sequence[LeafSpec],
    maps: Mapping[str, GroupMap],
    widths: Mapping[str, int],
) -> dict[str, jax.Array]:
    """Transport every leaf of one model with its group maps; leaves no map moves stay as they are."""
    return {
        leaf.path: transport_leaf(leaves[leaf.path], leaf, maps, widths)
        if any(g in maps for g in leaf.groups)
        else leaves[leaf.path]
        for leaf in spec_leaves
    }


def permute_groups(
    leaves: Mapping[str, jax.Array],
    spec: Any,
    perms: Mapping[str, jax.Array],
    widths: Mapping[str, int],
) -> dict[str, jax.Array]:
    """Reorder groups' neurons: new neuron ``q`` of group ``g`` is old neuron ``perms[g][q]``.

    ``spec`` is the :class:`jfusion.Spec` labelling ``leaves`` (a :class:`jfusion.Concat`
    leaf under its own path or as its part leaves). The network computes the same
    function; leaves keep their order and dtypes.
    """
    maps = {}
    for group, perm in perms.items():
        matrix = jax.nn.one_hot(perm, widths[group], dtype=jnp.float32).T  # [old, new]
        maps[group] = GroupMap(matrix, matrix)
    parts = spec.split(leaves, widths)
    moved = transport_model(parts, spec.leaves, maps, widths)
    moved = spec.join(moved) if parts.keys() != leaves.keys() else moved
    return {path: moved[path].astype(jnp.result_type(x)) for path, x in leaves.items()}
