"""Entropic fused Gromov-Wasserstein between two groups of neurons that feed each other.

A recurrent group's neurons are compared by their own features (a linear OT cost ``C``,
``n x m``) and by how they feed each other: ``A[i, j]`` is the weight vector from neuron ``i``
to neuron ``j`` of the model (``(n, n, r)``, e.g. one channel per gate of an LSTM's
hidden-to-hidden kernels), ``B`` the same ``(m, m, r)`` for the reference. The fused
Gromov-Wasserstein problem (Vayer et al. 2019) is::

    E(T) = (1 - alpha) <C, T> + alpha Q(T),   Q(T) = sum_ijkl ||A_ij - B_kl||^2 T_ik T_jl

over couplings ``T`` with marginals ``a``, ``b``. Expanding the square, with
``A2_ij = ||A_ij||^2``, ``u = T 1``, ``v = T^T 1`` and ``X(A, B) = sum_r A_r T B_r^T``::

    Q(T) = u^T A2 u + v^T B2 v - 2 <T, X(A, B)>
    grad Q(T) = (A2 + A2^T) u 1^T + 1 ((B2 + B2^T) v)^T - 2 (X(A, B) + X(A^T, B^T))

The second cross term is the one a symmetric-cost formula (Peyré, Cuturi & Solomon 2016,
eq. 6, which ott-jax's linearisation follows) drops: it equals the first only when ``A``
and ``B`` are symmetric, and hidden-to-hidden kernels are not. Everything is computed with
``(n, m, r)`` intermediates -- ``O(n^2 m + n m^2)`` time, never the ``(n, m, n, m)`` tensor.

The solver is entropic mirror descent on the couplings (Peyré et al. 2016), in its proximal
form (Xu et al. 2019): ``T_{t+1} = argmin_T <grad E(T_t), T> + epsilon KL(T | T_t)``, each
step a log-domain Sinkhorn projection warm-started from the previous step's potentials. The
KL to the previous plan instead of Peyré's entropy ``-epsilon H(T)`` keeps every step's plan
entropic (strictly positive) but lets the iterates sharpen towards a local minimum of the
unregularised ``E``; with a fixed entropy they oscillate or stay blurred at small epsilon.

References:
  - Gabriel Peyré, Marco Cuturi and Justin Solomon. *Gromov-Wasserstein Averaging of Kernel
    and Distance Matrices.* ICML 2016.
  - Titouan Vayer, Laetitia Chapel, Rémi Flamary, Romain Tavenard and Nicolas Courty.
    *Optimal Transport for structured data with application on graphs.* ICML 2019
    (fused Gromov-Wasserstein).
  - Hongteng Xu, Dixin Luo, Hongyuan Zha and Lawrence Carin. *Gromov-Wasserstein Learning for
    Graph Matching and Node Embedding.* ICML 2019 (the proximal point iteration).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jfusion.core.solvers import OTResult

_HIGHEST = jax.lax.Precision.HIGHEST


def _cross(relation_a: jax.Array, plan: jax.Array, relation_b: jax.Array) -> jax.Array:
    """``sum_r A_r T B_r^T`` ``(n, m)`` through an ``(n, m, r)`` intermediate."""
    moved = jnp.einsum("ijr,jl->ilr", relation_a, plan, precision=_HIGHEST)
    return jnp.einsum("ilr,klr->ik", moved, relation_b, precision=_HIGHEST)


def _squared_norms(relation: jax.Array) -> jax.Array:
    return jnp.sum(jnp.square(relation), axis=-1)


def fused_gw_objective(
    plan: jax.Array, cost: jax.Array, relation_a: jax.Array, relation_b: jax.Array, alpha: float
) -> jax.Array:
    """``E(T) = (1 - alpha) <C, T> + alpha sum_ijkl ||A_ij - B_kl||^2 T_ik T_jl`` (module docstring).

    Args:
      plan: ``T (n, m)``; cost: ``C (n, m)``; relation_a: ``A (n, n, r)``;
        relation_b: ``B (m, m, r)``; alpha: the weight of the quadratic term, in [0, 1].
    """
    u, v = plan.sum(axis=1), plan.sum(axis=0)
    quadratic = (
        u @ _squared_norms(relation_a) @ u
        + v @ _squared_norms(relation_b) @ v
        - 2.0 * jnp.sum(plan * _cross(relation_a, plan, relation_b))
    )
    return (1.0 - alpha) * jnp.sum(cost * plan) + alpha * quadratic


def fused_gw_gradient(
    plan: jax.Array, cost: jax.Array, relation_a: jax.Array, relation_b: jax.Array, alpha: float
) -> jax.Array:
    """``grad E(T)`` ``(n, m)`` for asymmetric relations (both cross terms; module docstring)."""
    u, v = plan.sum(axis=1), plan.sum(axis=0)
    a2, b2 = _squared_norms(relation_a), _squared_norms(relation_b)
    transposed_a, transposed_b = jnp.swapaxes(relation_a, 0, 1), jnp.swapaxes(relation_b, 0, 1)
    quadratic = (
        ((a2 + a2.T) @ u)[:, None]
        + ((b2 + b2.T) @ v)[None, :]
        - 2.0 * (_cross(relation_a, plan, relation_b) + _cross(transposed_a, plan, transposed_b))
    )
    return (1.0 - alpha) * cost + alpha * quadratic


def entropic_fused_gw(
    cost: jax.Array,
    relation_a: jax.Array,
    relation_b: jax.Array,
    a: jax.Array,
    b: jax.Array,
    *,
    alpha: float,
    epsilon: float,
    max_iterations: int,
    tolerance: float,
    sinkhorn_iterations: int,
) -> OTResult:
    """Fused GW by entropic proximal mirror descent from the product coupling ``a b^T``.

    Each step runs ``sinkhorn_iterations`` log-domain Sinkhorn updates (warm-started) for
    ``T_{t+1} = argmin_T <grad E(T_t), T> + epsilon KL(T | T_t)``, i.e. Sinkhorn on the cost
    ``grad E(T_t) - epsilon log T_t`` at regularisation ``epsilon`` (absolute: scale the
    inputs to make it meaningful). It stops after at least one step once
    ``||T_{t+1} - T_t||_1`` and the marginal error ``||T 1 - a||_1`` are both
    ``<= tolerance``, or at ``max_iterations`` steps; ``converged`` says which (False for a
    non-finite plan too), ``iterations`` counts the steps, ``cost`` is ``E`` at the plan.
    """
    log_a, log_b = jnp.log(a), jnp.log(b)

    def project(step_cost, f, g):
        def update(_, potentials):
            f, g = potentials
            f = epsilon * (log_a - jax.nn.logsumexp((g[None, :] - step_cost) / epsilon, axis=1))
            g = epsilon * (log_b - jax.nn.logsumexp((f[:, None] - step_cost) / epsilon, axis=0))
            return f, g

        f, g = jax.lax.fori_loop(0, sinkhorn_iterations, update, (f, g))
        return f, g, (f[:, None] + g[None, :] - step_cost) / epsilon

    def keep_going(state):
        iteration, _, _, _, change, error = state
        return (iteration < max_iterations) & ((iteration == 0) | (change > tolerance) | (error > tolerance))

    def step(state):
        iteration, log_plan, f, g, _, _ = state
        plan = jnp.exp(log_plan)
        step_cost = fused_gw_gradient(plan, cost, relation_a, relation_b, alpha) - epsilon * log_plan
        f, g, new_log_plan = project(step_cost, f, g)
        new = jnp.exp(new_log_plan)
        change = jnp.sum(jnp.abs(new - plan))
        error = jnp.sum(jnp.abs(new.sum(axis=1) - a))
        return iteration + 1, new_log_plan, f, g, change, error

    n, m = cost.shape
    inf = jnp.float32(jnp.inf)
    start = (jnp.int32(0), log_a[:, None] + log_b[None, :], jnp.zeros((n,), jnp.float32), jnp.zeros((m,), jnp.float32), inf, inf)
    iterations, log_plan, _, _, change, error = jax.lax.while_loop(keep_going, step, start)
    plan = jnp.exp(log_plan)
    converged = (change <= tolerance) & (error <= tolerance) & jnp.all(jnp.isfinite(plan))
    return OTResult(plan, fused_gw_objective(plan, cost, relation_a, relation_b, alpha), converged, iterations)
