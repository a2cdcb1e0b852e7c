"""The layer-topology Spec: which neuron group every axis of every leaf carries.

A Spec is built from a plain dict ``{path: axes}``. ``axes`` has one entry per axis of the
leaf:

* a group name (``"h0"``): the axis indexes the neurons of that group;
* ``None``: the axis carries no group (inputs, logits, kernel height...), it is averaged
  but never transported;
* a tuple: a *view* -- the axis is reshaped (C order) into several dims before labelling,
  each a group name, a fixed ``int`` size or ``None`` (at most one inferred size);
* ``Concat(block, ...)``: the axis is blocks laid end to end, each block an entry of its
  own, sized by its groups' widths (:class:`jfusion.Concat`; a fused q/k/v kernel). Block
  ``i`` of leaf ``path`` is then a leaf of its own, ``path[i]``, for every step of a
  fusion (:meth:`jfusion.Spec.split`).

Examples (Flax stores a Dense kernel as ``(in, out)`` and a Conv kernel as ``(H, W, in, out)``)::

    {
        "params/Conv_0/kernel": (None, None, None, "c0"),
        "params/Conv_0/bias": ("c0",),
        "params/Dense_1/kernel": ((49, "c0"), "h1"),  # flatten of a 7x7xC feature map
        "params/Dense_1/bias": ("h1",),
        "params/Dense_2/kernel": ("h1", None),        # logits: ungrouped output
        "params/Dense_2/bias": (None,),
    }

The group on a leaf's last dim is its *output* group (Flax puts the output features last);
the leaf is one of that group's incoming weights (kernel rows, bias, norm parameters). Its
other groups are its *inputs*. Groups are solved in topological order of that relation.
Group sizes are read from each model, so widths may differ between models.

Attention heads are *structured groups*: ``Heads(name)`` labels the axis (or view dim) that
indexes the heads, and the dim right after it carries a *member* group, the dims inside each
head. ``query/kernel (d, H, hd)`` is ``("r", Heads("b0"), "b0.qk")``, ``out/kernel (H, hd,
d)`` is ``(Heads("b0"), "b0.vo", "r")``. Internally the pair is one flattened ``H * hd``
dim of the member group (C order: head-major), so transport and supports see a plain group;
every member of one ``Heads`` name shares its head permutation, and is solved in one step by a
two-level plan (:func:`jfusion.core.plans.head_plans`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Mapping, Sequence, Union

import jax.numpy as jnp
import numpy as np

from jfusion.core.errors import SpecError

@dataclasses.dataclass(frozen=True)
class Heads:
    """The heads axis of a structured group: blocks of neurons permuted as wholes.

    In a leaf's axes, ``Heads(name)`` labels the axis (or view dim) that indexes the ``H``
    attention heads; the dim right after it must carry a group, the *member*: the ``hd``
    dims inside each head. The pair is one group of width ``H * hd`` (head-major), permuted
    only by ``P = sum_h e_h e_pi(h)^T (x) S_h``: a permutation ``pi`` of the heads, shared
    by every member of ``name``, and one permutation ``S_h`` per head and member. Multi-head
    attention (Vaswani et al. 2017) has two members: ``qk``, shared by the query and key
    projections (contracted together in ``q . k``, so nothing reads it), and ``vo``, shared
    by the value projection and the output projection's input.

    :func:`jfusion.layers.attention` writes stock Flax attention's entries,
    :func:`jfusion.layers.fused_attention` those of a fused q/k/v projection;
    :func:`jfusion.trace_spec` infers both, and ``ByActivations.from_module(model,
    points=spec)`` reads each member's activations per head (the projections' ``(..., H,
    hd)`` outputs flattened head-major).

    Attributes:
      name: the structured group's name (one per attention layer); its members share the
        head permutation.
      count: the number of heads, for a view such as ``("r", (Heads("b0", 4), "b0.qk"))``
        (a Dense kernel with ``H * hd`` outputs) where no other leaf sizes them; None reads
        it from the leaves. A fused q/k/v kernel ``(d, 3 H hd)`` is a :class:`Concat` of
        three such views, q and k with ``qk``, v with ``vo``
        (:func:`jfusion.layers.fused_attention`).

    Examples:
      >>> import jfusion
      >>> from jfusion import Heads
      >>> spec = jfusion.Spec({**jfusion.layers.dense("embed", None, "r"),
      ...     **jfusion.layers.attention("attn", "r", "b0")})
      >>> spec.heads, spec.units
      ((('b0', ('b0.qk', 'b0.vo')),), ('r', 'b0'))
      >>> spec["params/attn/out/kernel"].dims  # the (H, hd) pair is one dim of the member
      ('b0.vo', 'r')

    References:
      - Ashish Vaswani et al. *Attention Is All You Need.* NeurIPS 2017.
      - Moritz Imfeld, Jacopo Graldi, Marco Giordano, Thomas Hofmann, Sotiris Anagnostidis
        and Sidak Pal Singh. *Transformer Fusion with Optimal Transport.* ICLR 2024.
    """

    name: str
    count: int | None = None  # the number of heads, for a view that no other leaf sizes

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise SpecError(f"Heads needs the structured group's name, a non-empty string, not {self.name!r}")
        if self.count is not None and (isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1):
            raise SpecError(f"Heads({self.name!r}): count is the number of heads, an int >= 1 or None, not {self.count!r}")

    def __repr__(self) -> str:
        return f"Heads({self.name!r})" if self.count is None else f"Heads({self.name!r}, {self.count})"


@dataclasses.dataclass(frozen=True, init=False)
class Concat:
    """An axis made of blocks laid end to end, each block labelled on its own.

    ``Concat(block_0, ..., block_{n-1})`` labels an axis whose entries are block 0's, then
    block 1's, and so on; each block is an axis entry of its own (a group name,
    ``Heads(name)`` or a view tuple without an inferred dim), and its labels size it: block
    ``i`` has the width its groups have in the model, so the blocks of a model whose groups
    differ in width (pruned, or fused into a narrower target) are sized by them, and
    :meth:`jfusion.Spec.validate` reads a group that only a Concat carries from what the axis leaves
    for it (blocks of one label share it equally). A fused q/k/v projection ``(d, 3 H hd)``
    concatenates the queries, the keys and the values, each head-major:

        ``("r", Concat((Heads("b0", H), "b0.qk"), (Heads("b0", H), "b0.qk"), (Heads("b0", H), "b0.vo")))``

    so q and k share the member ``qk`` and v has ``vo``, permuted independently inside each
    head as with separate kernels (:func:`jfusion.layers.fused_attention`). A view cannot say
    this: it is one reshape, and every block of a reshaped axis has the same labels.

    The Spec treats block ``i`` of leaf ``path`` as a leaf of its own, ``f"{path}[{i}]"``
    (:meth:`jfusion.Spec.split`; :meth:`jfusion.Spec.join` concatenates the blocks back), so every step of a
    fusion -- supports, plans, transport -- sees plain leaves, and errors name the block. A
    leaf has at most one ``Concat`` axis.

    Attributes:
      blocks: the blocks' entries, in order along the axis (at least two).
    """

    blocks: tuple

    def __init__(self, *blocks: "Entry"):
        if len(blocks) < 2:
            raise SpecError(f"Concat needs at least two blocks (one block is the entry itself), not {len(blocks)}")
        for block in blocks:
            if isinstance(block, Concat):
                raise SpecError(f"Concat{blocks!r} nests a Concat: give the blocks of one axis in one Concat")
            if block is None or (isinstance(block, (tuple, list)) and None in block):
                raise SpecError(
                    f"Concat{blocks!r}: block {block!r} has no size of its own (None); a block is sized by its "
                    f"labels, so give it a group or a fixed int size"
                )
        object.__setattr__(self, "blocks", tuple(tuple(b) if isinstance(b, list) else b for b in blocks))

    def __repr__(self) -> str:
        return f"Concat({', '.join(map(repr, self.blocks))})"


def part_path(path: str, index: int) -> str:
    """The name of the part leaf that holds block ``index`` of ``path``'s :class:`Concat` axis."""
    return f"{path}[{index}]"


Dim = Union[str, int, None, Heads]
Entry = Union[str, None, tuple, Heads, Concat]


def _parse_entry(path: str, axis: int, entry: Entry) -> tuple[Dim, ...]:
    if entry is None or isinstance(entry, (str, Heads)):
        return (entry,)
    if isinstance(entry, (tuple, list)):
        dims = tuple(entry)
        if not dims:
            raise SpecError(f"{path}: axis {axis} has an empty view; give at least one dim")
        for d in dims:
            if isinstance(d, (tuple, list)):
                raise SpecError(
                    f"{path}: axis {axis} view {dims} nests a tuple ({d!r}): a view is one reshape of the "
                    f"axis; blocks laid end to end with labels of their own are Concat(block, ...), "
                    f"e.g. a fused q/k/v kernel (jfusion.layers.fused_attention)"
                )
            if not (d is None or isinstance(d, (str, Heads)) or (isinstance(d, int) and d > 0)):
                raise SpecError(
                    f"{path}: axis {axis} view dim {d!r} must be a group name, Heads(name), a positive int or None"
                )
        if sum(d is None for d in dims) > 1:
            raise SpecError(f"{path}: axis {axis} view {dims} has more than one inferred (None) dim")
        return dims
    if isinstance(entry, Concat):
        raise SpecError(f"{path}: axis {axis} is {entry!r}, but a leaf has at most one Concat axis")
    raise SpecError(
        f"{path}: axis {axis} entry {entry!r} must be a group name, None, Heads(name), a tuple (a view) or Concat(...)"
    )


def _parse_axes(path: str, axes: object) -> tuple[tuple[Dim, ...], ...]:
    if not isinstance(axes, (tuple, list)):
        raise SpecError(
            f"{path}: axes must be a tuple with one entry per axis of the leaf, not "
            f"{axes!r}; write ({axes!r},) for a leaf with one axis"
        )
    return tuple(_parse_entry(path, axis, entry) for axis, entry in enumerate(axes))


@dataclasses.dataclass(frozen=True)
class LeafSpec:
    """One leaf's labels: ``axes`` as given; the parsed view dims are computed once.

    Attributes:
      path: the leaf's "/"-joined path.
      axes: one entry per axis of the leaf (a group name, None, ``Heads(name)`` or a view tuple).
      axis_dims: per axis, the view dims it is reshaped into (a plain axis is one dim).
      dims: ``axis_dims`` flattened, each ``(Heads(name), member)`` pair merged into one dim
        of the member group: the leaf's dims in view layout.
      dim_groups: per view dim, the group it carries, or None.
      dim_heads: per view dim, the ``Heads`` name of a member group's dim, or None.
      output_group: the group on the last view dim (the leaf's output), or None.
      input_groups: the groups on other dims, in order, without repeats.
      groups: every group the leaf carries, inputs first.
    """

    path: str
    axes: tuple[Entry, ...]
    axis_dims: tuple[tuple[Dim, ...], ...] = dataclasses.field(init=False, repr=False, compare=False)
    dims: tuple[Dim, ...] = dataclasses.field(init=False, repr=False, compare=False)
    dim_groups: tuple[str | None, ...] = dataclasses.field(init=False, repr=False, compare=False)
    dim_heads: tuple[str | None, ...] = dataclasses.field(init=False, repr=False, compare=False)
    output_group: str | None = dataclasses.field(init=False, repr=False, compare=False)
    input_groups: tuple[str, ...] = dataclasses.field(init=False, repr=False, compare=False)
    groups: tuple[str, ...] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        axis_dims = _parse_axes(self.path, self.axes)
        raw = [(axis, d) for axis, per_axis in enumerate(axis_dims) for d in per_axis]
        dims: list[Dim] = []
        heads: list[str | None] = []
        for i, (axis, d) in enumerate(raw):
            if isinstance(d, Heads):
                member = raw[i + 1][1] if i + 1 < len(raw) else None
                if not isinstance(member, str):
                    raise SpecError(
                        f"{self.path}: axis {axis} is {d!r}, which must be followed by the dim of a "
                        f"group (the dims inside each head), but the next dim is "
                        f"{'missing' if i + 1 == len(raw) else repr(member)}"
                    )
            elif i and isinstance(raw[i - 1][1], Heads):
                dims.append(d)
                heads.append(raw[i - 1][1].name)
            else:
                dims.append(d)
                heads.append(None)
        dim_groups = tuple(d if isinstance(d, str) else None for d in dims)
        output = dim_groups[-1] if dims else None
        inputs = tuple(dict.fromkeys(g for g in dim_groups[:-1] if g is not None))
        groups = inputs + ((output,) if output is not None and output not in inputs else ())
        for name, value in [
            ("axes", tuple(self.axes)),
            ("axis_dims", axis_dims),
            ("dims", tuple(dims)),
            ("dim_groups", dim_groups),
            ("dim_heads", tuple(heads)),
            ("output_group", output),
            ("input_groups", inputs),
            ("groups", groups),
        ]:
            object.__setattr__(self, name, value)

    def _axis_sizes(self, shape: Sequence[int], widths: Mapping[str, int]) -> list[list[int]]:
        """Per axis, the sizes of its dims before merging heads (a member dim: per head)."""
        out: list[list[int]] = []
        previous: Dim = None
        for axis, dims in enumerate(self.axis_dims):
            size = shape[axis]
            known: list[int | None] = []
            for d in dims:
                if isinstance(d, Heads):
                    known.append(widths[d.name])
                elif isinstance(d, str):
                    known.append(widths[d] // widths[previous.name] if isinstance(previous, Heads) else widths[d])
                else:
                    known.append(d)
                previous = d
            if None in known:
                rest = math.prod(k for k in known if k is not None)
                if rest == 0 or size % rest:
                    raise SpecError(
                        f"{self.path}: axis {axis} has size {size}, which the view {dims} "
                        f"cannot split (the known dims multiply to {rest})"
                    )
                known[known.index(None)] = size // rest
            if math.prod(known) != size:
                raise SpecError(
                    f"{self.path}: axis {axis} has size {size}, but the view {dims} gives "
                    f"{' x '.join(map(str, known))} = {math.prod(known)}"
                )
            out.append(known)
        return out

    def axis_size(self, axis: int, widths: Mapping[str, int]) -> int:
        """The size of ``axis`` for the given group widths (its dims' product; no inferred dim)."""
        size, previous = 1, None
        for d in self.axis_dims[axis]:
            if d is None:
                raise SpecError(f"{self.path}: axis {axis} has an inferred (None) dim, so the widths alone do not size it")
            if isinstance(d, Heads):
                size *= widths[d.name]
            elif isinstance(d, str):
                size *= widths[d] // widths[previous.name] if isinstance(previous, Heads) else widths[d]
            else:
                size *= d
            previous = d
        return size

    def view_shape(self, shape: Sequence[int], widths: Mapping[str, int]) -> tuple[int, ...]:
        """The leaf's shape in view dims, for a leaf of ``shape`` and the given group widths.

        ``widths`` holds every group's width and every ``Heads`` name's head count; a member
        group's width is its flattened ``H * hd``.
        """
        sizes = [s for per_axis in self._axis_sizes(shape, widths) for s in per_axis]
        raw = [d for per_axis in self.axis_dims for d in per_axis]
        out: list[int] = []
        for i, (d, size) in enumerate(zip(raw, sizes)):
            out.append(size * out.pop() if i and isinstance(raw[i - 1], Heads) else size)
        return tuple(out)

    def shape_for(self, shape: Sequence[int], widths: Mapping[str, int], new_widths: Mapping[str, int]) -> tuple[int, ...]:
        """The shape this leaf takes when its groups have ``new_widths`` instead of ``widths``."""
        out = []
        previous: Dim = None
        for dims, sizes in zip(self.axis_dims, self._axis_sizes(shape, widths)):
            new = []
            for d, size in zip(dims, sizes):
                if isinstance(d, Heads):
                    new.append(new_widths[d.name])
                elif isinstance(d, str):
                    heads = new_widths[previous.name] if isinstance(previous, Heads) else 1
                    new.append(new_widths[d] // heads)
                else:
                    new.append(size)
                previous = d
            out.append(math.prod(new))
        return tuple(out)


def _order(
    leaves: Sequence[LeafSpec],
    writers: Mapping[str, tuple[LeafSpec, ...]],
    heads: Mapping[str, tuple[str, ...]] = {},
) -> tuple[str, ...]:
    """Every unit (a group, or a ``Heads`` name standing for its members), each after the
    groups feeding it where the topology allows.

    A residual stream feeds the blocks that write back into it, so streams make the "feeds"
    relation cyclic. When no unit has all its inputs solved, the next one is a unit with at
    least one writer whose inputs are all solved, a kernel if any unit has one -- the stem or
    the projection shortcut that opens the stream; its other writers join its support in a second sweep
    (:class:`jfusion.ByWeights`). OTFusion likewise takes a stream's map from its earliest layer.
    """
    member_of = {g: name for name, members in heads.items() for g in members}
    names = list(dict.fromkeys(member_of.get(g, g) for leaf in leaves for g in leaf.groups))
    members = {u: heads.get(u, (u,)) for u in names}
    unit_writers = {u: tuple(w for g in members[u] for w in writers[g]) for u in names}

    def inputs(leaf: LeafSpec, unit: str) -> set[str]:
        return {g for g in leaf.input_groups if g not in members[unit]}

    order: list[str] = []
    while len(order) < len(names):
        solved = {g for u in order for g in members[u]}
        remaining = [u for u in names if u not in order]
        ready = [u for u in remaining if all(inputs(w, u) <= solved for w in unit_writers[u])]
        if not ready:  # a kernel opens the stream, not a bias (which reads nothing)
            opens = [[w for w in unit_writers[u] if inputs(w, u) <= solved] for u in remaining]
            ready = [u for u, ws in zip(remaining, opens) if any(len(w.dims) > 1 for w in ws)][:1]
            ready = ready or [u for u, ws in zip(remaining, opens) if ws][:1]
        if not ready:
            waiting = {
                u: sorted(set().union(*(inputs(w, u) for w in unit_writers[u])) - solved) for u in remaining
            }
            raise SpecError(f"groups feed each other in a cycle with no entry point: {waiting}")
        order.extend(ready)
    return tuple(order)


def _heads(items: Sequence[LeafSpec]) -> dict[str, tuple[str, ...]]:
    """``{Heads name: member groups}``; every dim of a member must follow that ``Heads``."""
    heads: dict[str, dict[str, None]] = {}
    seen: dict[str, tuple[str | None, str]] = {}  # group -> (its Heads name, where first seen)
    for leaf in items:
        for dim, (g, name) in enumerate(zip(leaf.dim_groups, leaf.dim_heads)):
            if g is None:
                continue
            first = seen.setdefault(g, (name, leaf.path))
            if first[0] != name:
                here, there = (f"Heads({n!r})" if n else "no Heads" for n in (name, first[0]))
                raise SpecError(
                    f"{leaf.path}: group {g!r} follows {here} (view dim {dim}), but in "
                    f"{first[1]} it follows {there}: a group inside heads must follow the "
                    f"same Heads axis everywhere"
                )
            if name is not None:
                heads.setdefault(name, {})[g] = None
    return {name: tuple(members) for name, members in heads.items()}


@dataclasses.dataclass(frozen=True, init=False, eq=False)
class Spec:
    """Layer topology of a parameter pytree: ``{path: axes}`` for every leaf.

    Built once: the index by path, the parsed views, every group's writers (incoming weights)
    and readers (outgoing weights) and the group order are computed when the Spec is made,
    so reading them costs a dict look-up. Hashable and equal by value (its leaves), so it can
    be a static argument of ``jax.jit``. See the module docstring for the meaning of ``axes``.

    Attributes:
      leaves: one :class:`LeafSpec` per labelled leaf, in the order given.
      groups: every group, in the order they are solved (inputs before the groups they feed).
      units: the steps of that order: a group, or a ``Heads`` name whose members (adjacent
        in ``groups``) are solved together by a two-level plan.
      heads: ``((Heads name, member groups), ...)``: the structured groups (:class:`jfusion.Heads`).

    Examples:
      A Dense layer of 8 hidden neurons (group ``h0``) and a logits layer, by hand and
      from the layer builders (:mod:`jfusion.layers`):

      >>> import jfusion
      >>> from jfusion import layers
      >>> spec = jfusion.Spec({
      ...     "params/Dense_0/kernel": (None, "h0"),  # (in, out): writes h0
      ...     "params/Dense_0/bias": ("h0",),
      ...     "params/Dense_1/kernel": ("h0", None),  # reads h0, writes logits
      ...     "params/Dense_1/bias": (None,),
      ... })
      >>> spec.groups, [leaf.path for leaf in spec.readers("h0")]
      (('h0',), ['params/Dense_1/kernel'])
      >>> spec == jfusion.Spec({**layers.dense("Dense_0", None, "h0"), **layers.dense("Dense_1", "h0", None)})
      True
      >>> spec.validate({"params/Dense_0/kernel": (4, 8), "params/Dense_0/bias": (8,),
      ...                "params/Dense_1/kernel": (8, 3), "params/Dense_1/bias": (3,)})
      {'h0': 8}

      A group that nothing reads is refused when the Spec is built:

      >>> jfusion.Spec({"params/Dense_0/kernel": (None, "h0")})
      Traceback (most recent call last):
        ...
      jfusion.core.errors.SpecError: group 'h0' is written by ['params/Dense_0/kernel'] but no leaf reads it ...

    References:
      - Samuel K. Ainsworth, Jonathan Hayase and Siddhartha Srinivasa. *Git Re-Basin: Merging
        Models modulo Permutation Symmetries.* ICLR 2023 (its permutation specs label
        parameter axes the way a Spec does).
      - Sidak Pal Singh and Martin Jaggi. *Model Fusion via Optimal Transport.* NeurIPS 2020.
    """

    leaves: tuple[LeafSpec, ...]
    groups: tuple[str, ...]
    units: tuple[str, ...]
    heads: tuple[tuple[str, tuple[str, ...]], ...]
    concatenated: tuple[tuple[str, int, int, int], ...]

    def __init__(self, mapping: Mapping[str, Sequence[Entry]] | Iterable[LeafSpec]):
        if isinstance(mapping, Spec):
            mapping = mapping.as_dict()
        given = dict(mapping.items()) if isinstance(mapping, Mapping) else {l.path: l.axes for l in mapping}
        items, concatenated = [], []
        for path, axes in given.items():
            if not isinstance(path, str):
                raise SpecError(f"{path!r}: a leaf path must be a string such as 'params/Dense_0/kernel'")
            where = [i for i, e in enumerate(axes) if isinstance(e, Concat)] if isinstance(axes, (tuple, list)) else []
            if len(where) > 1:
                raise SpecError(f"{path}: axes {where} are both Concat; a leaf has at most one Concat axis")
            if not where:
                items.append(LeafSpec(path, axes))
                continue
            axis, blocks = where[0], axes[where[0]].blocks
            concatenated.append((path, axis, len(blocks), len(axes)))
            for i, block in enumerate(blocks):
                items.append(LeafSpec(part_path(path, i), (*axes[:axis], block, *axes[axis + 1 :])))
        index: dict[str, LeafSpec] = {}
        for leaf in items:
            if leaf.path in index:
                raise SpecError(f"{leaf.path}: labelled twice")
            index[leaf.path] = leaf
        names = list(dict.fromkeys(g for leaf in items for g in leaf.groups))
        writers = {g: tuple(leaf for leaf in items if leaf.output_group == g) for g in names}
        readers = {g: tuple(leaf for leaf in items if g in leaf.input_groups) for g in names}
        heads = _heads(items)
        members = {g for m in heads.values() for g in m}
        for name in heads:
            if name in writers:
                raise SpecError(f"Heads({name!r}) has the name of a group; give the heads their own name")
        for g in names:
            if not writers[g]:
                raise SpecError(
                    f"group {g!r} is read by {[leaf.path for leaf in readers[g]]} but no leaf writes "
                    f"it (carries it on its last axis), so it has no incoming weights to align by"
                )
            if not readers[g] and g not in members:  # q and k are contracted with each other
                raise SpecError(
                    f"group {g!r} is written by {[leaf.path for leaf in writers[g]]} but no leaf reads "
                    f"it (carries it on an axis other than the last): permuting it would change the "
                    f"outputs. A typo in a group name, or a residual branch given a group of its own "
                    f"instead of the stream's, does this"
                )
        units = _order(items, writers, heads)
        object.__setattr__(self, "leaves", tuple(items))
        object.__setattr__(self, "units", units)
        object.__setattr__(self, "heads", tuple(heads.items()))
        object.__setattr__(self, "groups", tuple(g for u in units for g in heads.get(u, (u,))))
        object.__setattr__(self, "_index", index)
        object.__setattr__(self, "_writers", writers)
        object.__setattr__(self, "_readers", readers)
        object.__setattr__(self, "_of", {g: tuple(l for l in items if g in l.groups) for g in names})
        object.__setattr__(self, "concatenated", tuple(concatenated))
        object.__setattr__(self, "_given", given)
        object.__setattr__(self, "_parts", {part_path(p, i): (p, i) for p, _, n, _ in concatenated for i in range(n)})
        object.__setattr__(self, "_hash", hash((self.leaves, self.concatenated)))
        sources = {
            g: {leaf.input_groups for leaf in writers[g] if len(leaf.dims) > 1 and g not in leaf.input_groups}
            for g in names
        }
        object.__setattr__(self, "_streams", tuple(g for g in self.groups if len(sources[g]) > 1))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Spec) and (self.leaves, self.concatenated) == (other.leaves, other.concatenated)

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        width = max((len(repr(path)) for path in self._given), default=0)
        rows = [f"    {path!r:<{width}}: {tuple(axes)!r}," for path, axes in self._given.items()]
        return "Spec({\n" + "\n".join(rows) + f"\n}})  # groups in order: {', '.join(self.groups)}"

    def __getitem__(self, path: str) -> LeafSpec:
        if path not in self._index and path in self._given:
            raise KeyError(
                f"{path} has a Concat axis, so the spec holds its blocks as the leaves "
                f"{list(self.part_paths(path))}; spec.as_dict()[{path!r}] gives its axes as written"
            )
        return self._index[path]

    def __contains__(self, path: str) -> bool:
        return path in self._index

    @property
    def paths(self) -> tuple[str, ...]:
        """The labelled leaves' paths; a :class:`Concat` leaf's part leaves stand for it."""
        return tuple(self._index)

    def as_dict(self) -> dict[str, tuple[Entry, ...]]:
        """``{path: axes}`` as given (a :class:`Concat` leaf under its own path)."""
        return {path: tuple(axes) for path, axes in self._given.items()}

    def part_of(self, path: str) -> tuple[str, int] | None:
        """``(leaf path, block index)`` when ``path`` is a part leaf of a :class:`Concat`, else None."""
        return self._parts.get(path)

    def _blocks(self) -> dict[str, tuple[int, int, int]]:
        return {path: (axis, count, ndim) for path, axis, count, ndim in self.concatenated}

    def split(self, leaves: Mapping[str, Any], widths: Mapping[str, int] | None = None, model: str = "model") -> dict[str, Any]:
        """``leaves`` with every :class:`Concat` leaf replaced, in place, by its part leaves.

        Block ``i``'s size is what its labels give for ``widths`` (the model's group widths;
        :meth:`validate` of the leaves' shapes when None). Arrays are split along the Concat
        axis counted from the end, so a leading model axis (K models stacked, with
        ``widths`` given) is kept; other leaves pass through. Inverse: :meth:`join`.
        """
        if not self.concatenated:
            return dict(leaves)
        if widths is None:
            widths = self.validate({p: np.shape(x) for p, x in leaves.items()}, model)
        blocks, out = self._blocks(), {}
        for path, x in leaves.items():
            if path not in blocks:
                out[path] = x
                continue
            axis, count, ndim = blocks[path]
            sizes = [self._index[part_path(path, i)].axis_size(axis, widths) for i in range(count)]
            if np.ndim(x) < ndim or np.shape(x)[axis - ndim] != sum(sizes):
                raise SpecError(
                    f"{model}: {path} axis {axis} holds blocks of sizes {sizes} for these widths, "
                    f"{sum(sizes)} in all, but the leaf has shape {np.shape(x)}"
                )
            ends = np.cumsum(sizes)[:-1].tolist()
            for i, part in enumerate(jnp.split(jnp.asarray(x), ends, axis=axis - ndim)):
                out[part_path(path, i)] = part
        return out

    def join(self, leaves: Mapping[str, Any]) -> dict[str, Any]:
        """Inverse of :meth:`split`: each Concat leaf's parts concatenated back, where they were."""
        if not self.concatenated:
            return dict(leaves)
        blocks, out = self._blocks(), {}
        for path, x in leaves.items():
            owner = self._parts.get(path)
            if owner is None:
                out[path] = x
            elif owner[1] == 0:
                axis, count, ndim = blocks[owner[0]]
                parts = [leaves[part_path(owner[0], i)] for i in range(count)]
                out[owner[0]] = jnp.concatenate(parts, axis=axis - ndim)
        return out

    def part_paths(self, path: str) -> tuple[str, ...]:
        """The paths ``path`` is known by after :meth:`split`: its part leaves, or itself."""
        count = self._blocks().get(path, (0, 0, 0))[1]
        return tuple(part_path(path, i) for i in range(count)) if count else (path,)

    def writers(self, group: str) -> tuple[LeafSpec, ...]:
        """Leaves whose output group is ``group``: its incoming weights."""
        return self._writers[group]

    def readers(self, group: str) -> tuple[LeafSpec, ...]:
        """Leaves that carry ``group`` on an input dim: its outgoing weights."""
        return self._readers[group]

    @property
    def residual_streams(self) -> tuple[str, ...]:
        """The groups that are residual streams (summed outputs of layers reading different groups).

        A group is a stream when its incoming kernels (writers with dims besides the group;
        not biases or norms, and not recurrent kernels reading the group itself) read more
        than one set of input groups: a ResNet stage's stream is written by the stem or a
        projection and by every block's last conv, each from its own inputs. An LSTM's gates
        all read the same inputs, so a recurrent layer is not one. Weight alignment solves a
        stream from its first writers alone (the group order), the stem and the 1x1
        shortcuts, which a short training run moves least: align such models by activations.
        """
        return self._streams

    def leaves_of(self, group: str) -> tuple[LeafSpec, ...]:
        """Every leaf that carries ``group``."""
        return self._of[group]

    def validate(self, shapes: Mapping[str, Sequence[int]], model: str = "model") -> dict[str, int]:
        """Check the spec against one model's ``{path: shape}``; return its group widths.

        A member group of :class:`jfusion.Heads` has the width ``H * hd``; the ``Heads`` name maps to
        its head count ``H``.

        ``shapes`` may name a :class:`Concat` leaf by its own path (its blocks' sizes are
        then read from the groups' widths, the axis being their sum) or by its part leaves'.

        Raises SpecError naming the path, the axis, and the expected and found sizes.
        """
        shapes = {p: tuple(s) for p, s in shapes.items()}
        concatenated = []  # (path, axis, count, size) of Concat leaves given whole
        for path, axis, count, ndim in self.concatenated:
            if path not in shapes:
                continue
            whole = shapes.pop(path)
            if len(whole) != ndim:
                raise SpecError(f"{model}: {path} has {len(whole)} axes (shape {whole}) but the spec labels {ndim}: {self._given[path]}")
            concatenated.append((path, axis, count, whole[axis]))
            for i in range(count):  # the block's size on the Concat axis comes from the widths
                shapes[part_path(path, i)] = (*whole[:axis], None, *whole[axis + 1 :])
        missing = list(dict.fromkeys((self.part_of(p) or (p,))[0] for p in self.paths if p not in shapes))
        if missing:
            raise SpecError(
                f"{model}: the spec labels {missing} but the pytree has no such leaves "
                f"(it has {list(shapes)[:8]}{'...' if len(shapes) > 8 else ''})"
            )
        unlabelled = [p for p in shapes if p not in self]
        if unlabelled:
            raise SpecError(
                f"{model}: leaves {unlabelled} are not in the spec; label them, or declare them "
                f"ungrouped with one None per axis"
            )
        # Heads names take their head counts, member groups their per-head sizes until the end.
        widths: dict[str, int] = {}
        source: dict[str, str] = {}

        def key(d: Dim) -> Dim:
            return d.name if isinstance(d, Heads) else d

        def record(group: str, size: int, where: str) -> None:
            if group in widths and widths[group] != size:
                raise SpecError(
                    f"{model}: {where} gives group {group!r} size {size}, but {source[group]} "
                    f"gives it size {widths[group]}"
                )
            widths.setdefault(group, size)
            source.setdefault(group, where)

        for leaf in self.leaves:
            shape = tuple(shapes[leaf.path])
            if len(shape) != len(leaf.axes):
                raise SpecError(
                    f"{model}: {leaf.path} has {len(shape)} axes (shape {shape}) but the spec "
                    f"labels {len(leaf.axes)}: {leaf.axes}"
                )
        # Plain axes fix sizes directly; views may need sizes that only other leaves give.
        for leaf in self.leaves:
            for dims in leaf.axis_dims:
                for d in dims:
                    if isinstance(d, Heads) and d.count is not None:
                        record(d.name, d.count, f"{leaf.path} ({d!r})")
        pending = []
        for leaf in self.leaves:
            shape = tuple(shapes[leaf.path])
            for axis, (entry, dims) in enumerate(zip(leaf.axes, leaf.axis_dims)):
                if shape[axis] is None:  # a block of a Concat axis: sized below
                    continue
                if isinstance(entry, (str, Heads)):
                    record(key(entry), shape[axis], f"{leaf.path} axis {axis}")
                elif isinstance(entry, (tuple, list)):
                    pending.append((leaf, axis, dims, shape[axis]))

        def block_size(path: str, i: int, axis: int) -> int | None:
            keys = [key(d) for d in self._index[part_path(path, i)].axis_dims[axis]]
            return None if any(isinstance(k, str) and k not in widths for k in keys) else math.prod(
                widths[k] if isinstance(k, str) else k for k in keys
            )

        def resolve_blocks(path: str, axis: int, count: int, size: int) -> bool:
            """Size a Concat axis's blocks from the widths known; False until it can."""
            sizes = [block_size(path, i, axis) for i in range(count)]
            unknown = [i for i, s in enumerate(sizes) if s is None]
            rest = size - sum(s for s in sizes if s is not None)
            where = f"{path} axis {axis} ({self._given[path][axis]!r})"
            if not unknown:
                if rest:
                    raise SpecError(f"{model}: {where} has size {size}, but its blocks' sizes {sizes} add up to {size - rest}")
                return True
            blocks = {self._index[part_path(path, i)].axis_dims[axis] for i in unknown}
            if len(blocks) > 1:  # blocks of different labels: one of them must be sized elsewhere
                return False
            dims = blocks.pop()
            keys = [key(d) for d in dims]
            missing = [k for k in keys if isinstance(k, str) and k not in widths]
            known = math.prod(widths[k] if isinstance(k, str) else k for k in keys if k not in missing)
            if len(missing) > 1:
                return False
            if rest <= 0 or rest % (len(unknown) * known):
                raise SpecError(
                    f"{model}: {where} has size {size}; its blocks of known size take {size - rest}, which "
                    f"leaves {rest} for {len(unknown)} block(s) {dims} of {known} x {missing[0]!r} each"
                )
            record(missing[0], rest // (len(unknown) * known), where)
            return True

        while pending or concatenated:
            progress, later = False, []
            resolved = [item for item in concatenated if resolve_blocks(*item)]
            progress = bool(resolved)
            concatenated = [item for item in concatenated if item not in resolved]
            for leaf, axis, dims, size in pending:
                keys = [key(d) for d in dims]
                unknown = [k for k in keys if k is None or (isinstance(k, str) and k not in widths)]
                if len(unknown) > 1:
                    later.append((leaf, axis, dims, size))
                    continue
                progress = True
                known = math.prod(widths[k] if isinstance(k, str) else k for k in keys if k not in unknown)
                where = f"{leaf.path} axis {axis} (view {dims})"
                if unknown and unknown[0] is not None:
                    if known == 0 or size % known:
                        raise SpecError(
                            f"{model}: {where} has size {size}, not divisible by the known dims' "
                            f"product {known}"
                        )
                    record(unknown[0], size // known, where)
                elif not unknown and known != size:
                    raise SpecError(f"{model}: {where} has size {size}, but its dims multiply to {known}")
            if not progress:
                if not later:
                    path, axis, _, size = concatenated[0]
                    raise SpecError(
                        f"{model}: {path} axis {axis} (size {size}) is {self._given[path][axis]!r}, whose blocks "
                        f"have more than one unknown size; label their groups on other leaves too"
                    )
                leaf, axis, dims, size = later[0]
                raise SpecError(
                    f"{model}: {leaf.path} axis {axis} (size {size}) has the view {dims} with "
                    f"more than one unknown size; label the groups on other leaves too"
                )
            pending = later
        for group, width in widths.items():
            if width == 0:
                raise SpecError(f"{model}: group {group!r} has width 0 ({source[group]}); a group needs neurons")
        for name, members in self.heads:
            for g in members:
                widths[g] *= widths[name]
        for leaf in self.leaves:
            shape = tuple(s if s is not None else leaf.axis_size(i, widths) for i, s in enumerate(shapes[leaf.path]))
            leaf.view_shape(shape, widths)  # inferred dims must divide evenly
        return widths


# -- One layer's entries ------------------------------------------------------------------
#
# Flax names a layer's leaves the same way in every model: a Dense or Conv has ``kernel``
# (inputs, then outputs last) and ``bias``, a BatchNorm ``scale`` and ``bias`` beside its
# running ``mean`` and ``var``. These builders write those entries, so a Spec is a few
# ``**builder(...)`` lines: ``Spec({**conv("Conv_0", None, "c0"), **batch_norm("BatchNorm_0", "c0")})``.
# Public as ``jfusion.layers``.

Entries = dict[str, tuple[Entry, ...]]


def _layer_paths(name: str, nnx: bool) -> tuple[str, str]:
    """The path prefixes of a layer's parameters and of its batch statistics."""
    if not isinstance(name, str) or not name or name.startswith("/") or name.endswith("/"):
        raise SpecError(
            f"a layer name must be its module path, e.g. 'Dense_0' or 'block/conv1', not {name!r}"
        )
    return (name, name) if nnx else (f"params/{name}", f"batch_stats/{name}")


def dense(name: str, inputs: Entry, outputs: str | None, *, bias: bool = True, nnx: bool = False) -> Entries:
    """A Dense layer's entries (``flax.linen.Dense``, ``nnx.Linear``): ``kernel`` and ``bias``.

    The kernel is ``(inputs, outputs)``, the bias ``(outputs,)``: the layer writes group
    ``outputs`` and reads group ``inputs``.

    Args:
      name: the layer's module path: ``"Dense_0"`` (linen's ``nn.compact`` name),
        ``"stage0_block0/fc"``, or an nnx attribute path such as ``"hidden"`` or ``"layers/0"``.
      inputs: the kernel's input axis: the group the layer reads, ``None`` when it reads the
        model's inputs (never permuted), or a view such as ``(49, "c1")`` for a flattened
        7x7 feature map of group ``c1``.
      outputs: the group the layer writes, or ``None`` for an output layer (logits).
      bias: whether the layer has a bias (``use_bias``).
      nnx: label an ``nnx.State`` (paths ``"name/kernel"``, as ``nnx.split`` gives them)
        instead of linen variables (``"params/name/kernel"``).

    Returns:
      ``{path: axes}`` entries, to be merged into the dict a :class:`jfusion.Spec` is built from.

    Examples:
      >>> import jfusion
      >>> jfusion.layers.dense("Dense_0", None, "h0")
      {'params/Dense_0/kernel': (None, 'h0'), 'params/Dense_0/bias': ('h0',)}
      >>> jfusion.layers.dense("out", "h0", None, nnx=True)
      {'out/kernel': ('h0', None), 'out/bias': (None,)}
    """
    params, _ = _layer_paths(name, nnx)
    entries: Entries = {f"{params}/kernel": (inputs, outputs)}
    if bias:
        entries[f"{params}/bias"] = (outputs,)
    return entries


def conv(
    name: str,
    inputs: str | None,
    outputs: str | None,
    *,
    bias: bool = True,
    spatial: int = 2,
    nnx: bool = False,
) -> Entries:
    """A convolution's entries (``flax.linen.Conv``, ``nnx.Conv``): ``kernel`` and ``bias``.

    Flax stores the kernel as ``(*window, in, out)``, so it is labelled
    ``(None,) * spatial + (inputs, outputs)``: the window positions are never permuted. A
    grouped convolution (``feature_group_count > 1``) needs a view on its input axis and is
    written by hand.

    Args:
      name: the layer's module path (``"Conv_0"``, ``"stage1_block0/conv1"``, ``"conv"``).
      inputs: the group the convolution reads, or ``None`` for the image channels.
      outputs: the group it writes, or ``None``.
      bias: whether it has a bias (``use_bias``; the ResNets' convs have none).
      spatial: the number of window dimensions (2 for images, 1 for sequences).
      nnx: label an ``nnx.State`` instead of linen variables (see :func:`dense`).

    Returns:
      ``{path: axes}`` entries for a :class:`jfusion.Spec`.

    Examples:
      >>> import jfusion
      >>> jfusion.layers.conv("Conv_1", "c0", "c1")
      {'params/Conv_1/kernel': (None, None, 'c0', 'c1'), 'params/Conv_1/bias': ('c1',)}
      >>> jfusion.layers.conv("conv", None, "c", bias=False, spatial=1, nnx=True)
      {'conv/kernel': (None, None, 'c')}
    """
    if not isinstance(spatial, int) or isinstance(spatial, bool) or spatial < 0:
        raise SpecError(f"{name}: spatial is the number of window dimensions, an int >= 0, not {spatial!r}")
    params, _ = _layer_paths(name, nnx)
    entries: Entries = {f"{params}/kernel": (None,) * spatial + (inputs, outputs)}
    if bias:
        entries[f"{params}/bias"] = (outputs,)
    return entries


def batch_norm(name: str, group: str, *, scale: bool = True, bias: bool = True, nnx: bool = False) -> Entries:
    """A BatchNorm's four entries: ``scale`` and ``bias``, running ``mean`` and ``var``.

    All four carry the channels of ``group`` (the group of the layer the norm follows). In
    linen variables the parameters live in the ``params`` collection and the statistics in
    ``batch_stats`` (``"params/name/scale"``, ``"batch_stats/name/mean"``); in an
    ``nnx.State`` all four sit under the module (``"name/scale"``, ``"name/mean"``).

    Args:
      name: the norm's module path (``"BatchNorm_0"``, ``"stage0_block0/bn1"``, ``"norm"``).
      group: the channels it normalises.
      scale: whether it has a scale (``use_scale``).
      bias: whether it has a bias (``use_bias``).
      nnx: label an ``nnx.State`` instead of linen variables (see :func:`dense`).

    Returns:
      ``{path: axes}`` entries for a :class:`jfusion.Spec`, parameters first.

    Examples:
      >>> import jfusion
      >>> for path, axes in jfusion.layers.batch_norm("BatchNorm_0", "c0").items():
      ...     print(path, axes)
      params/BatchNorm_0/scale ('c0',)
      params/BatchNorm_0/bias ('c0',)
      batch_stats/BatchNorm_0/mean ('c0',)
      batch_stats/BatchNorm_0/var ('c0',)
      >>> list(jfusion.layers.batch_norm("norm", "h", nnx=True))
      ['norm/scale', 'norm/bias', 'norm/mean', 'norm/var']
    """
    params, stats = _layer_paths(name, nnx)
    entries: Entries = {}
    if scale:
        entries[f"{params}/scale"] = (group,)
    if bias:
        entries[f"{params}/bias"] = (group,)
    entries[f"{stats}/mean"] = (group,)
    entries[f"{stats}/var"] = (group,)
    return entries


def layer_norm(name: str, group: str, *, scale: bool = True, bias: bool = True, nnx: bool = False) -> Entries:
    """A LayerNorm's (or RMSNorm's, with ``bias=False``) entries: ``scale`` and ``bias``.

    Normalising over the features does not depend on their order, so permuting ``group``
    permutes the scale and bias with it. Not for GroupNorm with more than one group: its
    statistics are per block of channels, which a permutation would mix.

    Args:
      name: the norm's module path (``"LayerNorm_0"``, ``"block/ln"``).
      group: the features it normalises.
      scale: whether it has a scale (``use_scale``).
      bias: whether it has a bias (``use_bias``; RMSNorm has none).
      nnx: label an ``nnx.State`` instead of linen variables (see :func:`dense`).

    Returns:
      ``{path: axes}`` entries for a :class:`jfusion.Spec`.

    Examples:
      >>> import jfusion
      >>> jfusion.layers.layer_norm("LayerNorm_0", "h0")
      {'params/LayerNorm_0/scale': ('h0',), 'params/LayerNorm_0/bias': ('h0',)}
    """
    params, _ = _layer_paths(name, nnx)
    entries: Entries = {}
    if scale:
        entries[f"{params}/scale"] = (group,)
    if bias:
        entries[f"{params}/bias"] = (group,)
    return entries


def embed(name: str, outputs: str | None, *, nnx: bool = False) -> Entries:
    """An embedding table's entry (``flax.linen.Embed``, ``nnx.Embed``): ``embedding``.

    The table is ``(num_embeddings, features)``: the token index is never permuted, the
    features are the group the embedding writes.

    Args:
      name: the module path (``"Embed_0"``, ``"tokens"``).
      outputs: the group of the embedding features, or ``None``.
      nnx: label an ``nnx.State`` instead of linen variables (see :func:`dense`).

    Returns:
      ``{path: axes}`` entries for a :class:`jfusion.Spec`.

    Examples:
      >>> import jfusion
      >>> jfusion.layers.embed("Embed_0", "e")
      {'params/Embed_0/embedding': (None, 'e')}
    """
    params, _ = _layer_paths(name, nnx)
    return {f"{params}/embedding": (None, outputs)}


def attention(
    name: str,
    inputs: str | None,
    heads: str,
    outputs: str | None = None,
    *,
    bias: bool = True,
    nnx: bool = False,
) -> Entries:
    """Multi-head attention's entries (``flax.linen.MultiHeadDotProductAttention``, ``nnx.MultiHeadAttention``).

    The ``query``, ``key`` and ``value`` kernels are ``(d, H, hd)`` and their biases
    ``(H, hd)``; the ``out`` kernel is ``(H, hd, d)`` and its bias ``(d,)``. The heads are
    :class:`jfusion.Heads` ``heads``, with two members: ``f"{heads}.qk"``, the dims shared by the
    queries and keys (``softmax(q k^T / sqrt(hd)) v`` contracts them with each other), and
    ``f"{heads}.vo"``, those of the values, read by the output projection.

    Args:
      name: the attention module's path (``"block0/attn"``).
      inputs: the group the projections read (the residual stream), or None.
      heads: the name of the structured group (one per attention layer).
      outputs: the group the output projection writes; ``inputs`` when None (a residual block).
      bias: whether the projections have biases (``use_bias``).
      nnx: label an ``nnx.State`` instead of linen variables (see :func:`dense`).

    Returns:
      ``{path: axes}`` entries for a :class:`jfusion.Spec`.

    Examples:
      >>> import jfusion
      >>> for path, axes in jfusion.layers.attention("attn", "r", "b0", bias=False).items():
      ...     print(path, axes)
      params/attn/query/kernel ('r', Heads('b0'), 'b0.qk')
      params/attn/key/kernel ('r', Heads('b0'), 'b0.qk')
      params/attn/value/kernel ('r', Heads('b0'), 'b0.vo')
      params/attn/out/kernel (Heads('b0'), 'b0.vo', 'r')

    References:
      - Ashish Vaswani et al. *Attention Is All You Need.* NeurIPS 2017.
    """
    params, _ = _layer_paths(name, nnx)
    outputs = inputs if outputs is None else outputs
    entries: Entries = {}
    for projection, member in (("query", "qk"), ("key", "qk"), ("value", "vo")):
        entries[f"{params}/{projection}/kernel"] = (inputs, Heads(heads), f"{heads}.{member}")
        if bias:
            entries[f"{params}/{projection}/bias"] = (Heads(heads), f"{heads}.{member}")
    entries[f"{params}/out/kernel"] = (Heads(heads), f"{heads}.vo", outputs)
    if bias:
        entries[f"{params}/out/bias"] = (outputs,)
    return entries


def fused_attention(
    name: str,
    inputs: str | None,
    heads: str,
    count: int,
    outputs: str | None = None,
    *,
    qkv: str = "qkv",
    out: str = "out",
    bias: bool = True,
    nnx: bool = False,
) -> Entries:
    """Entries of attention with one fused q/k/v projection: Dense kernels ``qkv (d, 3 H hd)`` and ``out (H hd, d)``.

    The fused projection's outputs are the queries, the keys and the values laid end to
    end, each head-major (``(3, H, hd)`` in C order, as ``reshape(..., 3, H, hd)`` splits
    them), so its output axis is a :class:`jfusion.Concat` of three blocks: q and k carry
    the member ``f"{heads}.qk"``, v the member ``f"{heads}.vo"`` that the output projection
    reads. The symmetry is the one of separate kernels (:func:`attention`): one permutation
    of the heads, and inside each head one permutation for q/k and another for v/o.

    Args:
      name: the attention module's path.
      inputs: the group the projections read (the residual stream), or None.
      heads: the structured group's name; its members are ``f"{heads}.qk"`` and ``f"{heads}.vo"``.
      count: the number of heads ``H`` (no leaf has the heads on an axis of their own).
      outputs: the group the output projection writes; ``inputs`` when None.
      qkv: the fused projection's module name inside ``name``.
      out: the output projection's module name inside ``name``.
      bias: whether the projections have biases.
      nnx: label an ``nnx.State`` instead of linen variables (see :func:`dense`).

    Returns:
      ``{path: axes}`` entries for a :class:`jfusion.Spec`.

    Examples:
      >>> import jfusion
      >>> for path, axes in jfusion.layers.fused_attention("attn", "r", "b0", 4, bias=False).items():
      ...     print(path, axes)
      params/attn/qkv/kernel ('r', Concat((Heads('b0', 4), 'b0.qk'), (Heads('b0', 4), 'b0.qk'), (Heads('b0', 4), 'b0.vo')))
      params/attn/out/kernel ((Heads('b0', 4), 'b0.vo'), 'r')
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise SpecError(f"{name}: count is the number of heads, an int >= 1, not {count!r}")
    params, _ = _layer_paths(name, nnx)
    outputs = inputs if outputs is None else outputs
    qk, vo = ((Heads(heads, count), f"{heads}.{member}") for member in ("qk", "vo"))
    blocks = Concat(qk, qk, vo)
    entries: Entries = {f"{params}/{qkv}/kernel": (inputs, blocks)}
    if bias:
        entries[f"{params}/{qkv}/bias"] = (blocks,)
    entries[f"{params}/{out}/kernel"] = (vo, outputs)
    if bias:
        entries[f"{params}/{out}/bias"] = (outputs,)
    return entries


def bias(name: str, group: str | None, *, nnx: bool = False) -> Entries:
    """A lone ``bias`` leaf of ``group``: a layer's bias labelled apart from its kernel.

    For modules that hold a bias without a kernel, or whose kernel is labelled otherwise
    (a recurrent cell's hidden-to-hidden gate: ``dense(..., bias=False)`` then ``bias(...)``).

    Args:
      name: the module path holding the bias.
      group: the group it writes, or ``None``.
      nnx: label an ``nnx.State`` instead of linen variables (see :func:`dense`).

    Returns:
      ``{path: axes}`` entries for a :class:`jfusion.Spec`.

    Examples:
      >>> import jfusion
      >>> jfusion.layers.bias("Recurrent_0/hi", "r0")
      {'params/Recurrent_0/hi/bias': ('r0',)}
    """
    params, _ = _layer_paths(name, nnx)
    return {f"{params}/bias": (group,)}
