"""Specs traced from the model: :func:`trace_spec` reads the layer topology off the jaxpr.

The idea. Permuting the neurons of a group is a symmetry of the network when every
operation that sees those neurons is *equivariant* to the permutation: element-wise ops,
broadcasts and reductions are, a matmul is when both sides of its contraction are permuted
alike, and so on. So every axis of every value in the jaxpr is a node of a union-find, and
each primitive's rule says which axes it ties together (a ``dot_general`` ties its
contracting dims, an ``add`` ties every axis of its operands to the output's), which axes it
*pins* (the spatial axes of a convolution, a sliced position, a scan's time axis: positions
there matter, so they are never permuted), and which it leaves free (a reduced axis ties
nothing: the mean of LayerNorm does not care about the order of the features). The inputs'
and the outputs' axes are pinned too. A class of axes that holds a variable's axis and is
not pinned is a neuron group. Ties come from the structure alone -- never from two axes
having the same size.

Reshapes do not tie axes one to one: flattening an ``H x W x C`` map into a Dense layer's
input axis makes that axis a product. Those relations are kept apart, each axis class gets a
factorisation (the common refinement of every product it takes part in), and the factors
become the *views* of the Spec, e.g. ``((49, "Conv_1"), "Dense_0")``. The same machinery
labels grouped convolutions and equal blocks (concatenated or split gates): a block axis
``k x m`` has its block index pinned and its ``m`` tied to each block.

Attention heads are recognised from where the classes sit on the leaves: the heads axis of
stock attention is a batch dim of ``q . k`` and of ``p . v`` and is contracted with the dims
inside each head by the output projection, so no leaf carries it last, and on every leaf it
comes right before a class of within-head dims (q/k's, v/o's) that nothing else precedes.
Such a class becomes :class:`jfusion.Heads`, its followers its members (``q . k`` contracts
q/k's dims with each other, so that member needs no reader), which lets every head permute
its own dims -- more than the union-find's one permutation per class can say. The blocks of
a fused q/k/v projection are one class too (a reshape gives the block index its own axis,
but the dims after it one node for every block); their finer labellings are the one thing
not read off the structure: they are tried, and kept when the function is (see
:func:`trace_spec`).

A primitive without a rule stops the trace with a :class:`TraceError` naming it, the leaves
its operands come from and the source line; ``unknown="tie"`` pins every axis it touches
instead, which can only leave groups out, never permute too much. The traced spec is then
checked with :func:`jfusion.check_spec` on perturbed copies of the variables.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.extend.core as jex
from flax import nnx

from jfusion.check import check_spec, permutation_error
from jfusion.core.errors import SpecError
from jfusion.core.spec import Concat, Heads, LeafSpec, Spec
from jfusion.core.tree import PyTree, flatten, module_path

Node = Hashable
Axes = tuple[Node | None, ...]  # one node per axis; None for an axis of size 1
UNKNOWN_MODES = ("error", "tie")


class TraceError(SpecError):
    """``trace_spec`` met a primitive it has no rule for, or its traced spec failed the check."""


class _Unsupported(Exception):
    """Raised by a rule for a use of its primitive that it does not model."""


def _source_line(eqn: Any) -> str:
    # source_info_util is jax-internal; its summary is only for the message.
    try:
        from jax._src import source_info_util

        return source_info_util.summarize(eqn.source_info)
    except Exception:  # noqa: BLE001 -- any failure only loses the location
        return "an unknown source line"


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[Node, Node] = {}

    def find(self, node: Node) -> Node:
        root = node
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while node != root:  # path compression
            self.parent[node], node = root, self.parent[node]
        return root

    def union(self, a: Node, b: Node) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


class _Site:
    """One equation seen by a rule: its params, operands' and results' axes and shapes."""

    def __init__(self, eqn: Any, ins: list[Axes], outs: list[Axes], origins: list[frozenset]):
        self.eqn, self.ins, self.outs, self.origins = eqn, ins, outs, origins
        self.params = eqn.params

    def in_shape(self, i: int) -> tuple[int, ...]:
        return tuple(self.eqn.invars[i].aval.shape)

    def out_shape(self, i: int) -> tuple[int, ...]:
        return tuple(self.eqn.outvars[i].aval.shape)


class _Tracer:
    """The union-find over (value, axis) nodes, filled by walking a jaxpr's equations.

    Nodes are ``(frame, var, axis)``: a sub-jaxpr is walked in a fresh frame at every call
    site, so one jitted helper called on two layers does not tie the two layers together.
    """

    def __init__(self, leaf_paths: Sequence[str], unknown: str):
        self.uf = _UnionFind()
        self.size: dict[Node, int] = {}
        self.pinned: set[Node] = set()
        self.products: list[tuple[tuple[Node, ...], tuple[Node, ...]]] = []
        self.leaf_paths = leaf_paths
        self.unknown = unknown
        self.origins: dict[tuple[int, Any], frozenset] = {}
        self.first_use: dict[int, int] = {}  # leaf index -> the equation that first read it
        self._fresh = 0

    # -- nodes ---------------------------------------------------------------------------

    def _new_key(self) -> int:
        self._fresh += 1
        return self._fresh

    def virtual(self, size: int) -> Node | None:
        """A node of no value: the block index or per-group part of a factored axis."""
        if size == 1:
            return None
        node = ("virtual", self._new_key())
        self.size[node] = size
        return node

    def axes(self, frame: int, atom: Any) -> Axes:
        shape = tuple(getattr(atom.aval, "shape", ()))
        if isinstance(atom, (jex.Literal, jex.DropVar)):
            # A literal is a constant (pinned); a dropped result is never read, and DropVar
            # objects may be shared, so neither may tie anything.
            nodes = tuple(self.virtual(n) for n in shape)
            if isinstance(atom, jex.Literal):
                self.pin(*nodes)
            return nodes
        nodes = []
        for i, n in enumerate(shape):
            if n == 1:
                nodes.append(None)
                continue
            node = (frame, atom, i)
            self.size[node] = n
            nodes.append(node)
        return tuple(nodes)

    # -- relations -----------------------------------------------------------------------

    def tie(self, a: Node | None, b: Node | None) -> None:
        if a is not None and b is not None:
            self.uf.union(a, b)

    def tie_axes(self, a: Axes, b: Axes) -> None:
        for x, y in zip(a, b, strict=True):
            self.tie(x, y)

    def pin(self, *nodes: Node | None) -> None:
        self.pinned.update(n for n in nodes if n is not None)

    def product(self, ins: Iterable[Node | None], outs: Iterable[Node | None]) -> None:
        """The C-order product of ``ins`` is the C-order product of ``outs``, index for index."""
        ins = tuple(n for n in ins if n is not None)
        outs = tuple(n for n in outs if n is not None)
        if len(ins) == 1 and len(outs) == 1:
            self.tie(ins[0], outs[0])
        elif ins or outs:
            self.products.append((ins, outs))

    def blocks(self, whole: Node | None, parts: Sequence[Node | None], count: int) -> None:
        """``whole`` is ``count`` equal blocks, each one of ``parts``: block index pinned."""
        if whole is None:
            return
        index, within = self.virtual(count), self.virtual(self.size[whole] // count)
        self.product([whole], [index, within])
        self.pin(index)
        for part in parts:
            self.tie(part, within)

    # -- walking -------------------------------------------------------------------------

    def call(self, jaxpr: Any, in_axes: Sequence[Axes], out_axes: Sequence[Axes], in_origins: Sequence[frozenset]) -> None:
        """Walk a (closed) sub-jaxpr in a fresh frame, its invars and outvars tied to these."""
        frame = self._new_key()
        inner = getattr(jaxpr, "jaxpr", jaxpr)
        if len(inner.invars) != len(in_axes) or len(inner.outvars) != len(out_axes):
            raise _Unsupported(
                f"its sub-jaxpr takes {len(inner.invars)} values and returns {len(inner.outvars)}, "
                f"the call site passes {len(in_axes)} and receives {len(out_axes)}"
            )
        for var in inner.constvars:
            self.pin(*self.axes(frame, var))
        for var, axes, origin in zip(inner.invars, in_axes, in_origins):
            inner_axes = self.axes(frame, var)
            if len(inner_axes) != len(axes):
                raise _Unsupported("its sub-jaxpr's arguments have other ranks than the call site's")
            self.tie_axes(inner_axes, axes)
            self.origins[(frame, var)] = origin
        self.walk(frame, inner)
        for var, axes in zip(inner.outvars, out_axes):
            self.tie_axes(self.axes(frame, var), axes)

    def walk(self, frame: int, jaxpr: Any) -> None:
        for eqn in jaxpr.eqns:
            ins = [self.axes(frame, v) for v in eqn.invars]
            outs = [self.axes(frame, v) for v in eqn.outvars]
            origins = [self.origins.get((frame, v), frozenset()) if not isinstance(v, jex.Literal) else frozenset() for v in eqn.invars]
            site = _Site(eqn, ins, outs, origins)
            rule = _RULES.get(eqn.primitive.name)
            try:
                if rule is None:
                    raise _Unsupported("no rule for it")
                rule(self, site)
            except _Unsupported as why:
                self.unsupported(site, str(why))
            merged = frozenset().union(*origins)
            for leaf in merged:
                self.first_use.setdefault(leaf, len(self.first_use))
            for v in eqn.outvars:
                self.origins[(frame, v)] = merged

    def unsupported(self, site: _Site, why: str) -> None:
        nodes = [n for axes in (*site.ins, *site.outs) for n in axes]
        if self.unknown == "tie":
            self.pin(*nodes)
            return
        # Name the leaves read last before this equation: the layer it follows.
        leaves = sorted(frozenset().union(*site.origins), key=lambda i: self.first_use.get(i, len(self.first_use)))
        named = [self.leaf_paths[i] for i in leaves[-4:]]
        came = (
            f"its operands are computed from {'..., ' if len(leaves) > 4 else ''}{', '.join(named)}"
            if named
            else "its operands depend on no variable"
        )
        raise TraceError(
            f"trace_spec cannot follow the primitive {site.eqn.primitive.name!r} ({why}) at "
            f"{_source_line(site.eqn)}; {came}. Pass unknown='tie' to treat it conservatively "
            f"(every axis it touches stays unpermuted), or write the spec by hand"
        )


# -- rules -------------------------------------------------------------------------------
# Each rule ties, pins or leaves free the axes of one primitive's operands and results.

Rule = Callable[[_Tracer, _Site], None]


def _elementwise(t: _Tracer, s: _Site) -> None:
    for out in s.outs:
        for axes in s.ins:
            if len(axes) == len(out):
                t.tie_axes(axes, out)
            elif axes:  # scalars broadcast; lax allows nothing else
                raise _Unsupported(f"an operand of rank {len(axes)} against a result of rank {len(out)}")


def _one_to_one(t: _Tracer, s: _Site) -> None:
    for a, b in zip(s.ins, s.outs, strict=True):
        t.tie_axes(a, b)


def _no_effect(t: _Tracer, s: _Site) -> None:
    """Callbacks that only print (``jax.debug.print``): they do not reach the outputs."""


def _pin_all(t: _Tracer, s: _Site) -> None:
    t.pin(*(n for axes in (*s.ins, *s.outs) for n in axes))


def _broadcast_in_dim(t: _Tracer, s: _Site) -> None:
    # New axes are copies (free); a size-1 operand axis has no node, so it ties nothing.
    for axis, dim in enumerate(s.params["broadcast_dimensions"]):
        t.tie(s.ins[0][axis], s.outs[0][dim])


def _reshape_blocks(old: Sequence[int], new: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """The smallest runs of axes of ``old`` and ``new`` whose sizes multiply to the same number."""
    if 0 in old:
        raise _Unsupported("a reshape of an empty array")
    olds = [i for i, n in enumerate(old) if n != 1]
    news = [j for j, n in enumerate(new) if n != 1]
    blocks, i, j = [], 0, 0
    while i < len(olds):
        block_old, block_new = [olds[i]], [news[j]]
        p_old, p_new = old[olds[i]], new[news[j]]
        i, j = i + 1, j + 1
        while p_old != p_new:
            if p_old < p_new:
                block_old.append(olds[i])
                p_old *= old[olds[i]]
                i += 1
            else:
                block_new.append(news[j])
                p_new *= new[news[j]]
                j += 1
        blocks.append((block_old, block_new))
    return blocks


def _reshape(t: _Tracer, s: _Site) -> None:
    if s.params.get("dimensions") is not None:
        raise _Unsupported("a reshape that transposes (dimensions=...)")
    for old, new in _reshape_blocks(s.in_shape(0), s.out_shape(0)):
        t.product([s.ins[0][i] for i in old], [s.outs[0][j] for j in new])


def _transpose(t: _Tracer, s: _Site) -> None:
    for out_axis, in_axis in enumerate(s.params["permutation"]):
        t.tie(s.ins[0][in_axis], s.outs[0][out_axis])


def _squeeze(t: _Tracer, s: _Site) -> None:
    squeezed = _canonical(s.params["dimensions"], len(s.ins[0]))
    t.tie_axes(tuple(n for i, n in enumerate(s.ins[0]) if i not in squeezed), s.outs[0])


def _canonical(axes: Iterable[int], rank: int) -> set[int]:
    return {a % rank for a in axes}


def _reduce(t: _Tracer, s: _Site) -> None:
    # Sums, maxima, products over an axis do not see its order: that axis ties nothing.
    reduced = _canonical(s.params["axes"], len(s.ins[0]))
    for operand, out in zip(s.ins, s.outs):
        t.tie_axes(tuple(n for i, n in enumerate(operand) if i not in reduced), out)


def _arg_reduce(t: _Tracer, s: _Site) -> None:
    # An argmax returns a position along the reduced axis: that axis is pinned.
    reduced = _canonical(s.params["axes"], len(s.ins[0]))
    t.pin(*(s.ins[0][i] for i in reduced))
    t.tie_axes(tuple(n for i, n in enumerate(s.ins[0]) if i not in reduced), s.outs[0])


def _cumulative(t: _Tracer, s: _Site) -> None:
    axis = s.params["axis"] % len(s.ins[0])
    t.pin(s.ins[0][axis], s.outs[0][axis])
    t.tie_axes(s.ins[0], s.outs[0])


def _rev(t: _Tracer, s: _Site) -> None:
    flipped = _canonical(s.params["dimensions"], len(s.ins[0]))
    t.pin(*(s.ins[0][i] for i in flipped))
    t.tie_axes(s.ins[0], s.outs[0])


def _pad(t: _Tracer, s: _Site) -> None:
    for axis, config in enumerate(s.params["padding_config"]):
        if tuple(config) == (0, 0, 0):
            t.tie(s.ins[0][axis], s.outs[0][axis])
        else:
            t.pin(s.ins[0][axis], s.outs[0][axis])


def _dot_general(t: _Tracer, s: _Site) -> None:
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = s.params["dimension_numbers"]
    lhs, rhs, out = s.ins[0], s.ins[1], s.outs[0]
    for a, b in zip(lhs_contract, rhs_contract):
        t.tie(lhs[a], rhs[b])
    lhs_free = [d for d in range(len(lhs)) if d not in lhs_contract and d not in lhs_batch]
    rhs_free = [d for d in range(len(rhs)) if d not in rhs_contract and d not in rhs_batch]
    # The result's axes: batch dims, then the lhs's free dims, then the rhs's.
    sources = [(lhs[a], rhs[b]) for a, b in zip(lhs_batch, rhs_batch)]
    sources += [(lhs[d], None) for d in lhs_free] + [(rhs[d], None) for d in rhs_free]
    for out_node, (a, b) in zip(out, sources, strict=True):
        t.tie(out_node, a)
        t.tie(out_node, b)


def _conv(t: _Tracer, s: _Site) -> None:
    if s.params["batch_group_count"] != 1:
        raise _Unsupported("batch_group_count > 1")
    dims = s.params["dimension_numbers"]
    lhs, rhs, out = s.ins[0], s.ins[1], s.outs[0]
    lhs_spec, rhs_spec, out_spec = dims.lhs_spec, dims.rhs_spec, dims.out_spec
    t.tie(lhs[lhs_spec[0]], out[out_spec[0]])
    # A convolution slides over positions: spatial axes (and kernel taps) are never permuted.
    t.pin(*(lhs[d] for d in lhs_spec[2:]), *(rhs[d] for d in rhs_spec[2:]), *(out[d] for d in out_spec[2:]))
    x_in, k_in, k_out, y_out = lhs[lhs_spec[1]], rhs[rhs_spec[1]], rhs[rhs_spec[0]], out[out_spec[1]]
    groups = s.params["feature_group_count"]
    if groups == 1:
        t.tie(x_in, k_in)
        t.tie(k_out, y_out)
        return
    # Grouped: input channels are (groups, per-group in), kernel and output channels
    # (groups, per-group out); the group index is shared, so it may be permuted too.
    channels_in, channels_out = s.in_shape(0)[lhs_spec[1]], s.out_shape(0)[out_spec[1]]
    group, per_in, per_out = t.virtual(groups), t.virtual(channels_in // groups), t.virtual(channels_out // groups)
    t.product([x_in], [group, per_in])
    t.tie(k_in, per_in)
    t.product([k_out], [group, per_out])
    t.product([y_out], [group, per_out])


def _reduce_window(t: _Tracer, s: _Site) -> None:
    p = s.params
    windows = zip(p["window_dimensions"], p["window_strides"], p["padding"], p["base_dilation"], p["window_dilation"])
    identity = [w == 1 and st == 1 and tuple(pad) == (0, 0) and bd == 1 and wd == 1 for w, st, pad, bd, wd in windows]
    for operand, out in zip(s.ins, s.outs):  # generic reduce_window: init values come after
        for axis, same in enumerate(identity):
            if same:
                t.tie(operand[axis], out[axis])
            else:
                t.pin(operand[axis], out[axis])


def _concatenate(t: _Tracer, s: _Site) -> None:
    axis = s.params["dimension"]
    out = s.outs[0]
    for operand in s.ins:
        t.tie_axes(tuple(n for i, n in enumerate(operand) if i != axis), tuple(n for i, n in enumerate(out) if i != axis))
    sizes = {shape[axis] for shape in map(s.in_shape, range(len(s.ins)))}
    if len(sizes) == 1:
        t.blocks(out[axis], [operand[axis] for operand in s.ins], len(s.ins))
    else:  # blocks of different sizes are no product of axes: keep them in place
        t.pin(out[axis], *(operand[axis] for operand in s.ins))


def _slice(t: _Tracer, s: _Site) -> None:
    shape, strides = s.in_shape(0), s.params["strides"] or (1,) * len(s.ins[0])
    for axis, (start, stop, stride) in enumerate(zip(s.params["start_indices"], s.params["limit_indices"], strides)):
        whole, part, width = s.ins[0][axis], s.outs[0][axis], stop - start
        if (start, stop, stride) == (0, shape[axis], 1):
            t.tie(whole, part)
        elif stride == 1 and width > 0 and shape[axis] % width == 0 and start % width == 0:
            t.blocks(whole, [part], shape[axis] // width)
        else:
            t.pin(whole, part)


def _split(t: _Tracer, s: _Site) -> None:
    axis = s.params["axis"]
    for out in s.outs:
        t.tie_axes(tuple(n for i, n in enumerate(s.ins[0]) if i != axis), tuple(n for i, n in enumerate(out) if i != axis))
    parts = [out[axis] for out in s.outs]
    if len(set(s.params["sizes"])) == 1:
        t.blocks(s.ins[0][axis], parts, len(parts))
    else:
        t.pin(s.ins[0][axis], *parts)


def _dynamic_slice(t: _Tracer, s: _Site) -> None:
    for axis, size in enumerate(s.params["slice_sizes"]):
        if size == s.in_shape(0)[axis]:
            t.tie(s.ins[0][axis], s.outs[0][axis])
        else:  # a position chosen at run time
            t.pin(s.ins[0][axis], s.outs[0][axis])


def _dynamic_update_slice(t: _Tracer, s: _Site) -> None:
    operand, update, out = s.ins[0], s.ins[1], s.outs[0]
    for axis in range(len(operand)):
        if s.in_shape(1)[axis] == s.in_shape(0)[axis]:
            t.tie(operand[axis], update[axis])
            t.tie(operand[axis], out[axis])
        else:
            t.pin(operand[axis], update[axis], out[axis])


def _gather(t: _Tracer, s: _Site) -> None:
    dims, sizes = s.params["dimension_numbers"], s.params["slice_sizes"]
    if getattr(dims, "operand_batching_dims", ()):
        raise _Unsupported("a gather with batching dims")
    operand, indices, out = s.ins[0], s.ins[1], s.outs[0]
    kept = [d for d in range(len(operand)) if d not in dims.collapsed_slice_dims]
    t.pin(*(operand[d] for d in dims.collapsed_slice_dims))
    for d, out_axis in zip(kept, dims.offset_dims, strict=True):
        if sizes[d] == s.in_shape(0)[d]:  # a full slice: its start is clamped to 0
            t.tie(operand[d], out[out_axis])
        else:
            t.pin(operand[d], out[out_axis])
    # The result's other axes are the indices' batch axes; the last index axis is a position.
    batch = [d for d in range(len(out)) if d not in dims.offset_dims]
    t.tie_axes(indices[:-1], tuple(out[d] for d in batch))
    t.pin(indices[-1] if indices else None)


def _call(t: _Tracer, s: _Site) -> None:
    for name in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        if name in s.params:
            t.call(s.params[name], s.ins, s.outs, s.origins)
            return
    raise _Unsupported("a call without a jaxpr parameter")


def _scan(t: _Tracer, s: _Site) -> None:
    consts, carries = s.params["num_consts"], s.params["num_carry"]
    init, xs = s.ins[consts : consts + carries], s.ins[consts + carries :]
    final, ys = s.outs[:carries], s.outs[carries:]
    # The scanned axis is time (or layers): steps are not interchangeable.
    t.pin(*(x[0] for x in xs if x), *(y[0] for y in ys if y))
    for a, b in zip(init, final, strict=True):
        t.tie_axes(a, b)
    # Walking the body once ties its carry-in to its carry-out: every step sees one group.
    body_in = [*s.ins[:consts], *init, *(x[1:] for x in xs)]
    t.call(s.params["jaxpr"], body_in, [*init, *(y[1:] for y in ys)], s.origins)


def _while(t: _Tracer, s: _Site) -> None:
    cond_consts, body_consts = s.params["cond_nconsts"], s.params["body_nconsts"]
    init = s.ins[cond_consts + body_consts :]
    for a, b in zip(init, s.outs, strict=True):
        t.tie_axes(a, b)
    carry_origins = s.origins[cond_consts + body_consts :]
    t.call(s.params["cond_jaxpr"], [*s.ins[:cond_consts], *init], [()], [*s.origins[:cond_consts], *carry_origins])
    t.call(s.params["body_jaxpr"], s.ins[cond_consts:], list(init), s.origins[cond_consts:])


def _cond(t: _Tracer, s: _Site) -> None:
    for branch in s.params["branches"]:
        t.call(branch, s.ins[1:], s.outs, s.origins[1:])


_ELEMENTWISE = (
    "abs", "acos", "acosh", "add", "add_any", "and", "asin", "asinh", "atan", "atan2", "atanh",
    "cbrt", "ceil", "clamp", "complex", "conj", "convert_element_type", "copy", "copy_p", "cos",
    "cosh", "digamma", "div", "eq", "erf", "erf_inv", "erfc", "exp", "exp2", "expm1", "floor",
    "ge", "gt", "igamma", "igammac", "imag", "integer_pow", "is_finite", "le", "lgamma", "log",
    "log1p", "logistic", "lt", "max", "min", "mul", "ne", "neg", "nextafter", "not", "or",
    "polygamma", "population_count", "pow", "real", "reduce_precision", "rem", "round", "rsqrt",
    "select_n", "shift_left", "shift_right_arithmetic", "shift_right_logical", "sign", "sin",
    "sinh", "sqrt", "square", "stop_gradient", "sub", "tan", "tanh", "xor", "zeta",
)
# Random bits and iota are positional (a mask or an index per position): pinned.
_POSITIONAL = (
    "iota", "random_bits", "random_fold_in", "random_seed", "random_split", "random_unwrap",
    "random_wrap", "rng_bit_generator", "rng_uniform", "threefry2x32",
)
_CALLS = (
    "pjit", "jit", "closed_call", "core_call", "remat", "remat2", "checkpoint",
    "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr",
)
_REDUCTIONS = ("reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or", "reduce_xor")

_RULES: dict[str, Rule] = {
    **{name: _elementwise for name in _ELEMENTWISE},
    **{name: _pin_all for name in _POSITIONAL},
    **{name: _call for name in _CALLS},
    **{name: _reduce for name in _REDUCTIONS},
    **{name: _cumulative for name in ("cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp")},
    **{name: _reduce_window for name in ("reduce_window", "reduce_window_sum", "reduce_window_max", "reduce_window_min")},
    **{name: _one_to_one for name in ("optimization_barrier", "device_put", "sharding_constraint", "mesh_cast", "reshard")},
    "debug_callback": _no_effect,
    "argmax": _arg_reduce,
    "argmin": _arg_reduce,
    "broadcast_in_dim": _broadcast_in_dim,
    "reshape": _reshape,
    "transpose": _transpose,
    "squeeze": _squeeze,
    "rev": _rev,
    "pad": _pad,
    "dot_general": _dot_general,
    "conv_general_dilated": _conv,
    "concatenate": _concatenate,
    "slice": _slice,
    "split": _split,
    "dynamic_slice": _dynamic_slice,
    "dynamic_update_slice": _dynamic_update_slice,
    "gather": _gather,
    "scan": _scan,
    "while": _while,
    "cond": _cond,
}


# -- from the union-find to a Spec -------------------------------------------------------


def _boundaries(factors: Iterable[int]) -> list[int]:
    """Suffix products of a C-order factorisation: 1, f_k, f_{k-1} f_k, ..."""
    out, acc = [1], 1
    for f in reversed(list(factors)):
        acc *= f
        out.append(acc)
    return out


def _chain(bounds: Iterable[int]) -> list[int] | None:
    """The sorted boundaries if each divides the next (a common refinement exists), else None."""
    ordered = sorted(set(bounds))
    if any(b % a for a, b in itertools.pairwise(ordered)):
        return None
    return ordered


def _factorise(t: _Tracer) -> tuple[dict[Node, tuple[int, ...]], list]:
    """Every axis class's factorisation: the common refinement of the products it is in.

    A product whose sides have no common refinement (``(6, 4) -> (4, 6)``) mixes its axes'
    positions: all of its axes are pinned and it is dropped.
    """
    find = t.uf.find
    fact: dict[Node, tuple[int, ...]] = {}

    def of(node: Node) -> tuple[int, ...]:
        root = find(node)
        return fact.setdefault(root, (t.size[root],))

    live = list(t.products)
    changed = True
    while changed:
        changed = False
        for relation in list(live):
            ins, outs = relation
            chain = _chain(
                _boundaries([f for n in ins for f in of(n)]) + _boundaries([f for n in outs for f in of(n)])
            )
            refined: dict[Node, list[int] | None] = {}
            if chain is not None:
                # Each axis owns the boundaries between the sizes of the axes after it (lo)
                # and those of itself and the axes after it (hi), rescaled to its own size.
                local: dict[Node, set[int]] = {}
                for side in (ins, outs):
                    hi = math.prod(t.size[n] for n in side)
                    for n in side:
                        lo = hi // t.size[n]
                        local.setdefault(find(n), set(_boundaries(of(n)))).update(b // lo for b in chain if lo <= b <= hi)
                        hi = lo
                refined = {root: _chain(bounds) for root, bounds in local.items()}
            if chain is None or any(bounds is None for bounds in refined.values()):
                t.pin(*ins, *outs)
                live.remove(relation)
                changed = True
                continue
            for root, bounds in refined.items():
                factors = tuple(b // a for a, b in itertools.pairwise(bounds))[::-1]
                if factors != fact[root]:
                    fact[root] = factors
                    changed = True
    return fact, live


def _atoms(t: _Tracer) -> tuple[Callable[[Node], list[tuple[Node, int]]], set[Node], _UnionFind]:
    """Atoms ``(axis class, factor index)``, their union-find through products, and the pinned ones."""
    fact, live = _factorise(t)
    find = t.uf.find

    def atoms(node: Node) -> list[tuple[Node, int]]:
        root = find(node)
        factors = fact.get(root, (t.size[root],))
        return [((root, i), f) for i, f in enumerate(factors)]

    uf = _UnionFind()
    for ins, outs in live:
        left = [a for n in ins for a in atoms(n)]
        right = [a for n in outs for a in atoms(n)]
        if [f for _, f in left] != [f for _, f in right]:
            raise AssertionError(f"trace_spec: unrefined product {left} != {right}")
        for (a, _), (b, _) in zip(left, right):
            uf.union(a, b)
    pinned = {uf.find(a) for n in t.pinned for a, _ in atoms(n)}
    return atoms, pinned, uf


def _group_name(writers: Sequence[str], taken: set[str], tails: bool = False) -> str:
    """The common module of the group's kernels (its incoming weights), else the first one's.

    With ``tails``, the modules' own names below it are joined by ``+``
    (``"block0/attn/query+key"``): a member of heads, whose common module names the heads.
    """
    modules = list(dict.fromkeys(module_path(p) or p for p in writers))
    common = []
    for parts in zip(*(m.split("/") for m in modules)):
        if len(set(parts)) > 1:
            break
        common.append(parts[0])
    name = "/".join(common) or modules[0]
    if tails and len(modules) > 1 and common:
        name += "/" + "+".join(m[len(name) + 1 :] for m in modules)
    unique, n = name, 1
    while unique in taken:
        unique, n = f"{name}.{n}", n + 1
    taken.add(unique)
    return unique


def _heads(labelled: Mapping[str, list], writers: Mapping[Node, list[str]]) -> dict[Node, list[Node]]:
    """Structured groups: ``{heads class: member classes}``, recognised from where classes sit.

    Attention computes ``q_h . k_h`` and ``p_h v_h`` per head: the heads axis is a batch
    dim of both contractions and the output projection contracts it with the dims inside
    each head, so no leaf carries it last (it has no writer) and on every leaf it sits right
    before a class of dims inside the head (the member: q/k's, whose leaves have no reader as
    the two are contracted together, and v/o's). Each head may then permute its own dims,
    which the union-find alone, one permutation per class, cannot say. A class is taken as
    heads when it has no writer, is followed everywhere by a class, and each of those
    classes has writers and is preceded everywhere by it; the traced spec is checked.
    """
    before: dict[Node, set] = {}  # class -> what precedes it on every leaf dim (None: nothing)
    after: dict[Node, set] = {}
    for per_axis in labelled.values():
        flat = [g for dims in per_axis for g, _ in dims]
        for i, g in enumerate(flat):
            if g is None:
                continue
            before.setdefault(g, set()).add(flat[i - 1] if i else None)
            after.setdefault(g, set()).add(flat[i + 1] if i + 1 < len(flat) else None)
    heads: dict[Node, list[Node]] = {}
    for h, following in after.items():
        if h in writers or None in following:
            continue
        members = sorted(following, key=str)
        if h not in following and all(m in writers and before[m] == {h} for m in members):
            heads[h] = members
    return heads


def _build_spec(t: _Tracer, leaf_axes: Mapping[str, Axes], shapes: Mapping[str, tuple[int, ...]]) -> Spec:
    atoms, pinned, uf = _atoms(t)
    # Per leaf, per axis: [(atom class or None, size)].
    labelled = {
        path: [[(None if uf.find(a) in pinned else uf.find(a), f) for a, f in atoms(n)] if n is not None else [] for n in axes]
        for path, axes in leaf_axes.items()
    }
    writers: dict[Node, list[str]] = {}
    readers: set[Node] = set()
    for path, per_axis in labelled.items():
        flat = [g for dims in per_axis for g, _ in dims]
        last = per_axis[-1][-1][0] if per_axis and per_axis[-1] else None
        if last is not None:
            writers.setdefault(last, []).append(path)
        readers.update(g for g in (flat[:-1] if last is not None else flat) if g is not None)
    heads = _heads(labelled, writers)
    members = {m for ms in heads.values() for m in ms}
    # A class without incoming weights or without a reader cannot be aligned (or is not
    # read at all): leaving it unpermuted is always safe. Members of heads need no reader.
    groups = [g for g in writers if g in readers or g in members]
    taken: set[str] = set()
    names: dict[Node, str] = {}

    def kernels(g: Node) -> list[str]:
        return [p for p in writers[g] if len(shapes[p]) > 1] or writers[g]

    for h, ms in heads.items():  # the heads first: they take the attention module's name
        names[h] = _group_name([p for m in ms for p in kernels(m)], taken)
    for g in groups:
        names[g] = _group_name(kernels(g), taken, tails=g in members)

    def entry(dims: list[tuple[Node | None, int]]) -> Any:
        merged: list[Any] = []
        for g, f in dims:  # adjacent ungrouped factors merge into one fixed size
            if g in heads:
                merged.append(Heads(names[g], f if len(dims) > 1 else None))
            elif names.get(g) is None and merged and isinstance(merged[-1], int):
                merged[-1] *= f
            else:
                merged.append(names.get(g, f))
        if not any(isinstance(d, (str, Heads)) for d in merged):
            return None
        return merged[0] if len(merged) == 1 else tuple(merged)

    return Spec([LeafSpec(path, tuple(entry(dims) for dims in per_axis)) for path, per_axis in labelled.items()])


def _block_labellings(count: int) -> list[tuple[list[list[int]], int]]:
    """Ways to give ``count`` blocks members of their own: ``(parts, read part)``, finest first.

    ``parts`` is a set partition of the blocks into at least two parts; the read part keeps
    the member's name (its readers read it), the others are members nothing reads.
    """

    def partitions(items: list[int]) -> Iterable[list[list[int]]]:
        if not items:
            yield []
            return
        for rest in partitions(items[1:]):
            for i in range(len(rest)):
                yield rest[:i] + [[items[0], *rest[i]]] + rest[i + 1 :]
            yield [[items[0]], *rest]

    found = [(parts, read) for parts in partitions(list(range(count))) if len(parts) > 1 for read in range(len(parts))]
    return sorted(found, key=lambda labelling: -len(labelling[0]))


def _split_blocks(spec: Spec, holds: Callable[[Spec], bool]) -> Spec:
    """Give the blocks of a fused projection members of their own where the function allows.

    One node per axis cannot tell the blocks of a fused q/k/v projection apart: reshaped to
    ``(3, H, hd)``, its three blocks' within-head dims are one class, so the traced member
    is shared by q, k and v (``(3, Heads, member)`` on the writers' last axis). That is a
    symmetry, but a coarser one than attention has. For each such member, labellings of its
    blocks as a :class:`jfusion.Concat` of members (finest first: q and k sharing one, v
    with the readers' is what attention gives) are tried; the first that ``holds`` (random
    permutations keep the outputs) replaces it.
    """
    for heads, members in spec.heads:
        for member in members:
            writers = spec.writers(member)
            views = {leaf.axes[-1] for leaf in writers}
            view = next(iter(views))
            if (
                len(views) != 1
                or not isinstance(view, tuple)
                or len(view) != 3
                or not (isinstance(view[0], int) and view[0] > 1 and isinstance(view[1], Heads) and view[2] == member)
                or any(member in leaf.dim_groups[:-1] for leaf in writers)
            ):
                continue
            for parts, read in _block_labellings(view[0]):
                names = {
                    b: member if k == read else f"{member}:{'+'.join(map(str, part))}"
                    for k, part in enumerate(parts)
                    for b in part
                }
                blocks = Concat(*((view[1], names[b]) for b in range(view[0])))
                entries = spec.as_dict()
                for leaf in writers:
                    entries[leaf.path] = (*leaf.axes[:-1], blocks)
                try:
                    candidate = Spec(entries)
                except SpecError:
                    continue
                if holds(candidate):
                    spec = candidate
                    break
    return spec


def trace_spec(
    apply_fn: Callable[..., Any] | nnx.Module,
    variables: PyTree = None,
    *example_args: Any,
    unknown: str = "error",
    check: bool = True,
    seed: int = 0,
    **kwargs: Any,
) -> Spec:
    """The Spec of ``apply_fn(variables, *example_args, **kwargs)``, traced from its jaxpr.

    Every axis of every value in the jaxpr is a node of a union-find; each primitive ties
    the axes it treats alike (contracting dims, element-wise operands), pins those whose
    positions matter (spatial, time, sliced positions) and leaves reduced axes free. The
    example inputs' and the outputs' axes are pinned. Each class that holds a variable's
    axis, is not pinned, and has a writer (a leaf carrying it last) and a reader becomes a
    group named after the module of its incoming kernels (``"Dense_0"``,
    ``"stage0_block0/conv1"``); reshaped axes become views (``((49, "Conv_1"), "Dense_0")``).
    See the module docstring for the idea.

    Attention heads: a class that no leaf carries last and that sits, on every leaf, right
    before a class of within-head dims preceded by nothing else becomes :class:`jfusion.Heads`
    (named after the attention module, ``"block0/attn"``), its followers its members (named
    after their projections, ``"block0/attn/key+query"``, ``"block0/attn/value"``). Stock
    ``MultiHeadDotProductAttention`` / ``nnx.MultiHeadAttention`` give :func:`jfusion.models.vit_spec`'s
    layout up to names; a fused q/k/v Dense reshaped to ``(3, H, hd)`` (or split in three)
    gives :func:`jfusion.layers.fused_attention`'s. The union-find gives the three blocks
    one member (one node per axis cannot tell the blocks of one axis apart), so with
    ``check`` the blocks' finer labellings as a :class:`jfusion.Concat` of members are tried,
    finest first, and the first under which random permutations keep the outputs is kept (q
    and k sharing a member, v with the output projection's); ``check=False`` leaves the one
    shared member, a coarser symmetry that is still exact. Not inferred, so the heads
    stay in place (and the value dims are at most one group, permuted alike in every head):
    heads whose within-head dims also meet a leaf without the heads axis (a per-dim scale
    shared by all heads, e.g. ``normalize_qk=True``'s LayerNorms), and grouped-query
    attention (``num_kv_heads < num_heads``: the key/value heads are broadcast over the
    query heads).

    With a linen ``apply``, trace the inference function (``train=False``): outputs are
    pinned, so returning updated batch statistics (``mutable=...``) would pin their channels.

    Args:
      apply_fn: ``apply_fn(variables, *example_args, **kwargs)``, e.g. a linen
        ``model.apply``; or an ``nnx.Module``, traced as
        ``nnx.merge(*nnx.split(module))(*example_args, **kwargs)`` with paths of its
        ``nnx.State`` (``variables`` is then None, or the first example argument). The
        state the call leaves behind is traced too and tied to the state it started from,
        so variables the call only updates (BatchNorm statistics in training mode) are
        labelled with their channels.
      variables: the variables pytree (linen ``{"params": ..., "batch_stats": ...}``);
        ``jax.ShapeDtypeStruct`` leaves (``jax.eval_shape(model.init, ...)``) trace too,
        with ``check=False``.
      example_args: example inputs (arrays or pytrees of them); only their shapes are
        traced, but ``check`` runs the model on them.
      unknown: ``"error"`` raises :class:`TraceError` at a primitive without a rule;
        ``"tie"`` pins every axis it touches (never permutes too much; may group less).
      check: verify the traced spec with :func:`jfusion.check_spec` (random permutations
        of every group on copies of the variables with their constant leaves perturbed),
        after splitting fused projections' blocks into members where such permutations allow.
      seed: the check's seed.
      kwargs: static keyword arguments of ``apply_fn`` (``train=False``).

    Returns:
      A :class:`jfusion.Spec` labelling every leaf of ``variables`` (of the module's state).

    Raises:
      TraceError: a primitive without a rule (with ``unknown="error"``), or a traced spec
        that fails its check.

    Examples:
      A linen MLP's spec, its group named after the module of its incoming kernel:

      >>> import jax, jax.numpy as jnp, jfusion
      >>> from jfusion.models import MLP, mlp_spec
      >>> model, x, spec = MLP((8, 3)), jnp.ones((1, 4)), mlp_spec(2)  # 4 -> 8 (group h0) -> 3
      >>> params = model.init(jax.random.key(0), x)
      >>> traced = jfusion.trace_spec(model.apply, params, x)
      >>> traced.groups
      ('Dense_0',)
      >>> traced["params/Dense_0/kernel"].axes, traced["params/Dense_1/kernel"].axes
      ((None, 'Dense_0'), ('Dense_0', None))

      An nnx Module is traced on its own state; paths are those of ``nnx.split``:

      >>> from flax import nnx
      >>> linear = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(8, 3, rngs=nnx.Rngs(0)))
      >>> jfusion.trace_spec(linear, x).as_dict()["layers/2/kernel"]
      ('layers/0', None)

    References:
      - Samuel K. Ainsworth, Jonathan Hayase and Siddhartha Srinivasa. *Git Re-Basin: Merging
        Models modulo Permutation Symmetries.* ICLR 2023 (its permutation specs label
        parameter axes the way a Spec does).
    """
    if unknown not in UNKNOWN_MODES:
        raise ValueError(f"unknown must be one of {UNKNOWN_MODES}, not {unknown!r}")
    if isinstance(apply_fn, nnx.Module):
        args = example_args if variables is None else (variables, *example_args)
        graphdef, variables = nnx.split(apply_fn)

        def call(state: PyTree, args: tuple) -> Any:
            return nnx.merge(graphdef, state)(*args, **kwargs)

        def traced(state: PyTree, args: tuple) -> tuple[Any, PyTree]:
            # The state after the call too: a BatchNorm in training mode only writes its
            # running statistics, which must still be permuted with their channels.
            module = nnx.merge(graphdef, state)
            return module(*args, **kwargs), nnx.state(module)
    else:
        args = example_args

        def call(variables: PyTree, args: tuple) -> Any:
            return apply_fn(variables, *args, **kwargs)

        def traced(variables: PyTree, args: tuple) -> tuple[Any, PyTree]:
            return call(variables, args), None

    leaves, _ = flatten(variables)
    paths = list(leaves)
    closed, (outputs, updated) = jax.make_jaxpr(traced, return_shape=True)(variables, args)
    tracer = _Tracer(paths, unknown)
    jaxpr = closed.jaxpr
    frame = 0
    for var in jaxpr.constvars:  # closed-over arrays cannot be permuted with the variables
        tracer.pin(*tracer.axes(frame, var))
    leaf_axes = {}
    for i, var in enumerate(jaxpr.invars):
        axes = tracer.axes(frame, var)
        if i < len(paths):
            leaf_axes[paths[i]] = axes
            tracer.origins[(frame, var)] = frozenset({i})
        else:
            tracer.pin(*axes)
    tracer.walk(frame, jaxpr)
    num_outputs = len(jax.tree.leaves(outputs))
    for var in jaxpr.outvars[:num_outputs]:
        tracer.pin(*tracer.axes(frame, var))
    # An updated variable is the same leaf after the call: permuted as the leaf is.
    for var, path in zip(jaxpr.outvars[num_outputs:], flatten(updated)[0], strict=True):
        new_axes = tracer.axes(frame, var)
        if path in leaf_axes and len(leaf_axes[path]) == len(new_axes):
            tracer.tie_axes(leaf_axes[path], new_axes)
        else:
            tracer.pin(*new_axes)
    spec = _build_spec(tracer, leaf_axes, {p: tuple(getattr(x, "shape", ())) for p, x in leaves.items()})
    if check and spec.groups:
        if any(isinstance(x, jax.ShapeDtypeStruct) for x in leaves.values()):
            raise ValueError("check=True runs the model, so it needs arrays; trace shapes with check=False")
        apply = jax.jit(call)  # one compiled program for the checks' applications

        def holds(candidate: Spec) -> bool:
            try:  # blocks of members read nowhere else may leave their sizes undetermined
                candidate.validate({p: tuple(x.shape) for p, x in leaves.items()})
            except SpecError:
                return False
            return all(
                error <= tolerance
                for _, _, tolerance, error in (
                    permutation_error(apply, variables, candidate, args, seed=seed + k) for k in range(2)
                )
            )

        spec = _split_blocks(spec, holds)
        try:
            check_spec(apply, variables, spec, args, seed=seed)
        except SpecError as failure:
            raise TraceError(
                f"the traced spec fails check_spec, so an operation was taken as equivariant that "
                f"is not -- please report it with the model. {failure}"
            ) from failure
    return spec
