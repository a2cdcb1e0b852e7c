"""Optimal-transport solvers: pure functions ``(cost, a, b) -> OTResult`` that ``vmap``.

Given a cost ``C (n, m)`` and marginals ``a (n,)``, ``b (m,)``, a solver returns a plan
``T >= 0`` with ``T 1 = a``, ``T^T 1 = b`` minimising ``<C, T>`` (exactly, or with an
entropic penalty), plus diagnostics. Solvers are frozen dataclasses, hashable, so they can
be static arguments of ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from ott.geometry import geometry
from ott.problems.linear import linear_problem
from ott.solvers.linear import sinkhorn

from jfusion.core.errors import FusionInputError


class OTResult(NamedTuple):
    """A transport plan and how it was found.

    Attributes:
      plan: ``(n, m)`` coupling between source neurons (rows) and target neurons (columns).
      cost: transport cost ``<C, plan>``.
      converged: whether the solver met its tolerance (always True for exact solvers).
      iterations: iterations the solver ran (0 for exact solvers).
    """

    plan: jax.Array
    cost: jax.Array
    converged: jax.Array
    iterations: jax.Array


def _result(plan: jax.Array, cost: jax.Array, converged, iterations) -> OTResult:
    return OTResult(
        plan,
        jnp.sum(plan * cost),
        jnp.asarray(converged, dtype=bool),
        jnp.asarray(iterations, dtype=jnp.int32),
    )


def assignment_plan(cost: jax.Array) -> jax.Array:
    """Exact OT plan between uniform measures of sizes n and m, one dividing the other.

    Solved as a linear assignment (Hungarian algorithm, ``optax.assignment``) after
    replicating the smaller side ``max(n, m) / min(n, m)`` times; every entry of the plan is
    a multiple of ``1 / max(n, m)``, so for ``n == m`` it is exactly ``P / n`` for a
    permutation matrix ``P``, not a float approximation of it.
    """
    n, m = cost.shape
    if n % m and m % n:
        raise FusionInputError(
            f"the exact solver transports uniform masses by assignment, which needs one width "
            f"to divide the other; found n={n} source and m={m} target neurons (ratio "
            f"{n / m:.3g}); use jfusion.Sinkhorn() for other width ratios"
        )
    square = jnp.tile(cost, (m // n, 1)) if m > n else jnp.tile(cost, (1, n // m))
    rows, cols = optax.assignment.hungarian_algorithm(square)
    size = max(n, m)
    return jnp.zeros((n, m), cost.dtype).at[rows % n, cols % m].add(1.0 / size)


@dataclasses.dataclass(frozen=True)
class Exact:
    """Exact OT between uniform marginals (the LP of OTFusion's ``ot.emd``).

    With uniform marginals and widths where one divides the other, the OT linear program
    has an optimal vertex that is an assignment, found by the Hungarian algorithm in
    ``O(max(n, m)^3)``. The marginals ``a`` and ``b`` must be uniform (jfusion's default);
    for other marginals use :class:`Sinkhorn`.
    """

    def __call__(self, cost: jax.Array, a: jax.Array, b: jax.Array) -> OTResult:
        return _result(assignment_plan(cost), cost, True, 0)


@dataclasses.dataclass(frozen=True)
class Sinkhorn:
    """Entropic OT by log-domain Sinkhorn iterations (``ott.solvers.linear.sinkhorn``).

    Solves ``min <C, T> - eps H(T)`` s.t. ``T 1 = a, T^T 1 = b``. Faster than exact OT on
    large layers and works for any widths and marginals; the plan is slightly blurred, the
    less so the smaller ``epsilon``.

    Attributes:
      epsilon: entropic regularisation; relative to the cost's mean (or std) when
        ``relative_epsilon`` is set, so the same value works for every layer's scale.
      relative_epsilon: ``"mean"``, ``"std"`` or None (absolute epsilon).
      threshold: tolerance on the marginal error ``||T 1 - a||_1 + ...``.
      max_iterations: iteration cap; a plan that hits it is reported with
        ``converged=False`` and jfusion warns (eagerly) or returns the flag (under jit).
    """

    epsilon: float = 0.01
    relative_epsilon: Literal["mean", "std"] | None = "mean"
    threshold: float = 1e-4
    max_iterations: int = 5000

    def __call__(self, cost: jax.Array, a: jax.Array, b: jax.Array) -> OTResult:
        geom = geometry.Geometry(
            cost_matrix=cost, epsilon=self.epsilon, relative_epsilon=self.relative_epsilon
        )
        solver = sinkhorn.Sinkhorn(
            lse_mode=True, threshold=self.threshold, max_iterations=self.max_iterations
        )
        out = solver(linear_problem.LinearProblem(geom, a, b))
        return _result(out.matrix, cost, out.converged, out.n_iters)


Solver = Exact | Sinkhorn
