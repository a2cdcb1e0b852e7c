"""Plan producers: what a fusion method is.

A fusion is, for every neuron group, one plan per model plus a weight per fused neuron. The
engine (:mod:`jfusion.core.align`) walks the groups in topological order, builds each
model's and the reference's supports, and asks a *plan producer* for the plans; transport
and combine are shared by every method. A method is one producer plus a thin entry point:

==================  ===========================================================
OT fusion           :class:`BalancedPlans`: OT between uniform measures
vanilla averaging   identity plans (:mod:`jfusion.methods.baselines`)
partial fusion      partial OT into ``[fused | isolated]`` slots (:mod:`jfusion.methods.partial`)
generalized pruning cluster plans of the reference itself (:mod:`jfusion.methods.prune`)
barycenter fusion   OT fusion iterated onto its own estimate (:mod:`jfusion.methods.barycenter`)
GWB fusion          fused Gromov-Wasserstein plans for recurrent groups (:mod:`jfusion.methods.gromov`)
==================  ===========================================================
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import jax
import jax.numpy as jnp

from jfusion.core.costs import GroundMetric
from jfusion.core.errors import FusionInputError
from jfusion.core.solvers import Exact, OTResult, Solver


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

    A producer with a true ``relational`` attribute (a class variable) receives, for the
    groups with recurrent leaves (hidden-to-hidden kernels), a
    :class:`jfusion.core.support.RelationalSupport` ``(features, relation)`` as ``support``
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


def identity_result(n: int) -> OTResult:
    """The identity plan ``I / n`` of a group of ``n`` neurons, as a solver would report it."""
    return OTResult(
        jnp.eye(n, dtype=jnp.float32) / n,
        jnp.zeros((), jnp.float32),
        jnp.ones((), bool),
        jnp.zeros((), jnp.int32),
    )


def solve_balanced(solver: Solver, metric: GroundMetric, group: str, x: jax.Array, y: jax.Array) -> OTResult:
    """OT between uniform measures on the rows of ``x`` and of ``y``, at cost ``metric(x, y)``."""
    try:
        return solver(metric(x, y), uniform(x.shape[0]), uniform(y.shape[0]))
    except FusionInputError as err:
        raise FusionInputError(f"group {group!r}: {err}") from None


@dataclasses.dataclass(frozen=True)
class BalancedPlans:
    """OT fusion's producer (Singh & Jaggi 2020): each model's neurons onto the reference's.

    ``T_k = OT(1/n_k, 1/m, d(X_k, Y))``; the reference keeps its own neurons (identity) and
    every model fills every slot, so combine uses the plain model weights.
    """

    solver: Solver = Exact()
    metric: GroundMetric = GroundMetric()

    def output_width(self, group: str, reference_width: int) -> int:
        return reference_width

    def reference_plan(self, group: str, support: jax.Array) -> None:
        return None

    def plan(self, group: str, support: jax.Array, reference_support: jax.Array, model: jax.Array) -> OTResult:
        return solve_balanced(self.solver, self.metric, group, support, reference_support)

    def coverage(self, group: str, received: jax.Array) -> jax.Array:
        return jnp.ones_like(received)
