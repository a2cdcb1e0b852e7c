"""Leaf paths and the model axis: how jfusion names, flattens and stacks parameter pytrees.

A leaf's path is its keys joined by "/": ``"params/Dense_0/kernel"`` for a linen variable
dict, ``"linear1/kernel"`` for an ``nnx.State`` (the ``.value`` of an nnx Variable is not
part of the name). The same strings address leaves in every Flax API.
"""

from __future__ import annotations

import collections.abc
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jfusion.core.errors import FusionInputError

PyTree = Any


def _key_name(key: Any) -> str | None:
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
        # nnx Variables expose their array as ``.value``; the variable is the leaf's name.
        return None if key.name == "value" else key.name
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def path_string(keypath: Sequence[Any]) -> str:
    """The "/"-joined name of a leaf from its jax key path."""
    return "/".join(name for name in map(_key_name, keypath) if name is not None)


# Leading path components that name a linen collection rather than a module.
_COLLECTIONS = frozenset({"params", "batch_stats"})


def module_path(path: str) -> str:
    """The module a leaf belongs to: its path without the leaf's name and a linen collection.

    ``"params/layer1/conv/kernel"`` and the nnx ``"layer1/conv/kernel"`` both give
    ``"layer1/conv"``; a leaf of the root module gives ``""``.
    """
    parts = path.split("/")[:-1]
    if parts and parts[0] in _COLLECTIONS:
        parts = parts[1:]
    return "/".join(parts)


def running_statistics(tree: PyTree) -> frozenset[str]:
    """The paths of ``tree``'s running statistics: data moments, not weights.

    A linen variable dict keeps them in its ``batch_stats`` collection; an ``nnx.State``
    marks them by their variable type, ``nnx.BatchStat`` (nnx.BatchNorm's ``mean`` and
    ``var``), which its paths do not show. So spec authors label BatchNorm's four leaves
    once, alike, and jfusion tells the statistics apart from the tree itself: they are
    transported with their channels but never compared as weights.
    """
    with_paths = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    return frozenset(
        path_string(keypath)
        for keypath, leaf in with_paths
        if isinstance(leaf, nnx.BatchStat) or (keypath and _key_name(keypath[0]) == "batch_stats")
    )


def flatten(tree: PyTree) -> tuple[dict[str, Any], Any]:
    """``{path: leaf}`` in flattening order, and the treedef that rebuilds the tree."""
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    leaves = {}
    for keypath, leaf in with_paths:
        path = path_string(keypath)
        if path in leaves:
            raise FusionInputError(f"two leaves share the path {path!r}; jfusion needs unique leaf paths")
        leaves[path] = leaf
    return leaves, treedef


def unflatten(treedef: Any, leaves: Mapping[str, Any]) -> PyTree:
    """Inverse of :func:`flatten` (``leaves`` in flattening order)."""
    return jax.tree_util.tree_unflatten(treedef, list(leaves.values()))


def first_difference(tree_a: PyTree, tree_b: PyTree) -> str:
    """A sentence naming the first path where two pytrees' structures differ."""
    paths_a = list(flatten(tree_a)[0])
    paths_b = list(flatten(tree_b)[0])
    only_a = [p for p in paths_a if p not in set(paths_b)]
    only_b = [p for p in paths_b if p not in set(paths_a)]
    if only_a or only_b:
        return f"leaves only in the first: {only_a[:5]}; only in the second: {only_b[:5]}"
    return "same leaf paths but different container types (e.g. dict against nnx.State)"


class ModelStack:
    """K parameter pytrees of one structure, as flat ``{path: leaf}`` dicts.

    ``stacked`` holds leaves with a leading K axis when every model has the same shapes
    (so ``vmap`` can map per-model work over them); otherwise ``models`` holds one dict per model.
    ``stack=False`` keeps a list of models apart even when their shapes agree (the tests
    compare the two paths). ``dtypes[k]`` are model k's leaf dtypes as given (stacking
    would promote them to a common one); ``statistics`` are the paths of the running
    statistics (:func:`running_statistics`; one structure, so the first model's).
    """

    def __init__(self, params_list: PyTree | Sequence[PyTree], what: str = "params_list", stack: bool = True):
        if isinstance(params_list, (str, bytes, collections.abc.Iterator)):
            raise FusionInputError(
                f"{what} must be a list of K pytrees or one pytree stacked along a leading K axis, "
                f"not {type(params_list).__name__}; pass list(...) for a generator"
            )
        if isinstance(params_list, (list, tuple)):
            if len(params_list) == 0:
                raise FusionInputError(f"{what} is empty: fusion needs at least one model (K >= 1)")
            flats = []
            self.treedef = None
            for k, params in enumerate(params_list):
                leaves, treedef = flatten(params)
                if not leaves:
                    raise FusionInputError(f"{what}[{k}] has no leaves: there is nothing to fuse")
                if self.treedef is None:
                    self.treedef = treedef
                elif treedef != self.treedef:
                    raise FusionInputError(
                        f"{what}[{k}] has a different tree structure from {what}[0]: "
                        f"{first_difference(params_list[0], params)}"
                    )
                flats.append(leaves)
            self.statistics = running_statistics(params_list[0])
            self.num_models = len(flats)
            self.dtypes = [{p: jnp.result_type(x) for p, x in flat.items()} for flat in flats]
            same_shapes = all(
                np.shape(flat[p]) == np.shape(flats[0][p]) for flat in flats for p in flats[0]
            )
            if same_shapes and stack:
                self.stacked = {p: jnp.stack([jnp.asarray(flat[p]) for flat in flats]) for p in flats[0]}
                self.models = None
            else:
                self.stacked = None
                self.models = [{p: jnp.asarray(x) for p, x in flat.items()} for flat in flats]
        else:
            leaves, self.treedef = flatten(params_list)
            if not leaves:
                raise FusionInputError(f"{what} has no leaves: there is nothing to fuse")
            sizes = {p: (np.shape(x)[0] if np.ndim(x) else None) for p, x in leaves.items()}
            first_path, num = next(iter(sizes.items()))
            for p, n in sizes.items():
                if n is None or n != num:
                    raise FusionInputError(
                        f"{what} is one pytree, so every leaf needs the same leading model axis: "
                        f"{first_path!r} has {num} models on axis 0 but {p!r} has "
                        f"{'no axes' if n is None else f'{n} on axis 0'}"
                    )
            if num == 0:
                raise FusionInputError(f"{what} has a model axis of size 0: fusion needs K >= 1")
            self.num_models = num
            self.statistics = running_statistics(params_list)
            self.dtypes = [{p: jnp.result_type(x) for p, x in leaves.items()}] * num
            self.stacked = {p: jnp.asarray(x) for p, x in leaves.items()}
            self.models = None

    def split(self, spec: Any, widths: Sequence[Mapping[str, int]]) -> "ModelStack":
        """The same models with every :class:`jfusion.Concat` leaf split into its part leaves.

        ``spec`` is the :class:`jfusion.Spec` (its ``split`` and ``part_paths``), ``widths``
        each model's group widths (they size the blocks); ``treedef`` still rebuilds the
        tree once ``spec.join`` has put the parts back together.
        """
        if not spec.concatenated:
            return self
        if self.stacked is not None:
            self.stacked = spec.split(self.stacked, widths[0], "models")
        else:
            self.models = [spec.split(leaves, w, f"model {k}") for k, (leaves, w) in enumerate(zip(self.models, widths))]
        self.dtypes = [{q: dtype for p, dtype in dtypes.items() for q in spec.part_paths(p)} for dtypes in self.dtypes]
        self.statistics = frozenset(q for p in self.statistics for q in spec.part_paths(p))
        return self

    @property
    def paths(self) -> list[str]:
        return list(self.stacked if self.stacked is not None else self.models[0])

    def model(self, k: int) -> dict[str, Any]:
        """Model k's flat leaves."""
        if self.stacked is not None:
            return {p: x[k] for p, x in self.stacked.items()}
        return self.models[k]

    def shapes(self, k: int) -> dict[str, tuple[int, ...]]:
        if self.stacked is not None:
            return {p: tuple(np.shape(x)[1:]) for p, x in self.stacked.items()}
        return {p: tuple(np.shape(x)) for p, x in self.models[k].items()}


def stack_models(params_list: Sequence[PyTree]) -> PyTree:
    """K pytrees of one structure and shapes -> one pytree stacked along a leading K axis."""
    models = ModelStack(list(params_list))
    if models.stacked is None:
        raise FusionInputError("stack_models needs models of equal shapes; these differ in widths")
    return unflatten(models.treedef, models.stacked)


def unstack_models(stacked: PyTree) -> list[PyTree]:
    """One pytree stacked along a leading K axis -> a list of K pytrees."""
    models = ModelStack(stacked, "stacked")
    return [unflatten(models.treedef, models.model(k)) for k in range(models.num_models)]
