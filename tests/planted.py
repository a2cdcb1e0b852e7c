"""Planted truths shared by the tests: known permutations, duplicated neurons, random variables."""

import jax
import jax.numpy as jnp
import numpy as np

from jfusion.core.transport import GroupMap, transport_leaf
from jfusion.core.tree import flatten, unflatten


def max_tree_difference(a, b):
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))), a, b)))


def permutation_matrix(perm):
    """``[old, new]``: new neuron q is old neuron perm[q]."""
    return np.eye(len(perm))[:, np.asarray(perm)]


def random_variables(model, input_shape, seed, scale=None):
    """Every leaf of ``model``'s variables random (BN scales and variances in [0.5, 1.5]).

    Flax initialises biases to zero and BN statistics to 0 and 1, which would let a wrong
    label on those leaves go unnoticed. Kernels are scaled by 1/sqrt(fan-in) unless
    ``scale`` is given.
    """
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.ones((1, *input_shape))))
    leaves, treedef = flatten(shapes)
    rng = np.random.default_rng(seed)
    out = {}
    for path, leaf in leaves.items():
        if path.endswith(("/var", "/scale")):
            out[path] = rng.uniform(0.5, 1.5, leaf.shape)
        else:
            fan_in = np.prod(leaf.shape[:-1]) if len(leaf.shape) > 1 else 1
            out[path] = rng.normal(size=leaf.shape) * (scale if scale is not None else 1 / np.sqrt(fan_in))
    return unflatten(treedef, {p: jnp.asarray(x, jnp.float32) for p, x in out.items()})


def duplicate_neurons(params, spec, key):
    """Each hidden neuron twice (incoming weights copied, outgoing halved), then shuffled."""
    leaves, treedef = flatten(params)
    widths = spec.validate({p: x.shape for p, x in leaves.items()})
    maps = {}
    for group, k in zip(spec.groups, jax.random.split(key, len(spec.groups))):
        n = widths[group]
        copies = np.kron(np.eye(n), np.ones((1, 2)))  # old neuron p -> new 2p, 2p+1
        shuffle = permutation_matrix(np.asarray(jax.random.permutation(k, 2 * n)))
        expand = jnp.asarray(copies @ shuffle, jnp.float32)
        maps[group] = GroupMap(to_output=expand, to_input=expand / 2)
    return unflatten(treedef, {p: transport_leaf(x, spec[p], maps, widths) for p, x in leaves.items()})


def partition(spec):
    """The spec up to group names: each leaf's view layout, the groups as sets of dims, and
    the structured groups (``Heads``) as sets of their members' dim sets."""
    layouts = {leaf.path: tuple(d if isinstance(d, int) else None for d in leaf.dims) for leaf in spec.leaves}
    groups = {}
    for leaf in spec.leaves:
        for dim, group in enumerate(leaf.dim_groups):
            if group is not None:
                groups.setdefault(group, set()).add((leaf.path, dim))
    heads = {frozenset(frozenset(groups[g]) for g in members) for _, members in spec.heads}
    return layouts, {frozenset(dims) for dims in groups.values()}, heads


def assert_same_groups(traced, hand):
    assert partition(traced) == partition(hand), f"traced:\n{traced}\nhand:\n{hand}"
