"""Is a plan any better than the identity? Plan sharpness, mass moved, matched-activation correlation.

A plan that matches real correspondences is sharp (each neuron sent to one partner) and pairs
neurons that compute the same thing: their activations on the same inputs correlate. When
models share an initialisation (federated rounds), or when weight alignment finds nothing to
match (weights still near their random init), the identity can be the better plan; this says
so per group and model, so a caller can fall back to it (or to ``GroundMetric(identity_prior=...)``).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jfusion.core.errors import FusionInputError
from jfusion.core.solvers import OTResult
from jfusion.core.support import ByActivations
from jfusion.core.tree import ModelStack, PyTree, unflatten

_HIGHEST = jax.lax.Precision.HIGHEST

# Correlations are means of float32 products: a plan must beat the identity by more than this.
_TOLERANCE = 1e-5


class PlanDiagnostics(NamedTuple):
    """One group's diagnostics, every field ``(K,)``: one value per model's plan.

    Attributes:
      sharpness: the mean over the model's neurons of ``max_q T[p, q] / sum_q T[p, q]``: 1 for
        a permutation (or any hard assignment), ``1/m`` for the uniform plan.
      off_identity: the share of the plan's mass off the identity ``eye(n, m)``: 0 for the
        identity, ``1 - 1/m`` for a random permutation on average.
      matched_correlation: the plan-weighted mean correlation of matched neurons'
        activations, ``sum_pq T[p, q] corr(a_p, b_q) / sum T`` (None without activations).
      identity_correlation: the same for the identity, ``mean_p corr(a_p, b_p)`` over the
        first ``min(n, m)`` neurons (None without activations).
      no_better_than_identity: ``matched_correlation <= identity_correlation`` (within
        float32 rounding): the plan pairs neurons no more alike than leaving them in place
        (None without activations). The target's own plan is the identity, so it is True there.
    """

    sharpness: jax.Array
    off_identity: jax.Array
    matched_correlation: jax.Array | None
    identity_correlation: jax.Array | None
    no_better_than_identity: jax.Array | None


Activations = Callable[[PyTree, jax.Array], Mapping[str, jax.Array]]


def _plans_of(plans: Any) -> dict[str, list[jax.Array]]:
    """``{group: [plan of model k]}`` from an Alignment, a Fusion or ``{group: OTResult | array}``."""
    plans = getattr(plans, "plans", plans)
    if not isinstance(plans, Mapping):
        raise FusionInputError(
            f"plans must be a jfusion.Alignment, a jfusion.Fusion or {{group: OTResult or (K, n, m) plans}}, "
            f"not {type(plans).__name__}"
        )
    out = {}
    for group, plan in plans.items():
        plan = plan.plan if isinstance(plan, OTResult) else plan
        if isinstance(plan, (tuple, list)):
            out[group] = [jnp.asarray(p) for p in plan]
        else:
            plan = jnp.asarray(plan)
            if plan.ndim != 3:
                raise FusionInputError(f"group {group!r}: plans have shape {plan.shape}; expected (K, n, m), one plan per model")
            out[group] = list(plan)
    return out


@jax.jit
def _plan_shape(plan: jax.Array) -> tuple[jax.Array, jax.Array]:
    plan = plan.astype(jnp.float32)
    rows = plan.sum(axis=1)
    sent = rows > 0  # a pruned neuron's zero row says nothing about sharpness
    ratio = jnp.where(sent, plan.max(axis=1) / jnp.where(sent, rows, 1.0), 0.0)
    sharpness = ratio.sum() / jnp.maximum(sent.sum(), 1)
    on_identity = jnp.sum(plan * jnp.eye(*plan.shape, dtype=plan.dtype))
    return sharpness, 1.0 - on_identity / jnp.maximum(plan.sum(), 1e-30)


@jax.jit
def _correlations(plan: jax.Array, a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Plan-weighted and identity correlation between activations ``a (..., n)`` and ``b (..., m)``."""

    def standardised(x):
        x = x.astype(jnp.float32).reshape(-1, x.shape[-1])
        x = x - x.mean(axis=0)
        std = jnp.sqrt(jnp.mean(x * x, axis=0))
        return jnp.where(std > 0, x / jnp.where(std > 0, std, 1.0), 0.0)  # a constant neuron correlates with nothing

    x, y = standardised(a), standardised(b)
    corr = jnp.matmul(x.T, y, precision=_HIGHEST) / x.shape[0]
    plan = plan.astype(jnp.float32)
    matched = jnp.sum(plan * corr) / jnp.maximum(plan.sum(), 1e-30)
    return matched, jnp.mean(jnp.diagonal(corr))


@functools.partial(jax.jit, static_argnums=0)
def _stacked_activations(fn: Activations, stacked: PyTree, inputs: jax.Array) -> dict[str, jax.Array]:
    return jax.vmap(lambda variables: dict(fn(variables, inputs)))(stacked)


@functools.partial(jax.jit, static_argnums=0)
def _activations(fn: Activations, variables: PyTree, inputs: jax.Array) -> dict[str, jax.Array]:
    return dict(fn(variables, inputs))


def plan_diagnostics(
    plans: Any,
    params_list: PyTree | Sequence[PyTree] | None = None,
    *,
    activations: ByActivations | Callable[[PyTree, jax.Array], Mapping[str, jax.Array]] | None = None,
    inputs: jax.Array | None = None,
    target: int | PyTree = 0,
) -> dict[str, PlanDiagnostics]:
    """Per group, how sharp each model's plan is, how far from the identity, and whether it beats it.

    Sharpness and the mass off the identity need only the plans. With ``activations`` and
    ``inputs`` the plans are also scored by what the neurons compute: each model's (unaligned)
    activations are correlated with the target's, and the plan-weighted correlation of matched
    neurons is compared with that of neurons left in place (the identity).

    Args:
      plans: a :class:`jfusion.Alignment` or :class:`jfusion.Fusion`, or ``{group: OTResult}``
        / ``{group: (K, n, m) plans}``.
      params_list: the K models the plans were solved for, as given to :func:`jfusion.align`
        (needed with ``activations``).
      activations: a :class:`jfusion.ByActivations` or a function ``(variables, inputs) ->
        {group: (..., n)}``.
      inputs: the batch the activations are computed on (held-out data tells more than the
        batch the plans were solved on).
      target: the index of the model aligned onto, or the target pytree.

    Returns:
      ``{group: PlanDiagnostics}``, every field with one value per model.

    Examples:
      A shuffled copy's plan is a sharp permutation that moves most of the mass:

      >>> import jax, jfusion
      >>> from jfusion.models import MLP, mlp_spec
      >>> model, spec = MLP((8, 3)), mlp_spec(2)
      >>> x = jax.random.normal(jax.random.key(2), (32, 4))
      >>> params = model.init(jax.random.key(0), x)
      >>> shuffled, _ = jfusion.permute(params, spec, jax.random.key(1))
      >>> alignment = jfusion.align([params, shuffled], spec)
      >>> report = jfusion.plan_diagnostics(alignment, [params, shuffled],
      ...                                   activations=jfusion.ByActivations.from_module(model), inputs=x)
      >>> report["h0"].sharpness.tolist(), report["h0"].no_better_than_identity.tolist()
      ([1.0, 1.0], [True, False])
    """
    by_group = _plans_of(plans)
    shapes = {g: [_plan_shape(p) for p in ps] for g, ps in by_group.items()}
    sharpness = {g: jnp.stack([s for s, _ in v]) for g, v in shapes.items()}
    off = {g: jnp.stack([o for _, o in v]) for g, v in shapes.items()}
    if activations is None:
        return {g: PlanDiagnostics(sharpness[g], off[g], None, None, None) for g in by_group}
    if params_list is None or inputs is None:
        raise FusionInputError("plan_diagnostics with activations needs the models (params_list) and inputs")
    fn = activations.fn if isinstance(activations, ByActivations) else activations
    models = ModelStack(params_list, "params_list")
    inputs = jnp.asarray(inputs)
    if models.stacked is not None:
        stacked = _stacked_activations(fn, unflatten(models.treedef, models.stacked), inputs)
        per_model = [{g: a[k] for g, a in stacked.items()} for k in range(models.num_models)]
    else:
        per_model = [_activations(fn, unflatten(models.treedef, models.model(k)), inputs) for k in range(models.num_models)]
    if isinstance(target, (int, np.integer)):
        reference = per_model[int(target)]
    else:
        target_fn = activations.target_fn if isinstance(activations, ByActivations) and activations.target_fn else fn
        reference = _activations(target_fn, target, inputs)
    report = {}
    for group, group_plans in by_group.items():
        if len(group_plans) != models.num_models:
            raise FusionInputError(f"group {group!r}: {len(group_plans)} plans for {models.num_models} models")
        missing = [k for k, acts in enumerate(per_model) if group not in acts] or ([] if group in reference else ["target"])
        if missing:
            raise FusionInputError(f"group {group!r}: the activation function gave no activations for it (models {missing})")
        scores = [_correlations(p, acts[group], reference[group]) for p, acts in zip(group_plans, per_model)]
        matched = jnp.stack([m for m, _ in scores])
        identity = jnp.stack([i for _, i in scores])
        report[group] = PlanDiagnostics(sharpness[group], off[group], matched, identity, matched <= identity + _TOLERANCE)
    return report
