"""Gromov-Wasserstein barycenter (GWB) fusion of recurrent networks: a plan producer.

Akash, Li & García Trillos (2022) fuse RNNs and LSTMs by a Gromov-Wasserstein barycenter: a
recurrent group's hidden-to-hidden kernel carries the group on both axes, so its neurons
are compared by how they feed each other, and the coupling of model ``k`` onto the
reference solves a fused Gromov-Wasserstein problem (Vayer et al. 2019)::

    T_k = argmin_T (1 - alpha) <C, T> + alpha sum_ijkl ||A_ij - B_kl||^2 T_ik T_jl

over couplings of the uniform measures ``1/n_k`` and ``1/m``. ``C = d(X_k, Y) / max d`` is
the ground cost between the engine's supports (the input-to-hidden weights transported by
the previous group's plan, or activations); ``A = n_k W_hh / s`` and ``B = m W_ref / s`` are
the model's and the reference's hidden-to-hidden weights with every gate as a channel
(:func:`jfusion.core.support.relation_support`), divided by the mass ``1/n`` of the neuron
they read -- so a neuron split into two copies with halved outgoing weights relates to the
others as its parent did, the engine's transport rule -- and by ``s``, the largest of their
magnitudes, so both terms are of order one and ``epsilon`` is absolute. The gradient keeps
both cross terms of the asymmetric kernels (:mod:`jfusion.core.gromov`).

The solver is entropic, so the plan is soft. With ``hard=True`` (default) it is rounded to
the assignment that keeps the most of its mass (the exact assignment solver on ``-T``,
:class:`jfusion.Exact`): a permutation matrix over ``n`` for equal widths, each target
neuron taking ``n_k / m`` whole source neurons when one width divides the other; the GW
solver's convergence is what the result reports. ``hard=False`` keeps the soft plan (any
widths). Groups without recurrent leaves are solved as in OT fusion.

The barycenter over K models and into any width is :func:`jfusion.barycenter_fuse` with
``producer=GromovWassersteinPlans(...)``: couplings onto the current estimate alternate with
the barycentric update of its weights (``W_t = sum_k lambda_k T~_k(W_k)``, the
hidden-to-hidden kernel transported on both axes), until the estimate stops changing. The
transport is the engine's -- the input axis by ``diag(1/T 1) T``, the output axis by
``T diag(1/T^T 1)`` -- where the paper writes ``m^2 pi H pi^T``; the two agree for the
permutation plans of equal widths, and the engine's keeps a duplicated unit's function.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from jfusion.core.costs import GroundMetric, resolve_metric
from jfusion.core.errors import FusionInputError
from jfusion.core.gromov import entropic_fused_gw, fused_gw_objective
from jfusion.core.plans import solve_balanced, uniform
from jfusion.core.solvers import Exact, OTResult, Solver, resolve_solver
from jfusion.core.support import RelationalSupport


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"GromovWassersteinPlans.{name} must be an int >= 1, got {value!r}")


def _positive_float(name: str, value: object) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"GromovWassersteinPlans.{name} must be a finite number > 0, got {value!r}")


@dataclasses.dataclass(frozen=True)
class GromovWassersteinPlans:
    """GWB's plan producer: fused Gromov-Wasserstein couplings for recurrent groups.

    See the module docstring for the problem and its scaling. Pass it to
    :func:`jfusion.barycenter_fuse` (``producer=``) or :func:`jfusion.fuse_with`.

    Attributes:
      alpha: weight of the quadratic (hidden-to-hidden) term, in [0, 1]; ``1 - alpha``
        weighs the linear term from the supports.
      epsilon: the entropic proximal step (> 0), absolute on the normalised costs.
      metric: the ground metric of the linear term (and of the non-recurrent groups).
      solver: the OT solver of the groups without recurrent leaves.
      max_iterations: mirror-descent steps at most (>= 1); a plan that hits the cap is
        reported ``converged=False``.
      tolerance: stop once the plan's L1 change and marginal error are both at most this.
      sinkhorn_iterations: Sinkhorn updates per step (warm-started).
      hard: round each recurrent plan to an assignment (needs one width to divide the other).

    Examples:
      A GRU and a copy whose hidden units (all gates together) are shuffled: the coupling
      from the recurrent weights alone (``alpha=1``) finds the shuffle:

      >>> import jax, jax.numpy as jnp, jfusion
      >>> from jfusion.models import RecurrentClassifier
      >>> model = RecurrentClassifier((6,), num_classes=3, cell="gru")
      >>> params = model.init(jax.random.key(0), jnp.ones((1, 5, 4)))
      >>> shuffled, _ = jfusion.permute(params, model.spec(), jax.random.key(1))
      >>> gwb = jfusion.GromovWassersteinPlans(alpha=1.0)
      >>> fused = jfusion.barycenter_fuse([params, shuffled], model.spec(), producer=gwb)
      >>> bool(jnp.allclose(fused.params["params"]["Recurrent_0"]["hz"]["kernel"],
      ...                   params["params"]["Recurrent_0"]["hz"]["kernel"], atol=1e-5))
      True
      >>> bool(fused.plans["r0"].converged.all())
      True

    References:
      - Aditya Kumar Akash, Sixu Li and Nicolás García Trillos. *Wasserstein Barycenter-based
        Model Fusion and Linear Mode Connectivity of Neural Networks.* 2022 (GWB fusion of
        RNNs and LSTMs).
      - Gabriel Peyré, Marco Cuturi and Justin Solomon. *Gromov-Wasserstein Averaging of
        Kernel and Distance Matrices.* ICML 2016 (entropic GW).
      - Titouan Vayer, Laetitia Chapel, Rémi Flamary, Romain Tavenard and Nicolas Courty.
        *Optimal Transport for structured data with application on graphs.* ICML 2019
        (fused GW).
    """

    alpha: float = 0.5
    epsilon: float = 0.01
    metric: GroundMetric = GroundMetric()
    solver: Solver = Exact()
    max_iterations: int = 100
    tolerance: float = 1e-4
    sinkhorn_iterations: int = 50
    hard: bool = True

    relational: ClassVar[bool] = True  # the engine hands recurrent groups a RelationalSupport

    def __post_init__(self):
        if not (isinstance(self.alpha, (int, float)) and 0.0 <= self.alpha <= 1.0):
            raise ValueError(f"GromovWassersteinPlans.alpha must be a number in [0, 1], got {self.alpha!r}")
        _positive_float("epsilon", self.epsilon)
        _positive_float("tolerance", self.tolerance)
        _positive_int("max_iterations", self.max_iterations)
        _positive_int("sinkhorn_iterations", self.sinkhorn_iterations)
        object.__setattr__(self, "metric", resolve_metric(self.metric))
        object.__setattr__(self, "solver", resolve_solver(self.solver))

    def output_width(self, group: str, reference_width: int) -> int:
        return reference_width

    def reference_plan(self, group: str, support: jax.Array | RelationalSupport) -> None:
        return None

    def plan(
        self,
        group: str,
        support: jax.Array | RelationalSupport,
        reference_support: jax.Array | RelationalSupport,
        model: jax.Array,
    ) -> OTResult:
        if not isinstance(support, RelationalSupport):
            return solve_balanced(self.solver, self.metric, group, support, reference_support)
        n, m = support.features.shape[0], reference_support.features.shape[0]
        if support.relation.shape[2] != reference_support.relation.shape[2]:
            raise FusionInputError(
                f"group {group!r}: the model's hidden-to-hidden weights have "
                f"{support.relation.shape[2]} channels per neuron pair, the reference's "
                f"{reference_support.relation.shape[2]}"
            )
        if self.hard and n % m and m % n:
            raise FusionInputError(
                f"group {group!r}: hard=True rounds the GW plan to an assignment, which needs "
                f"one width to divide the other; found n={n} model and m={m} reference "
                f"neurons; use GromovWassersteinPlans(hard=False) for other width ratios"
            )
        cost = self.metric(support.features, reference_support.features)
        cost = cost / jnp.maximum(jnp.max(cost), 1e-30)
        a, b = support.relation * n, reference_support.relation * m
        scale = jnp.maximum(jnp.maximum(jnp.max(jnp.abs(a)), jnp.max(jnp.abs(b))), 1e-30)
        a, b = a / scale, b / scale
        result = entropic_fused_gw(
            cost, a, b, uniform(n), uniform(m), alpha=self.alpha, epsilon=self.epsilon,
            max_iterations=self.max_iterations, tolerance=self.tolerance,
            sinkhorn_iterations=self.sinkhorn_iterations,
        )
        if not self.hard:
            return result
        rounded = Exact()(-result.plan, uniform(n), uniform(m))
        return OTResult(
            rounded.plan,
            fused_gw_objective(rounded.plan, cost, a, b, self.alpha),
            result.converged & rounded.converged,
            result.iterations,
        )

    def coverage(self, group: str, received: jax.Array) -> jax.Array:
        return jnp.ones_like(received)
