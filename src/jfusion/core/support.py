"""Neuron supports: the vectors that represent each neuron of a group for OT.

Weight-based alignment (OTFusion's ``wts``) represents a neuron by its incoming weights --
every leaf whose output group it is: kernel rows, bias, norm parameters -- after the
already-solved input groups have been transported into the target's basis ("past
correction", OTFusion eq. 1). Optionally its outgoing weights are added, with their other
groups transported by the plans found so far; with several sweeps over the groups this is
the coordinate descent of weight matching (Ainsworth et al., Git Re-Basin).

Activation-based alignment (OTFusion's ``acts``) represents a neuron by its
pre-activations on a batch of inputs, flattened over the batch and spatial positions; they
come from a linen module (:class:`ModuleActivations`) or an nnx one (:class:`NnxActivations`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Collection, Iterable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flax import nnx

from jfusion.core.errors import SpecError
from jfusion.core.matching import WeightMatching
from jfusion.core.nnx import fresh, graphdef_of, is_nnx
from jfusion.core.spec import Heads, LeafSpec, Spec
from jfusion.core.transport import GroupMap, transport_view
from jfusion.core.tree import flatten, module_path


@dataclasses.dataclass(frozen=True)
class ByWeights:
    """Align by weights: a neuron's support is its incoming weights after past correction.

    Attributes:
      outgoing: add each neuron's outgoing weights to its support (only those whose other
        groups already have a plan in this sweep or the previous one).
      sweeps: passes over all groups; later passes see every other group's plan, so
        outgoing weights and recurrent (same group on both axes) weights count fully.

    Examples:
      The default (incoming weights, one sweep) recovers a shuffled copy; with
      ``outgoing=True, sweeps=2`` each neuron is also compared by the weights it sends on,
      the coordinate descent of weight matching (Git Re-Basin):

      >>> import jax, jax.numpy as jnp, jfusion
      >>> from jfusion.models import MLP, mlp_spec
      >>> model, x, spec = MLP((8, 3)), jnp.ones((1, 4)), mlp_spec(2)  # 4 -> 8 (group h0) -> 3
      >>> params = model.init(jax.random.key(0), x)
      >>> shuffled, _ = jfusion.permute(params, spec, jax.random.key(1))
      >>> fused = jfusion.fuse([params, shuffled], spec, alignment=jfusion.ByWeights()).params
      >>> bool(jnp.allclose(fused["params"]["Dense_1"]["kernel"], params["params"]["Dense_1"]["kernel"], atol=1e-6))
      True
      >>> jfusion.ByWeights(outgoing=True, sweeps=2)
      ByWeights(outgoing=True, sweeps=2)

    References:
      - Sidak Pal Singh and Martin Jaggi. *Model Fusion via Optimal Transport.* NeurIPS 2020.
      - Samuel K. Ainsworth, Jonathan Hayase and Siddhartha Srinivasa. *Git Re-Basin: Merging
        Models modulo Permutation Symmetries.* ICLR 2023 (weight matching by coordinate
        descent over the layers).
    """

    outgoing: bool = False
    sweeps: int = 1

    def __post_init__(self):
        if self.sweeps < 1:
            raise ValueError(f"ByWeights.sweeps must be an int >= 1, got {self.sweeps!r}")


class Capture(NamedTuple):
    """One module output read as a group's activations: all of it, or one block.

    A module whose kernel's output axis is a :class:`jfusion.Concat` (a fused q/k/v
    projection) outputs several groups end to end; ``block`` is then the part leaf
    (``"params/attn/qkv/kernel[2]"``) whose block of the flattened features holds this
    group's neurons. The blocks' sizes follow the model's widths, read from the variables
    at each call.
    """

    module: str
    block: str | None = None


def _block_ranges(spec: Spec | None, variables: Any, captures: Iterable[Capture]) -> dict[str, tuple[int, int]]:
    """``{part leaf: (start, stop)}`` of each captured block in its module's flattened features."""
    blocks = [c.block for c in captures if c.block is not None]
    if not blocks:
        return {}
    widths = spec.validate({p: np.shape(x) for p, x in flatten(variables)[0].items()}, "the activations' variables")
    ranges = {}
    for block in blocks:
        path, index = spec.part_of(block)
        axis = next(a for p, a, _, _ in spec.concatenated if p == path)
        sizes = [spec[q].axis_size(axis, widths) for q in spec.part_paths(path)]
        ranges[block] = (sum(sizes[:index]), sum(sizes[: index + 1]))
    return ranges


Points = tuple[tuple[str, tuple[Capture, ...], int, int], ...]  # (group, captures, feature axes, blocks)


def _feature_layout(leaf: LeafSpec) -> tuple[int, int]:
    """How a writer module's output holds the leaf's output group: ``(axes, blocks)``.

    ``axes``: the trailing axes that carry the group, 2 for a head-split projection ``(d, H,
    hd)`` or its bias ``(H, hd)`` (the heads axis and the member's, flattened head-major into
    the member's ``H * hd`` neurons), else 1. ``blocks``: the fixed sizes before the group in
    those axes' views, blocks of the same neurons -- a fused q/k/v projection's ``(3, H,
    hd)`` outputs are three samples (q, k and v) of its one member.
    """
    heads = leaf.dim_heads[-1] if leaf.dim_heads else None
    axes, blocks = 0, 1
    for dims in reversed(leaf.axis_dims):
        if not any(d == leaf.output_group or (isinstance(d, Heads) and d.name == heads) for d in dims):
            break
        axes += 1
        if None in dims:
            raise SpecError(
                f"{leaf.path}: the view {dims} of its output has an inferred (None) size, so its module's "
                f"outputs cannot be split into {leaf.output_group!r}'s neurons; give the size, or pass "
                f"points={{group: modules}} for it"
            )
        blocks *= math.prod(d for d in dims if isinstance(d, int) and not isinstance(d, bool))
    return max(axes, 1), blocks


def activation_points(points: Mapping[str, str | Sequence[str]] | Spec | None) -> Points:
    """``{group: module path or paths}`` as static tuples; a Spec gives each group's writers.

    A group's writers (the modules of the leaves that carry it last: its kernels, biases and
    norms) output the group on their last axis, so their outputs are the group's
    activations -- the points that fit a spec from :func:`jfusion.trace_spec`, whose groups
    are named after those modules. Leaves of the root module (a learned positional
    embedding added to a stream) are left out when the group has other writers: the root's
    output is the model's. A member group of :class:`jfusion.Heads` is written by head-split
    projections whose outputs end in ``(H, hd)`` (stock attention's query, key and value):
    those two axes are flattened head-major, the member group's layout, so q and k both
    give samples of the ``qk`` member; a fused projection (a :class:`jfusion.Concat`
    output axis, ``qkv (d, 3 H hd)``) gives each member its blocks: q and k to ``qk``, v to
    ``vo`` (:class:`jfusion.core.support.Capture`). Points given as a dict read the last axis only.
    """
    if points is None:
        return ()
    if isinstance(points, Spec):
        out = []
        for group in points.groups:
            writers = points.writers(group)
            inner = [leaf for leaf in writers if module_path(leaf.path)] or list(writers)
            captures: dict[tuple[str, int | None], Capture] = {}  # a kernel and its bias give one output
            for leaf in inner:
                capture = _capture(points, leaf)
                captures.setdefault((capture.module, points.part_of(leaf.path) and points.part_of(leaf.path)[1]), capture)
            modules = tuple(captures.values())
            layouts = {_feature_layout(leaf) for leaf in inner}
            if len(layouts) > 1:
                raise SpecError(
                    f"group {group!r}: its writers {[leaf.path for leaf in inner]} hold it in different "
                    f"layouts ((trailing axes, blocks): {sorted(layouts)}), so their outputs cannot be "
                    f"stacked as samples; pass points={{group: modules}} for it"
                )
            out.append((group, modules, *layouts.pop()))
        return tuple(out)
    return tuple(
        (group, tuple(Capture(p) for p in ((paths,) if isinstance(paths, str) else paths)), 1, 1)
        for group, paths in points.items()
    )


def _capture(spec: Spec, leaf: LeafSpec) -> Capture:
    """What of its module's output a writer leaf's group is: all of it, or one Concat block."""
    owner = spec.part_of(leaf.path)
    if owner is None:
        return Capture(module_path(leaf.path))
    axis = next(a for p, a, _, _ in spec.concatenated if p == owner[0])
    axes, _ = _feature_layout(leaf)
    if axis != len(leaf.axes) - axes:  # the blocks must be the outermost of the flattened features
        raise SpecError(
            f"{owner[0]}: its Concat is on axis {axis}, inside the module output's feature axes "
            f"{list(range(len(leaf.axes) - axes, len(leaf.axes)))}, so the blocks are not contiguous in "
            f"its flattened outputs; pass points={{group: modules}} for {leaf.output_group!r}"
        )
    return Capture(module_path(leaf.path), leaf.path)


def _stacked_samples(values: Sequence[jax.Array], feature_axes: int = 1, blocks: int = 1) -> jax.Array:
    # Several values of one group (a residual stream's writers, a layer called twice, the
    # blocks of a view such as a recurrent cell's gates) are more samples of the same neurons.
    return jnp.concatenate([v.reshape(-1, math.prod(v.shape[v.ndim - feature_axes :]) // blocks) for v in values], axis=0)


def _captured_samples(
    values: Sequence[tuple[Capture, jax.Array]], feature_axes: int, blocks: int, ranges: Mapping[str, tuple[int, int]]
) -> jax.Array:
    """The group's samples from captured outputs: of each, its features flattened, then its block's range."""
    flat = [(c, v.reshape(-1, math.prod(v.shape[v.ndim - feature_axes :]))) for c, v in values]
    parts = [v if c.block is None else v[:, slice(*ranges[c.block])] for c, v in flat]
    return _stacked_samples(parts, 1, blocks)


@dataclasses.dataclass(frozen=True)
class ModuleActivations:
    """Each group's activations from a linen module: what it sows, or chosen module outputs.

    With no ``points``, the module's ``sow(collection, group, x)`` calls give the groups'
    activations (jfusion's reference models sow every group's pre-activations); values sown
    under one group name in several places (the writers of a residual stream) are stacked
    along the sample axis. ``points`` instead maps groups to module paths
    (``{"h0": "Dense_0", "s1": ("layer1/block0/bn2", "layer1/block1/bn2")}``) whose outputs
    are captured with linen's ``capture_intermediates``, for models that sow nothing
    (:func:`jfusion.core.support.activation_points` writes them, with the number of trailing feature axes that
    each output flattens into the group, 2 for attention's head-split projections, and the
    blocks of neurons they hold, 3 for a fused q/k/v projection).

    Hashable (a frozen dataclass of the module and tuples), so jit caches its programs.
    """

    module: Any
    collection: str = "activations"
    points: Points = ()
    apply_kwargs: tuple[tuple[str, Any], ...] = ()
    spec: Spec | None = None  # sizes the blocks of Concat outputs (Capture.block)

    def __call__(self, variables: Any, inputs: jax.Array) -> dict[str, jax.Array]:
        kwargs = dict(self.apply_kwargs)
        if self.points:
            _, state = self.module.apply(
                variables, inputs, capture_intermediates=True, mutable=["intermediates"], **kwargs
            )
            ranges = _block_ranges(self.spec, variables, (c for _, captures, _, _ in self.points for c in captures))
            return {
                group: _captured_samples(
                    [(c, v) for c in captures for v in _captured(state["intermediates"], group, c.module)], axes, blocks, ranges
                )
                for group, captures, axes, blocks in self.points
            }
        _, state = self.module.apply(variables, inputs, mutable=[self.collection], **kwargs)
        sown: dict[str, list[jax.Array]] = {}
        for keypath, value in jax.tree_util.tree_flatten_with_path(state.get(self.collection, {}))[0]:
            # sow keeps a tuple of values under the name: the path ends (..., name, index).
            sown.setdefault(str(keypath[-2].key), []).append(value)
        return {name: _stacked_samples(values) for name, values in sown.items()}


def _captured(intermediates: Mapping[str, Any], group: str, path: str) -> Sequence[jax.Array]:
    node = intermediates
    for name in path.split("/") if path else ():
        if name not in node:
            raise SpecError(
                f"group {group!r}: no module {path!r} ran (captured: {sorted(node)} at {name!r})"
            )
        node = node[name]
    return node["__call__"]


@dataclasses.dataclass(frozen=True)
class NnxActivations:
    """Each group's activations from an nnx module: what it sows, or its submodules' outputs.

    ``__call__(state, inputs)`` merges a fresh module from ``graphdef`` and ``state``, runs
    it on ``inputs`` under ``nnx.capture`` and returns ``{group: (..., n_group)}``. It is a
    pure function of the state, so ``vmap`` maps it over the K models' states stacked on K.

    With no ``points``: the module's ``self.sow(nnx.Intermediate, group, x)`` calls give the
    groups' activations. ``Module.sow`` *accumulates*: each call appends its value to a tuple
    kept under the name -- outside ``nnx.capture`` on the module object itself, as an
    ``nnx.Intermediate`` variable that then travels in its state -- so a module applied
    twice holds two values, and a state split after a call carries them on. jfusion never
    reuses a module object: every call merges a fresh one and collects its sown values with
    ``nnx.capture`` (so only this forward pass's values are seen: one per sow site, more
    only when the model itself calls a module several times, and those are stacked along
    the sample axis like values sown in several places). Keep ``nnx.Intermediate`` variables
    out of the states you fuse (``nnx.split(model, nnx.Param, nnx.BatchStat)`` or fuse states
    of modules that were never called outside ``nnx.capture``).

    With ``points``, ``((group, (Capture(module_path, ...), ...), feature_axes, blocks), ...)``
    (:func:`jfusion.core.support.activation_points`): the outputs of those submodules (``"layer1/conv"``; ``""``
    is the root), their last ``feature_axes`` axes flattened into ``blocks`` samples of the
    group's neurons,
    captured with ``nnx.capture``'s ``method_outputs``, which sows every module's
    ``__call__`` output for the call.

    ``train`` sets the fresh module's mode (``Module.train()`` / ``eval()``);
    ``call_kwargs`` go to its ``__call__``.
    """

    graphdef: nnx.GraphDef
    points: Points = ()
    train: bool = False
    call_kwargs: tuple[tuple[str, Any], ...] = ()
    spec: Spec | None = None  # sizes the blocks of Concat outputs (Capture.block)

    def __call__(self, state: Any, inputs: jax.Array) -> dict[str, jax.Array]:
        module = fresh(self.graphdef, state, train=self.train)
        outputs = nnx.Intermediate if self.points else None
        _, captured = nnx.capture(module, nnx.Intermediate, method_outputs=outputs)(inputs, **dict(self.call_kwargs))
        values = flatten(captured)[0]  # paths "<module path>/<name>/<call index>"
        if not self.points:
            sown: dict[str, list[jax.Array]] = {}
            for path, value in values.items():
                sown.setdefault(path.split("/")[-2], []).append(value)
            return {name: _stacked_samples(vs) for name, vs in sown.items()}
        calls: dict[str, list[jax.Array]] = {}
        for path, value in values.items():
            parts = path.split("/")
            if len(parts) >= 2 and parts[-2] == "__call__":
                calls.setdefault("/".join(parts[:-2]), []).append(value)
        activations = {}
        ranges = _block_ranges(self.spec, state, (c for _, captures, _, _ in self.points for c in captures))
        for group, captures, axes, blocks in self.points:
            missing = [c.module for c in captures if c.module not in calls]
            if missing:
                raise SpecError(
                    f"group {group!r}: module(s) {missing} returned no single array during the call "
                    f"(they did not run, or return a tuple); modules that did: {sorted(calls)}"
                )
            activations[group] = _captured_samples([(c, v) for c in captures for v in calls[c.module]], axes, blocks, ranges)
        return activations


@dataclasses.dataclass(frozen=True)
class ByActivations:
    """Align by activations.

    Attributes:
      fn: ``fn(variables, inputs) -> {group: array (..., n_group)}``, each group's
        pre-activations with the neuron axis last. It runs inside the fused program,
        under ``vmap`` over the K models. :meth:`from_module` builds one from a linen or nnx module.
      target_fn: the same for a target given as a pytree of another architecture (other
        widths need another module instance); ``fn`` when None.
      model_fns: one function per model, for models of different widths given as a list
        (each needs a module of its own widths); ``fn`` for every model when None.

    Examples:
      jfusion's reference MLP sows each hidden layer's pre-activations under its group's
      name, so :meth:`from_module` needs nothing else; a model that sows nothing names
      the modules whose outputs are the groups' activations with ``points=``:

      >>> import jax, jax.numpy as jnp, jfusion
      >>> from jfusion.models import MLP, mlp_spec
      >>> model, spec = MLP((8, 3)), mlp_spec(2)
      >>> x = jax.random.normal(jax.random.key(2), (16, 4))  # the batch the activations are on
      >>> params = model.init(jax.random.key(0), x)
      >>> shuffled, _ = jfusion.permute(params, spec, jax.random.key(1))
      >>> alignment = jfusion.ByActivations.from_module(model)
      >>> fused = jfusion.fuse([params, shuffled], spec, alignment=alignment, inputs=x).params
      >>> bool(jnp.allclose(fused["params"]["Dense_0"]["kernel"], params["params"]["Dense_0"]["kernel"], atol=1e-6))
      True
      >>> jfusion.ByActivations.from_module(model, points={"h0": "Dense_0"}).fn.points
      (('h0', (Capture(module='Dense_0', block=None),), 1, 1),)
      >>> jfusion.ByActivations.from_module(model, points=spec).fn.points  # each group's writers
      (('h0', (Capture(module='Dense_0', block=None),), 1, 1),)

    References:
      - Sidak Pal Singh and Martin Jaggi. *Model Fusion via Optimal Transport.* NeurIPS 2020
        (activation-based alignment, ``acts``).
    """

    fn: Callable[[Any, jax.Array], Mapping[str, jax.Array]]
    target_fn: Callable[[Any, jax.Array], Mapping[str, jax.Array]] | None = None
    model_fns: tuple[Callable[[Any, jax.Array], Mapping[str, jax.Array]], ...] | None = None

    @classmethod
    def from_module(
        cls,
        module: Any,
        *,
        target_module: Any = None,
        modules: Sequence[Any] | None = None,
        points: Mapping[str, str | Sequence[str]] | Spec | None = None,
        collection: str = "activations",
        **kwargs: Any,
    ) -> "ByActivations":
        """Activations of a linen module or an nnx Module / GraphDef.

        A linen module gives a :class:`ModuleActivations`: ``kwargs`` go to ``module.apply``
        (e.g. ``train=False`` for BatchNorm models), sown values are read from
        ``collection``. An ``nnx.Module`` or ``nnx.GraphDef`` gives an
        :class:`NnxActivations` (only the graph is kept: the models' states come from the
        fusion): ``train`` (default False) sets the module's mode, the other ``kwargs`` go to
        its ``__call__``, sown values are read from ``nnx.Intermediate``.

        ``points`` maps groups to module paths whose outputs are the groups' activations,
        or is a Spec, whose groups get the outputs of their writer modules (see
        ``jfusion.core.support.activation_points``; what fits a traced spec). ``target_module`` is the module
        of a target pytree of other widths, ``modules`` one module per model when the
        models' widths differ (e.g. a pruned and a dense model).
        """
        static_points = activation_points(points)
        spec = points if isinstance(points, Spec) and points.concatenated else None

        def source(m):
            if is_nnx(m):
                call = dict(kwargs)
                train = bool(call.pop("train", False))
                return NnxActivations(graphdef_of(m), static_points, train, tuple(sorted(call.items())), spec)
            return ModuleActivations(m, collection, static_points, tuple(sorted(kwargs.items())), spec)

        return cls(
            source(module),
            None if target_module is None else source(target_module),
            None if modules is None else tuple(source(m) for m in modules),
        )


AlignmentMethod = ByWeights | ByActivations | WeightMatching


def resolve_alignment(alignment: str | AlignmentMethod) -> AlignmentMethod:
    """An alignment object from one or its name (``"weights"``)."""
    if isinstance(alignment, (ByWeights, ByActivations, WeightMatching)):
        return alignment
    if alignment == "weights":
        return ByWeights()
    if alignment == "activations":
        raise ValueError(
            "alignment='activations' needs to know where each group's activations come from: "
            "pass alignment=jfusion.ByActivations.from_module(model) (or ByActivations(fn)) and inputs=x"
        )
    raise ValueError(
        f"alignment must be 'weights', ByWeights(...), ByActivations(...) or WeightMatching(...), not {alignment!r}"
    )


def _transported_view(
    leaves: Mapping[str, jax.Array], leaf: LeafSpec, widths: Mapping[str, int], maps: Mapping[str, GroupMap], dims: Sequence[int]
) -> jax.Array:
    """``leaf``'s float32 view with its ``dims`` transported into the target basis by ``maps``."""
    x = leaves[leaf.path]
    return transport_view(x.astype(jnp.float32).reshape(leaf.view_shape(x.shape, widths)), leaf, maps, dims=dims)


def weight_support(
    leaves: Mapping[str, jax.Array],
    spec: Spec,
    group: str,
    widths: Mapping[str, int],
    maps: Mapping[str, GroupMap],
    solved: Collection[str],
    outgoing: bool,
    statistics: Collection[str] = frozenset(),
) -> jax.Array:
    """``(n, d)`` weight support of ``group`` for one model.

    ``maps`` transports this model's other groups into the target basis (empty for the
    target itself); ``solved`` names the groups that have a plan, so the model and the target
    use the same leaves and the same feature layout. ``statistics`` are the paths of running
    statistics (:func:`jfusion.running_statistics`): data moments, not weights, so
    they never enter a support -- a BatchNorm's running variance can dwarf every kernel row
    and decide the matching alone -- though they are transported like any other leaf.
    """
    parts = []
    readers = spec.readers(group) if outgoing else ()
    for leaf in spec.writers(group) + readers:
        if leaf.path in statistics:
            continue
        groups = leaf.dim_groups
        along = len(groups) - 1 if leaf.output_group == group else groups.index(group)
        others = [i for i, g in enumerate(groups) if g is not None and i != along]
        if any(groups[i] not in solved for i in others):
            continue
        v = jnp.moveaxis(_transported_view(leaves, leaf, widths, maps, others), along, 0)
        parts.append(v.reshape(v.shape[0], -1))
    if not parts:
        raise SpecError(
            f"group {group!r}: none of its incoming weights {[l.path for l in spec.writers(group)]} "
            f"can be compared before its own plan exists (they read the group itself); "
            f"use ByWeights(sweeps=2) or activation alignment"
        )
    return jnp.concatenate(parts, axis=1)


class RelationalSupport(NamedTuple):
    """A recurrent group's support: each neuron's features and how the neurons feed each other.

    The engine hands it, instead of the features alone, to a producer whose ``relational``
    attribute is true, for the groups that have recurrent leaves (:func:`recurrent_leaves`).

    Attributes:
      features: ``(n, d)``: the support any producer gets (weights or activations).
      relation: ``(n, n, r)``: ``relation[i, j]`` the weights from neuron ``i`` to neuron
        ``j`` of the group, in the model's own neuron order (see :func:`relation_support`).
    """

    features: jax.Array
    relation: jax.Array


def recurrent_leaves(spec: Spec, group: str) -> tuple[LeafSpec, ...]:
    """The leaves that write ``group`` and read it too: hidden-to-hidden kernels."""
    return tuple(leaf for leaf in spec.writers(group) if leaf.dim_groups.count(group) == 2)


def relation_support(
    leaves: Mapping[str, jax.Array],
    spec: Spec,
    group: str,
    widths: Mapping[str, int],
    maps: Mapping[str, GroupMap],
    solved: Collection[str],
) -> jax.Array | None:
    """``(n, n, r)`` neuron-to-neuron weights of ``group`` from its recurrent leaves, or None.

    Each recurrent leaf (an LSTM's four gate kernels, a GRU's three) gives its input dim
    (``i``) and output dim (``j``) as the first two axes, and its other dims flattened into
    channels, concatenated over the leaves: gates are channels of one relation, as they
    share one coupling. The group's own dims are never transported (the relation is what
    the coupling is solved from); other groups' dims are, by the plans found so far, and a
    leaf with an unsolved other group is left out (as in :func:`weight_support`).
    """
    parts = []
    for leaf in recurrent_leaves(spec, group):
        groups = leaf.dim_groups
        others = [i for i, g in enumerate(groups) if g is not None and g != group]
        if any(groups[i] not in solved for i in others):
            continue
        v = _transported_view(leaves, leaf, widths, maps, others)
        v = jnp.moveaxis(v, (groups.index(group), len(groups) - 1), (0, 1))
        parts.append(v.reshape(v.shape[0], v.shape[1], -1))
    return jnp.concatenate(parts, axis=2) if parts else None


def _missing_activations(activations: Mapping[str, jax.Array], group: str) -> str:
    """Why ``group`` has no activations, and the two ways to give it some."""
    where = (
        "the activation function returned no activations at all: the model sows none"
        if not activations
        else f"the activation function returned activations for {sorted(activations)} but none "
        f"for {group!r} (sown names must be the spec's group names; a traced spec names its "
        f"groups after modules, e.g. 'Dense_0')"
    )
    return (
        f"group {group!r}: {where}. Either say where each group's activations are, with "
        f"jfusion.ByActivations.from_module(model, points=...): points=spec takes every group's "
        f"writer modules (those of its kernels, biases and norms), or points={{{group!r}: "
        f"'path/to/module'}} the output of a module you choose; or sow them in the model's "
        f"__call__: self.sow('activations', {group!r}, x) in a linen module (from_module reads "
        f"the collection named by collection=, default 'activations'; skip it while "
        f"initialising, `if not self.is_initializing()`, or init's variables carry it), "
        f"self.sow(nnx.Intermediate, {group!r}, x) in an nnx one. A ByActivations(fn) of your "
        f"own must return {{group: array (..., n_group)}} for every group of the spec"
    )


def activation_support(activations: Mapping[str, jax.Array], group: str, width: int) -> jax.Array:
    """``(n, S)`` activation support from ``activations[group]`` of shape ``(..., n)``."""
    if group not in activations:
        raise SpecError(_missing_activations(activations, group))
    a = activations[group]
    if a.shape[-1] != width:
        raise SpecError(
            f"group {group!r}: activations have {a.shape[-1]} neurons on their last axis "
            f"(shape {a.shape}) but the weights give the group width {width}"
        )
    return a.astype(jnp.float32).reshape(-1, width).T
