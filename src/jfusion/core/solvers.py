"""Optimal-transport solvers: pure functions ``(cost, a, b) -> OTResult`` that ``vmap``.

Given a cost ``C (n, m)`` and marginals ``a (n,)``, ``b (m,)``, a solver returns a plan
``T >= 0`` with ``T 1 = a``, ``T^T 1 = b`` minimising ``<C, T>`` (exactly, or with an
entropic penalty), plus diagnostics. A solver also offers *partial* OT (Morelli & Eckstein
2026): transport all but ``isolated`` source neurons' mass and send the rest to a sink.

Any hashable object with these two methods is a solver (:class:`Solver`); jfusion's are
frozen dataclasses, so they can be static arguments of ``jax.jit``. Names work too:
``solver="exact"`` or ``"sinkhorn"``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.optimize
from ott.geometry import geometry
from ott.problems.linear import linear_problem
from ott.solvers.linear import sinkhorn

from jfusion.core.auction import auction, quantise
from jfusion.core.errors import FusionInputError


class OTResult(NamedTuple):
    """A transport plan and how it was found.

    Attributes:
      plan: ``(n, m)`` coupling between source neurons (rows) and target neurons (columns).
      cost: transport cost ``<C, plan>``.
      converged: whether the solver met its tolerance. An exact solver reports False when
        the cost was not finite (NaN/Inf in the supports) or constant (supports that do not
        tell the neurons apart), since its matching is then arbitrary.
      iterations: iterations the solver ran: Sinkhorn's, the auction's bidding rounds
        (:class:`Exact`), 0 for the Hungarian algorithm and for an exact solver's cost that
        cannot decide a matching (not finite or constant).
    """

    plan: jax.Array
    cost: jax.Array
    converged: jax.Array
    iterations: jax.Array


@runtime_checkable
class Solver(Protocol):
    """What jfusion needs of an OT solver.

    ``__call__(cost, a, b) -> OTResult`` solves balanced OT between marginals ``a`` and
    ``b``. ``partial(cost, isolated) -> (OTResult, sink)`` solves partial OT between uniform
    unit masses: every source and target neuron has mass 1, all but ``isolated`` source
    neurons are transported, and ``sink (n,)`` is the mass each source neuron sends nowhere.
    Both must be traceable, ``vmap``-able and the solver hashable (a ``jit`` static argument).
    """

    def __call__(self, cost: jax.Array, a: jax.Array, b: jax.Array) -> OTResult: ...

    def partial(self, cost: jax.Array, isolated: int) -> tuple[OTResult, jax.Array]: ...


def _result(plan: jax.Array, cost: jax.Array, converged, iterations) -> OTResult:
    return OTResult(
        plan,
        jnp.sum(plan * cost),
        jnp.asarray(converged, dtype=bool),
        jnp.asarray(iterations, dtype=jnp.int32),
    )


def _conditioned(cost: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(cost mapped affinely onto [0, 1], whether it can decide a matching)``.

    An assignment's optimum is unchanged by adding a constant to every cost or scaling all
    of them by a positive one; the Hungarian algorithm's potentials then stay well inside
    float32 whatever the weights' scale (1e-19 or 1e19). A cost that is not finite, or
    constant over more than one entry (supports that do not tell the neurons apart: zero
    weights, a constant batch), makes every matching equally optimal, and so arbitrary.
    """
    finite = jnp.all(jnp.isfinite(cost))
    safe = jnp.where(jnp.isfinite(cost), cost, 0.0)
    low, high = jnp.min(safe), jnp.max(safe)
    spread = high - low
    informative = finite & ((spread > 0) | (cost.size == 1))
    return jnp.where(spread > 0, (safe - low) / jnp.where(spread > 0, spread, 1.0), 0.0), informative


ALGORITHMS = ("auto", "scipy", "hungarian", "auction")


def _scipy_assignment(costs: np.ndarray) -> np.ndarray:
    """``cols[..., i]``: scipy's optimal assignment of row ``i`` for every square cost of a batch."""
    costs = np.asarray(costs, np.float64)
    flat = costs.reshape(-1, *costs.shape[-2:])
    cols = [scipy.optimize.linear_sum_assignment(c)[1] for c in flat]
    return np.asarray(cols, np.int32).reshape(costs.shape[:-1])


def resolve_algorithm(algorithm: str) -> str:
    """``"auto"`` is scipy's assignment where XLA runs on the host CPU, else the Hungarian.

    On the CPU the host solver costs nothing to compile and is a compiled C++ loop; on an
    accelerator it would copy every cost to the host, which is not measured yet.
    """
    if algorithm != "auto":
        return algorithm
    return "scipy" if jax.default_backend() == "cpu" else "hungarian"


def _assign(scaled: jax.Array, algorithm: str, max_iterations: int | None):
    """``(cols, certified, iterations)``: the permutation ``i -> cols[i]`` minimising
    ``sum_i scaled[i, cols[i]]`` for a square cost in [0, 1]."""
    algorithm = resolve_algorithm(algorithm)
    if algorithm == "scipy":
        # A host callback inside the program: under vmap it receives the whole batch at once.
        cols = jax.pure_callback(
            _scipy_assignment,
            jax.ShapeDtypeStruct(scaled.shape[:-1], jnp.int32),
            jax.lax.stop_gradient(scaled),
            vmap_method="expand_dims",
        )
        return cols, True, 0
    if algorithm == "hungarian":
        rows, cols = optax.assignment.hungarian_algorithm(scaled)
        return jnp.zeros(len(rows), jnp.int32).at[rows].set(cols.astype(jnp.int32)), True, 0
    # Exact for the integer cost; off the float optimum by <= auction.quantisation_gap.
    result = auction(quantise(scaled), max_iterations)
    return result.assignment, result.converged, result.iterations


def _report(plan, cost, informative, certified, iterations) -> OTResult:
    # A cost that cannot decide a matching reports 0 iterations: jfusion's warning then
    # says why (the supports), not "raise max_iterations".
    return _result(plan, cost, informative & certified, jnp.where(informative, iterations, 0))


def assignment_plan(
    cost: jax.Array, algorithm: str = "auto", max_iterations: int | None = None
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Exact OT plan between uniform measures of sizes n and m, one dividing the other.

    Solved as a linear assignment (scipy's on the host, optax's Hungarian algorithm, or
    :mod:`jfusion.core.auction`; see :class:`Exact`) after replicating the smaller side ``max(n, m) / min(n, m)`` times; every
    entry of the plan is a multiple of ``1 / max(n, m)``, so for ``n == m`` it is exactly
    ``P / n`` for a permutation matrix ``P``, not a float approximation of it. Returns
    ``(plan, informative, certified, iterations)``.
    """
    n, m = cost.shape
    if n % m and m % n:
        raise FusionInputError(
            f"the exact solver transports uniform masses by assignment, which needs one width "
            f"to divide the other; found n={n} source and m={m} target neurons (ratio "
            f"{n / m:.3g}); use jfusion.Sinkhorn() for other width ratios"
        )
    scaled, informative = _conditioned(cost)
    square = jnp.tile(scaled, (m // n, 1)) if m > n else jnp.tile(scaled, (1, n // m))
    cols, certified, iterations = _assign(square, algorithm, max_iterations)
    size = max(n, m)
    plan = jnp.zeros((n, m), cost.dtype).at[jnp.arange(size) % n, cols % m].add(1.0 / size)
    return plan, informative, certified, iterations


def _is_uniform(x: jax.Array) -> bool | None:
    """Whether concrete marginals are uniform; None when traced (cannot be inspected)."""
    if isinstance(x, jax.core.Tracer):
        return None
    values = np.asarray(x, np.float64)
    return bool(np.allclose(values, 1.0 / values.size, rtol=1e-5, atol=0.0))


@dataclasses.dataclass(frozen=True)
class Exact:
    """Exact OT between uniform marginals (the LP of OTFusion's ``ot.emd``).

    With uniform marginals and widths where one divides the other, the OT linear program
    has an optimal vertex that is an assignment. The marginals must be uniform;
    :class:`Sinkhorn` takes any.

    Attributes:
      algorithm: ``"auto"`` (default): ``"scipy"`` when JAX's default backend is the CPU,
        ``"hungarian"`` on accelerators. ``"scipy"``: ``scipy.optimize.linear_sum_assignment``
        (shortest augmenting paths, Crouse 2016) on the float64 cost, called from inside the
        jitted program by ``jax.pure_callback``: nothing to compile, a C++ loop on the host,
        one call for all K models under ``vmap``; on an accelerator every cost is copied to
        the host, and a program holding it cannot be serialised with ``jax.export``.
        ``"hungarian"``: optax's Hungarian algorithm on the float cost, ``O(n^3)`` in a
        sequential ``while_loop`` compiled into the program (about 0.5 s of XLA compile per
        group on a CPU). ``"auction"``: a forward auction with
        epsilon-scaling on the cost quantised to integers (:mod:`jfusion.core.auction`),
        vectorised over the rows and batched under ``vmap``, with an optimality certificate
        for the quantised cost; the plan's cost ``<C, plan>`` is then within
        ``(max C - min C) (1/Q + 2^-21)`` of the float optimum,
        ``Q = min(2^24, 2^28 // (size + 1))`` (``size = max(n, m)``;
        :func:`jfusion.core.auction.quantisation_gap`). On 2 CPU cores it is as fast as the
        Hungarian on neuron-like costs and 10-50x slower on random ones
        (``benchmarks/bench_solvers.py``); it is meant for accelerators, where it is not
        yet measured, so it is not the default.
      max_iterations: the auction's cap on bidding rounds (None: 1000 + 100 n); a plan that
        hits it is reported ``converged=False``.
    """

    algorithm: Literal["auto", "scipy", "hungarian", "auction"] = "auto"
    max_iterations: int | None = None

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"Exact.algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        cap = self.max_iterations
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, np.integer)) or cap < 1):
            raise ValueError(f"Exact.max_iterations must be None or an int >= 1, got {cap!r}")

    def __call__(self, cost: jax.Array, a: jax.Array, b: jax.Array) -> OTResult:
        n, m = cost.shape
        if a.shape != (n,) or b.shape != (m,):
            raise FusionInputError(
                f"marginals of shapes {a.shape} and {b.shape} do not fit a cost of shape {cost.shape}"
            )
        if _is_uniform(a) is False or _is_uniform(b) is False:
            raise FusionInputError(
                "jfusion.Exact solves OT between uniform marginals only (an assignment); "
                "use jfusion.Sinkhorn() for non-uniform (importance) marginals"
            )
        plan, informative, certified, iterations = assignment_plan(cost, self.algorithm, self.max_iterations)
        return _report(plan, cost, informative, certified, iterations)

    def partial(self, cost: jax.Array, isolated: int) -> tuple[OTResult, jax.Array]:
        """The cheapest matching of ``n - isolated`` pairs (unit masses on matched pairs).

        Unmatched rows take zero-cost sink columns and unmatched columns zero-cost sink rows;
        a sink-to-sink pair costs 1, more than the 0 of sending its row and column's
        partners to sinks instead, so exactly ``n - isolated`` real pairs are formed.
        """
        n, m = cost.shape
        matched = n - isolated
        if not 0 <= matched <= min(n, m):
            raise FusionInputError(f"cannot match {matched} pairs between {n} and {m} neurons")
        if matched == 0:  # every neuron isolated: no matching to decide
            plan = jnp.zeros((n, m), cost.dtype)
            return _result(plan, cost, jnp.all(jnp.isfinite(cost)), 0), jnp.ones((n,), cost.dtype)
        scaled, informative = _conditioned(cost)
        size = n + m - matched
        padded = jnp.zeros((size, size), cost.dtype).at[:n, :m].set(scaled).at[n:, m:].set(1.0)
        cols, certified, iterations = _assign(padded, self.algorithm, self.max_iterations)
        full = jnp.zeros((size, size), cost.dtype).at[jnp.arange(size), cols].set(1.0)
        return _report(full[:n, :m], cost, informative, certified, iterations), full[:n, m:].sum(axis=1)


@dataclasses.dataclass(frozen=True)
class Sinkhorn:
    """Entropic OT by log-domain Sinkhorn iterations (``ott.solvers.linear.sinkhorn``).

    Solves ``min <C, T> - eps H(T)`` s.t. ``T 1 = a, T^T 1 = b``. Faster than exact OT on
    large layers and works for any widths and marginals; the plan is slightly blurred, the
    less so the smaller ``epsilon``.

    With ``tau_a < 1`` or ``tau_b < 1`` it solves *unbalanced* OT (Chizat, Peyré, Schmitzer
    & Vialard 2018; Séjourné, Feydy, Vialard, Trouvé & Peyré 2019): the marginal constraints
    become penalties, ``min <C, T> - eps H(T) + rho_a KL(T 1 | a) + rho_b KL(T^T 1 | b)`` with
    ``tau = rho / (rho + eps)`` (ott-jax's ``LinearProblem(tau_a, tau_b)``; OTFusion's
    ``--unbalanced``). ``tau = 1`` is the hard constraint, smaller ``tau`` lets the plan
    leave mass behind: a neuron whose every match is expensive sends (or receives) little,
    the less the smaller ``tau``. The plan then meets its marginals only approximately, and
    ``threshold`` is ott's criterion for the unbalanced iterations. Transport uses the plan's
    own row and column sums (``jfusion.core.transport``), so a target neuron that receives
    little mass from a model is still that model's barycentric average of whatever reached
    it, and a source neuron that sends little still hands its outgoing weights to the
    targets its small mass went to (OTFusion's ``T / (T^T 1)`` correction does the same). A
    source neuron that sends exactly nothing is dropped, outgoing weights and all, and a
    target slot that receives exactly nothing is left to the other models
    (:class:`jfusion.BalancedPlans`); never NaN.

    Attributes:
      epsilon: entropic regularisation (> 0); relative to the cost's mean (or std) when
        ``relative_epsilon`` is set, so the same value works for every layer's scale.
      relative_epsilon: ``"mean"``, ``"std"`` or None (absolute epsilon).
      threshold: tolerance (> 0) on the marginal error ``||T 1 - a||_1 + ...``.
      max_iterations: iteration cap (>= 1); a plan that hits it is reported with
        ``converged=False`` and jfusion warns (eagerly) or returns the flag (under jit).
      tau_a: how strictly the source marginal (``a``, the model's neurons) is met,
        ``0 < tau <= 1``; 1 (default) is balanced OT. :meth:`partial` is always balanced
        (its sink already absorbs the unmatched mass).
      tau_b: the same for the target marginal (``b``, the reference's neurons).

    References:
      - Marco Cuturi. *Sinkhorn Distances: Lightspeed Computation of Optimal Transport.*
        NeurIPS 2013.
      - Lénaïc Chizat, Gabriel Peyré, Bernhard Schmitzer and François-Xavier Vialard.
        *Scaling Algorithms for Unbalanced Optimal Transport Problems.* Mathematics of
        Computation, 2018.
      - Thibault Séjourné, Jean Feydy, François-Xavier Vialard, Alain Trouvé and Gabriel
        Peyré. *Sinkhorn Divergences for Unbalanced Optimal Transport.* 2019.
    """

    epsilon: float = 0.01
    relative_epsilon: Literal["mean", "std"] | None = "mean"
    threshold: float = 1e-4
    max_iterations: int = 5000
    tau_a: float = 1.0
    tau_b: float = 1.0

    def __post_init__(self):
        if not (isinstance(self.epsilon, (int, float)) and math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ValueError(f"Sinkhorn.epsilon must be a finite number > 0, got {self.epsilon!r}")
        if self.relative_epsilon not in (None, "mean", "std"):
            raise ValueError(
                f"Sinkhorn.relative_epsilon must be 'mean', 'std' or None, got {self.relative_epsilon!r}"
            )
        if not (isinstance(self.threshold, (int, float)) and self.threshold > 0):
            raise ValueError(f"Sinkhorn.threshold must be > 0, got {self.threshold!r}")
        if isinstance(self.max_iterations, bool) or not isinstance(self.max_iterations, (int, np.integer)) or self.max_iterations < 1:
            raise ValueError(f"Sinkhorn.max_iterations must be an int >= 1, got {self.max_iterations!r}")
        for name in ("tau_a", "tau_b"):
            tau = getattr(self, name)
            if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 < tau <= 1:
                raise ValueError(
                    f"Sinkhorn.{name} must be a number in (0, 1] (1: balanced OT; smaller: the "
                    f"marginal is a softer penalty), got {tau!r}"
                )

    def __call__(self, cost: jax.Array, a: jax.Array, b: jax.Array) -> OTResult:
        geom = geometry.Geometry(
            cost_matrix=cost, epsilon=self.epsilon, relative_epsilon=self.relative_epsilon
        )
        solver = sinkhorn.Sinkhorn(
            lse_mode=True,
            threshold=self.threshold,
            max_iterations=self.max_iterations,
            # Convergence is checked every inner_iterations; a divisor of the cap makes the
            # loop stop exactly there, so the reported count never exceeds it.
            inner_iterations=math.gcd(10, int(self.max_iterations)),
            # Differentiate by unrolling the iterations. ott's default implicit differentiation
            # solves a linear system whose conditioning at small epsilon is beyond float32
            # (its CG never meets its tolerance and raises); unrolling is exact for the
            # computed iterate and costs memory only per inner_iterations block.
            implicit_diff=None,
        )
        out = solver(linear_problem.LinearProblem(geom, a, b, tau_a=self.tau_a, tau_b=self.tau_b))
        converged = out.converged & jnp.all(jnp.isfinite(out.matrix))
        return _result(out.matrix, cost, converged, out.n_iters)

    def partial(self, cost: jax.Array, isolated: int) -> tuple[OTResult, jax.Array]:
        """Sink-point partial OT: a fraction ``alpha = isolated / n`` of the mass goes to a sink.

        With ``s = alpha / (1 + alpha)``, marginals ``[(1-s)/n, ..., s]`` and
        ``[(1-s)/m, ..., s]``, the cost extended by a sink row and column (neuron-sink cost
        0, sink-sink ``max(C) + 1``). The plan is rescaled so a target neuron's mass is 1.
        """
        n, m = cost.shape
        alpha = isolated / n
        s = alpha / (1.0 + alpha)
        a = jnp.concatenate([jnp.full((n,), (1.0 - s) / n), jnp.array([s])])
        b = jnp.concatenate([jnp.full((m,), (1.0 - s) / m), jnp.array([s])])
        extended = jnp.zeros((n + 1, m + 1), cost.dtype).at[:n, :m].set(cost).at[n, m].set(jnp.max(cost) + 1.0)
        result = dataclasses.replace(self, tau_a=1.0, tau_b=1.0)(extended, a, b)
        scale = m * (1.0 + alpha)  # a target neuron's mass is (1 - s) / m = 1 / (m (1 + alpha))
        plan = result.plan[:n, :m] * scale
        return result._replace(plan=plan, cost=jnp.sum(plan * cost)), result.plan[:n, m] * scale


SOLVERS = {"exact": Exact, "sinkhorn": Sinkhorn}


def resolve_solver(solver: str | Solver) -> Solver:
    """A solver object from a solver or its name (``"exact"``, ``"sinkhorn"``)."""
    if isinstance(solver, str):
        if solver.lower() not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; pass one of {sorted(SOLVERS)} or a solver object such as jfusion.Sinkhorn(epsilon=0.01)")
        return SOLVERS[solver.lower()]()
    if not isinstance(solver, Solver):
        raise TypeError(
            f"solver must be 'exact', 'sinkhorn' or an object with __call__(cost, a, b) and "
            f"partial(cost, isolated) (jfusion.Exact(), jfusion.Sinkhorn()); got {type(solver).__name__}"
        )
    try:
        hash(solver)
    except TypeError:
        raise TypeError(f"the solver {solver!r} must be hashable (a frozen dataclass) to be a jit static argument") from None
    return solver
