"""Wasserstein-barycenter fusion: OT fusion iterated onto its own estimate.

Akash, Li & García Trillos, "Wasserstein Barycenter-based Model Fusion and Linear Mode
Connectivity of Neural Networks", 2022. ``F_{t+1} = sum_k w_k T~_k(F_t)``, where
``T~_k(F_t)`` is model k aligned onto the current estimate; the fixed point is a barycenter
of the K layer measures. It is a ``lax.while_loop`` over the engine with the estimate as
the reference -- the same producer, transport and combine as :func:`jfusion.fuse`. With
``producer=GromovWassersteinPlans(...)`` the couplings of recurrent groups are fused
Gromov-Wasserstein ones, the same paper's Gromov-Wasserstein barycenter (GWB,
``jfusion.methods.gromov``).
"""

from __future__ import annotations

import functools
import warnings
from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from jfusion.core.align import (
    align_models,
    caller_stacklevel,
    check_target,
    combine_models,
    prepare,
    warn_unconverged,
)
from jfusion.core.combine import model_weights as normalised_weights
from jfusion.core.costs import GroundMetric, resolve_metric
from jfusion.core.errors import ConvergenceWarning, FusionInputError
from jfusion.core.plans import BalancedPlans, Importance, PlanProducer
from jfusion.core.solvers import OTResult, Solver, resolve_solver
from jfusion.core.spec import Spec
from jfusion.core.support import AlignmentMethod
from jfusion.core.tree import ModelStack, PyTree, unflatten
from jfusion.methods.prune import prune


class Barycenter(NamedTuple):
    """Result of :func:`barycenter_fuse` (arrays, so it can leave ``jit``).

    Attributes:
      params: the fused pytree, in the initial estimate's widths and structure.
      plans: the last step's plans, as :class:`jfusion.Fusion`'s.
      iterations: align-and-average steps taken.
      change: relative change ``||F_t - F_{t-1}|| / ||F_{t-1}||`` of the last step.
      converged: ``change <= tolerance`` (False: stopped at ``max_iterations``).
    """

    params: PyTree
    plans: dict[str, OTResult]
    iterations: jax.Array
    change: jax.Array
    converged: jax.Array


def barycenter_fuse(
    params_list: PyTree | Sequence[PyTree],
    spec: Spec,
    *,
    target: int | PyTree = 0,
    widths: Mapping[str, int] | float | None = None,
    solver: str | Solver = "exact",
    alignment: str | AlignmentMethod = "weights",
    metric: str | GroundMetric = "euclidean",
    importance: Importance = "uniform",
    model_weights: jax.Array | Sequence[float] | None = None,
    inputs: jax.Array | None = None,
    max_iterations: int = 100,
    tolerance: float = 1e-5,
    producer: PlanProducer | None = None,
) -> Barycenter:
    """Wasserstein-barycenter fusion: align onto the fused estimate and average, repeatedly.

    ``F_{t+1} = sum_k w_k T~_k(F_t)`` at least once and until
    ``||F_{t+1} - F_t|| <= tolerance ||F_t||`` or ``max_iterations`` (one step from a model
    is OTFusion). The fused widths are the initial estimate's, so they may be smaller or
    larger than the models'.

    The other arguments are :func:`jfusion.fuse`'s.

    Args:
      target: the first estimate: a model index or a params pytree of the target architecture.
      widths: compress the initial estimate to these widths first (``{group: width}`` or a
        multiplier; :func:`jfusion.prune` by merging), i.e. start from "a model fused into
        the target widths".
      max_iterations, tolerance: the stopping rule; the result reports both outcomes, and an
        eager call warns with :class:`jfusion.ConvergenceWarning` when it stopped at the cap.
      producer: the plans of every step (default ``BalancedPlans(solver, metric, importance)``, the
        Wasserstein barycenter); :class:`jfusion.GromovWassersteinPlans` gives the
        Gromov-Wasserstein barycenter of recurrent networks (GWB). It carries its own solver
        and metric, so ``solver``, ``metric`` and ``importance`` must then be left at their defaults.

    Returns:
      A :class:`Barycenter`: the fused ``params``, the last step's ``plans``, and
      ``iterations``, ``change`` and ``converged``.

    Examples:
      Two networks of 8 hidden neurons fused into 4 (``widths=0.5``):

      >>> import jax, jax.numpy as jnp, jfusion
      >>> from jfusion.models import MLP, mlp_spec
      >>> model, x, spec = MLP((8, 3)), jnp.ones((1, 4)), mlp_spec(2)  # 4 -> 8 (group h0) -> 3
      >>> params = model.init(jax.random.key(0), x)
      >>> other = model.init(jax.random.key(1), x)
      >>> result = jfusion.barycenter_fuse([params, other], spec, widths=0.5)
      >>> result.params["params"]["Dense_0"]["kernel"].shape
      (4, 4)
      >>> bool(result.converged)
      True

    References:
      - Aditya Kumar Akash, Sixu Li and Nicolás García Trillos. *Wasserstein Barycenter-based
        Model Fusion and Linear Mode Connectivity of Neural Networks.* 2022.
      - Sidak Pal Singh and Martin Jaggi. *Model Fusion via Optimal Transport.* NeurIPS 2020.
    """
    if producer is None:
        producer = BalancedPlans(resolve_solver(solver), resolve_metric(metric), importance)
    elif not (solver == "exact" and metric == "euclidean" and importance == "uniform"):
        raise FusionInputError(
            f"barycenter_fuse got producer={producer!r} and solver={solver!r}, metric={metric!r}, "
            f"importance={importance!r}: the producer makes the plans, so give them to it instead"
        )
    models = ModelStack(params_list)
    index = check_target(target, models.num_models)
    start = target if index is None else unflatten(models.treedef, models.model(index))
    if widths is not None:
        start = prune(start, spec, widths, method="merge").params
    problem = prepare(params_list, spec, producer, alignment=alignment, target=start, inputs=inputs)
    w = normalised_weights(model_weights, problem.config.num_models)
    params, plans, iterations, change = _barycenter(
        problem.config, problem.models, problem.reference, inputs, w, jnp.float32(tolerance), int(max_iterations)
    )
    warn_unconverged(plans, problem.config.alignment)
    converged = change <= tolerance
    if not isinstance(converged, jax.core.Tracer) and not bool(converged):
        warnings.warn(
            f"barycenter fusion stopped at max_iterations={max_iterations} with relative change "
            f"{float(change):.3g} > tolerance {tolerance}",
            ConvergenceWarning,
            stacklevel=caller_stacklevel(),
        )
    fused = unflatten(problem.config.reference_treedef, problem.config.spec.join(params))
    return Barycenter(fused, plans, iterations, change, converged)


@functools.partial(jax.jit, static_argnames=("config", "max_iterations"))
def _barycenter(config, models, start, inputs, weights, tolerance, max_iterations):
    def step(estimate):
        out = align_models(config, models, estimate, inputs)
        return combine_models(config, out, weights), out.plans

    def norm(tree):
        return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in tree.values()))

    def keep_going(state):
        iteration, change, _, _ = state
        return (iteration < max_iterations) & ((iteration == 0) | (change > tolerance))

    def iterate(state):
        iteration, _, estimate, _ = state
        new, plans = step(estimate)
        change = norm({p: new[p] - estimate[p] for p in new}) / jnp.maximum(norm(estimate), 1e-30)
        return iteration + 1, change, new, plans

    no_plans = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(lambda: step(start)[1]))
    iteration, change, estimate, plans = jax.lax.while_loop(
        keep_going, iterate, (jnp.int32(0), jnp.float32(jnp.inf), start, no_plans)
    )
    return estimate, plans, iteration, change
