"""Plan producers: what a fusion method is.

A fusion is, for every neuron group, one plan per model plus a weight per fused neuron. The
engine (:mod:`jfusion.core.align`) walks the groups in topological order, builds each
model's and the reference's supports, and asks a *plan producer* for the plans; transport
and combine are shared by every method. A method is one producer plus a thin entry point:

==================  ===========================================================
OT fusion           :class:`BalancedPlans`: OT between uniform or importance measures
vanilla averaging   identity plans (:mod:`jfusion.methods.baselines`)
partial fusion      partial OT into ``[fused | isolated]`` slots (:mod:`jfusion.methods.partial`)
generalized pruning cluster plans of the reference itself (:mod:`jfusion.methods.prune`)
barycenter fusion   OT fusion iterated onto its own estimate (:mod:`jfusion.methods.barycenter`)
GWB fusion          fused Gromov-Wasserstein plans for recurrent groups (:mod:`jfusion.methods.gromov`)
==================  ===========================================================
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple, Protocol

import jax
import jax.numpy as jnp

from jfusion.core.costs import GroundMetric
from jfusion.core.errors import FusionInputError, SpecError
from jfusion.core.solvers import Exact, OTResult, Solver
from jfusion.core.spec import Spec


class PlanProducer(Protocol):
    """How a method turns supports into plans. Hashable (a ``jit`` static argument).

    The engine calls, for every group ``g`` in order (every sweep):

    * ``output_width(g, m) -> int``: the fused group's width, given the reference's ``m``.
    * ``reference_plan(g, support) -> OTResult | None``: the plan ``(m, output_width)`` of
      the reference's own neurons from its support ``(m, d)``; None means the identity.
    * ``plan(g, support, reference_support, model) -> OTResult | None``: the plan
      ``(n_k, output_width)`` of model ``model`` (an index into the K models, traced under
      ``vmap``) from its support ``(n_k, d)`` and the reference's ``(m, d)``, whose
      features are in the same basis; None means the identity.
    * ``coverage(g, received) -> (K, output_width)``: from the mass ``received`` each
      model's plan sends to each slot, the share of the slot each model fills; combine
      weights model ``k`` in slot ``q`` by ``w_k coverage[k, q]`` (normalised per slot).

    Plans are transported by their own row and column sums, so their overall scale is free.

    Structured groups (:class:`jfusion.Heads`) are one step per ``Heads`` name, for which
    the engine calls ``head_plans(name, supports, reference_supports, model) -> HeadPlans |
    None`` with one support ``(H, hd, d)`` per member group (None: identities; the
    reference keeps its own heads). A producer without ``head_plans`` refuses such specs.

    A producer with a ``check_spec(spec)`` method has it called before tracing (to name a
    configured group the spec lacks); one with an ``identity_groups`` attribute never matches
    those groups, so the engine's residual-stream warning leaves them out.

    A producer with a true ``relational`` attribute (a class variable) receives, for the
    groups with recurrent leaves (hidden-to-hidden kernels), a
    ``jfusion.core.support.RelationalSupport`` ``(features, relation)`` as ``support``
    and ``reference_support`` instead of the features alone (Gromov-Wasserstein fusion).
    """

    def output_width(self, group: str, reference_width: int) -> int: ...

    def reference_plan(self, group: str, support: jax.Array) -> OTResult | None: ...

    def plan(
        self, group: str, support: jax.Array, reference_support: jax.Array, model: jax.Array
    ) -> OTResult | None: ...

    def coverage(self, group: str, received: jax.Array) -> jax.Array: ...


def uniform(n: int) -> jax.Array:
    """The uniform measure ``1/n`` on ``n`` neurons."""
    return jnp.full((n,), 1.0 / n, jnp.float32)


Importance = Literal["uniform", "l1", "l2"]
IMPORTANCES = ("uniform", "l1", "l2")


def importance_measure(support: jax.Array, importance: Importance) -> jax.Array:
    """The measure on a group's neurons from their supports ``(n, d)``: OTFusion's ``--importance``.

    ``"uniform"``: ``1/n``. ``"l1"`` / ``"l2"``: ``mu_p = (r_p + delta) / sum_q (r_q + delta)``
    with ``r_p = ||x_p||_1`` or ``||x_p||_2`` the norm of neuron ``p``'s support row relative
    to the largest one and ``delta = 1e-9``, so a neuron that carries more weight carries more
    mass (Singh & Jaggi 2020, §4). OTFusion adds 1e-9 to the raw norms; here the floor is
    relative, so the measure does not depend on the weights' scale, and a neuron whose support
    is zero keeps a tiny positive mass (Sinkhorn's logarithms stay finite). Supports are scaled
    by their largest entry first, so the norms stay inside float32.
    """
    n = support.shape[0]
    if importance == "uniform":
        return uniform(n)
    x = support.astype(jnp.float32)
    peak = jnp.max(jnp.abs(x))
    x = x / jnp.where(peak > 0, peak, 1.0)
    norms = jnp.linalg.norm(x, ord=1 if importance == "l1" else 2, axis=1)
    top = jnp.max(norms)
    mass = jnp.where(top > 0, norms / jnp.where(top > 0, top, 1.0), 1.0) + 1e-9
    return mass / jnp.sum(mass)


def identity_result(n: int) -> OTResult:
    """The identity plan ``I / n`` of a group of ``n`` neurons, as a solver would report it."""
    return OTResult(
        jnp.eye(n, dtype=jnp.float32) / n,
        jnp.zeros((), jnp.float32),
        jnp.ones((), bool),
        jnp.zeros((), jnp.int32),
    )


def solve_balanced(
    solver: Solver, metric: GroundMetric, group: str, x: jax.Array, y: jax.Array, importance: Importance = "uniform"
) -> OTResult:
    """OT between the measures on the rows of ``x`` and of ``y`` (:func:`importance_measure`),
    at cost ``metric(x, y)``."""
    try:
        return solver(metric(x, y), importance_measure(x, importance), importance_measure(y, importance))
    except FusionInputError as err:
        raise FusionInputError(f"group {group!r}: {err}") from None


class HeadPlans(NamedTuple):
    """The two-level plan of a structured group (:func:`jfusion.core.plans.head_plans`).

    Attributes:
      heads: the ``(H, H')`` plan between the model's heads and the reference's.
      members: per member group, the composed plan on its flattened ``(H hd, H' hd)`` axis.
    """

    heads: OTResult
    members: tuple[OTResult, ...]


HeadMatching = Literal["matched", "in_order", "flat"]
HEAD_MATCHINGS = ("matched", "in_order", "flat")


def head_plans(
    solver: Solver,
    metric: GroundMetric,
    name: str,
    supports: tuple[jax.Array, ...],
    reference_supports: tuple[jax.Array, ...],
    matching: HeadMatching = "matched",
) -> HeadPlans:
    """Plans that move heads as wholes: heads by head-pair costs, then dims inside matched heads.

    For member groups ``m`` (e.g. attention's ``qk`` and ``vo``) with supports ``X_m (H, hd_m,
    d_m)`` of the model and ``Y_m`` of the reference, the flat cost ``C_m = d(X_m, Y_m)``
    between all ``H hd_m`` neurons is cut into blocks ``C_m[h, h'] (hd_m x hd_m)``. Every
    block is solved at once (one vmapped batch of ``H x H'`` problems), ``P_m[h, h'] =
    OT(1/hd_m, 1/hd_m, C_m[h, h'])``, and the head-pair cost is the sum over members of the
    optimal within-head costs, ``D[h, h'] = sum_m <P_m[h, h'], C_m[h, h']>``. The head plan is
    ``Q = OT(1/H, 1/H', D)`` and each member's plan is the block composition
    ``T_m[(h, i), (h', j)] = Q[h, h'] P_m[h, h'][i, j]`` (a Kronecker product ``Q (x) P`` for
    a single within-head plan), a coupling of the uniform measures on the flattened axes:
    for exact solvers a permutation that keeps every head whole, with the same head order for
    every member. A one-level plan on the flat axis is a relaxation of it: it may split a
    head's dims over several heads, and give q/k and v/o different head orders, which the
    attention's function does not allow.

    ``matching`` chooses how heads are paired:

    * ``"matched"`` (default): the head order ``Q`` is solved, as above.
    * ``"in_order"``: head ``h`` goes to head ``h`` (``Q = I / H``, which needs ``H = H'``)
      and only the diagonal blocks ``P_m[h, h]`` are solved: Transformer fusion's choice
      (Imfeld et al. 2024). It cannot undo a permutation of the heads.
    * ``"flat"``: one plan per member on its flat ``(H hd_m, H' hd_m)`` cost, ignoring head
      boundaries, ``T_m = OT(1/(H hd_m), 1/(H' hd_m), C_m)``. A fusion heuristic only: it
      may split heads and give members different head orders, so the aligned model need not
      compute the model's function (it does only when the plans happen to keep heads whole
      with one order, as for an exact permuted copy, whose zero-cost matching it finds).
      Its reported head plan is the mass the members move between heads,
      ``Q[h, h'] = mean_m sum_{i, j} T_m[(h, i), (h', j)]``.

    References:
      - Moritz Imfeld, Jacopo Graldi, Marco Giordano, Thomas Hofmann, Sotiris Anagnostidis
        and Sidak Pal Singh. *Transformer Fusion with Optimal Transport.* ICLR 2024.
      - Ashish Vaswani et al. *Attention Is All You Need.* NeurIPS 2017.
    """
    if matching not in HEAD_MATCHINGS:
        raise FusionInputError(f"Heads({name!r}): head matching must be one of {HEAD_MATCHINGS}, got {matching!r}")
    flats = []
    for x, y in zip(supports, reference_supports):
        (h, n, d), (h2, m, _) = x.shape, y.shape
        if n != m:
            raise FusionInputError(
                f"Heads({name!r}): the model's heads have {n} dims and the reference's {m}; "
                f"structured plans need equal head sizes"
            )
        flats.append(metric(x.reshape(h * n, d), y.reshape(h2 * m, d)))
    if matching == "flat":
        members = tuple(solver(c, uniform(c.shape[0]), uniform(c.shape[1])) for c in flats)
        moved = [r.plan.reshape(h, r.plan.shape[0] // h, h2, -1).sum(axis=(1, 3)) for r in members]
        heads = OTResult(
            sum(moved) / len(moved),
            sum(r.cost for r in members),
            jnp.all(jnp.stack([r.converged for r in members])),
            jnp.max(jnp.stack([r.iterations for r in members])),
        )
        return HeadPlans(heads, members)
    if matching == "in_order" and h != h2:
        raise FusionInputError(f"Heads({name!r}): in-order head matching needs equal head counts, got {h} and {h2}")
    blocks = []
    for flat in flats:
        n = flat.shape[0] // h
        cost = flat.reshape(h, n, h2, n).transpose(0, 2, 1, 3)  # (H, H', hd, hd)
        solve = jax.vmap(lambda c: solver(c, uniform(n), uniform(n)))
        if matching == "matched":
            inner = jax.vmap(solve)(cost)
        else:  # only the diagonal blocks, laid out as the (H, H) batch with zeros elsewhere
            diagonal = solve(cost[jnp.arange(h), jnp.arange(h)])
            inner = diagonal._replace(
                plan=jnp.einsum("ab,aij->abij", jnp.eye(h, dtype=diagonal.plan.dtype), diagonal.plan),
                cost=jnp.diag(diagonal.cost),
            )
        blocks.append((inner, flat))
    head_cost = sum(inner.cost for inner, _ in blocks)
    if matching == "matched":
        heads = solver(head_cost, uniform(head_cost.shape[0]), uniform(head_cost.shape[1]))
    else:
        order = identity_result(h)
        heads = order._replace(cost=jnp.sum(order.plan * head_cost))
    members = []
    for inner, flat in blocks:
        h, h2, n, m = inner.plan.shape
        plan = jnp.einsum("ab,abij->aibj", heads.plan, inner.plan).reshape(h * n, h2 * m)
        members.append(
            OTResult(
                plan,
                jnp.sum(plan * flat),
                heads.converged & jnp.all(inner.converged),
                jnp.maximum(heads.iterations, jnp.max(inner.iterations)),
            )
        )
    return HeadPlans(heads, tuple(members))


@dataclasses.dataclass(frozen=True)
class BalancedPlans:
    """OT fusion's producer (Singh & Jaggi 2020): each model's neurons onto the reference's.

    ``T_k = OT(mu(X_k), mu(Y), d(X_k, Y))``; the reference keeps its own neurons (identity) and
    every model fills every slot it sends mass to, so combine uses the plain model weights.
    Transport divides by the plan's column sums, so a fused neuron is the barycentric average
    ``sum_p T[p, q] x_p / nu_q`` of the model neurons sent to it whatever the marginals.

    A balanced plan reaches every slot. An unbalanced one (``Sinkhorn(tau_a=..., tau_b=...)``
    below 1) may send a slot almost nothing: the model's neuron there is still the
    barycentric average of the little that arrived, at the model's full weight (OTFusion's
    ``T / (T^T 1)`` does the same); a slot it sends exactly nothing (the mass underflowed:
    the slot's neuron is far from all of the model's) is left to the other models
    (coverage 0), so the fused neuron is not averaged with zeros, and a slot no model reaches
    is zero. Weighting each model by the share of the slot's mass it sends is not done: it
    needs the slot's marginal, which ``coverage`` is not given.

    Attributes:
      solver: the OT solver.
      metric: the ground metric.
      importance: the measures ``mu`` on both sides (:func:`jfusion.core.plans.importance_measure`):
        ``"uniform"`` (default, ``1/n``), or ``"l1"`` / ``"l2"``, OTFusion's importance: a
        neuron's mass is proportional to the norm of its support row, on the model's side
        and on the reference's. Aligning by weights, the support row is the neuron's incoming
        weights after past correction, with its bias and norm parameters (and its outgoing
        weights under ``ByWeights(outgoing=True)``); OTFusion's code takes the norm of the
        uncorrected incoming kernel (its models have no biases), which is the same norm when
        the previous plan is a permutation. Aligning by activations it is the norm of the
        neuron's activations on the batch. Non-uniform marginals need a solver that takes
        them (:class:`jfusion.Sinkhorn`): :class:`jfusion.Exact` is refused here, before any
        tracing, because under ``jit`` the marginals it would check are traced.
      heads: how structured groups (:class:`jfusion.Heads`) pair their heads
        (:func:`jfusion.core.plans.head_plans`): ``"matched"`` (default: the head order is solved),
        ``"in_order"`` (head ``h`` onto head ``h``, only the dims inside each head solved:
        Transformer fusion, Imfeld et al. 2024), or ``"flat"`` (one plan per member over all
        ``H hd`` dims, ignoring head boundaries: a heuristic whose aligned model need not
        compute the model's function).
      identity_groups: units that keep the identity plan ``I / n`` (neuron ``p`` of every
        model onto neuron ``p`` of the reference) instead of being solved: plain groups, e.g. a
        transformer's residual stream (Imfeld et al. 2024 compare aligning it with leaving
        it), or ``Heads`` names (every member keeps its order). A member group of a
        ``Heads`` name cannot be named alone (its head order is shared with the other
        members). Checked against the spec (:meth:`check_spec`) before tracing; such a
        group needs equal widths in every model and the reference.

    References:
      - Sidak Pal Singh and Martin Jaggi. *Model Fusion via Optimal Transport.* NeurIPS 2020
        (uniform and importance measures, §4).
      - Moritz Imfeld, Jacopo Graldi, Marco Giordano, Thomas Hofmann, Sotiris Anagnostidis
        and Sidak Pal Singh. *Transformer Fusion with Optimal Transport.* ICLR 2024 (heads
        matched in order; residual stream aligned or not).
    """

    solver: Solver = Exact()
    metric: GroundMetric = GroundMetric()
    importance: Importance = "uniform"
    heads: HeadMatching = "matched"
    identity_groups: tuple[str, ...] = ()

    def __post_init__(self):
        if self.importance not in IMPORTANCES:
            raise FusionInputError(f"importance must be one of {IMPORTANCES}, got {self.importance!r}")
        if self.importance != "uniform" and isinstance(self.solver, Exact):
            raise FusionInputError(
                f"importance={self.importance!r} gives non-uniform marginals, and jfusion.Exact solves "
                f"OT between uniform marginals only (an assignment); pass solver=jfusion.Sinkhorn() "
                f"(a small epsilon, e.g. Sinkhorn(epsilon=1e-3), comes close to exact OT)"
            )
        if self.heads not in HEAD_MATCHINGS:
            raise FusionInputError(f"heads must be one of {HEAD_MATCHINGS}, got {self.heads!r}")
        if isinstance(self.identity_groups, str) or not all(isinstance(g, str) for g in self.identity_groups):
            raise FusionInputError(f"identity_groups must be a sequence of group names, got {self.identity_groups!r}")
        object.__setattr__(self, "identity_groups", tuple(self.identity_groups))  # a list would not hash

    def check_spec(self, spec: Spec) -> None:
        """Raise :class:`jfusion.SpecError` for an ``identity_groups`` name that is not one of the spec's units."""
        members = {g: name for name, group_members in spec.heads for g in group_members}
        for group in self.identity_groups:
            if group in members:
                raise SpecError(
                    f"identity_groups: {group!r} is a member of Heads({members[group]!r}), whose members share "
                    f"one head order; name {members[group]!r} to keep the whole attention layer's identity"
                )
            if group not in spec.units:
                raise SpecError(f"identity_groups: the spec has no group {group!r}; its groups are {list(spec.units)}")

    def output_width(self, group: str, reference_width: int) -> int:
        return reference_width

    def reference_plan(self, group: str, support: jax.Array) -> None:
        return None

    def plan(self, group: str, support: jax.Array, reference_support: jax.Array, model: jax.Array) -> OTResult | None:
        if group in self.identity_groups:
            _check_identity(group, support.shape[0], reference_support.shape[0])
            return None
        return solve_balanced(self.solver, self.metric, group, support, reference_support, self.importance)

    def head_plans(
        self, name: str, supports: tuple[jax.Array, ...], reference_supports: tuple[jax.Array, ...], model: jax.Array
    ) -> HeadPlans | None:
        if name in self.identity_groups:
            for x, y in zip(supports, reference_supports):
                _check_identity(name, x.shape[0] * x.shape[1], y.shape[0] * y.shape[1])
            return None
        if self.importance != "uniform":
            raise FusionInputError(
                f"Heads({name!r}): structured plans use uniform measures; importance={self.importance!r} is not supported there"
            )
        return head_plans(self.solver, self.metric, name, supports, reference_supports, self.heads)

    def coverage(self, group: str, received: jax.Array) -> jax.Array:
        return (received > 0).astype(received.dtype)


def _check_identity(group: str, width: int, reference_width: int) -> None:
    if width != reference_width:
        raise FusionInputError(
            f"group {group!r} keeps the identity plan (identity_groups), which needs equal widths, "
            f"but the model has {width} neurons there and the reference {reference_width}"
        )
