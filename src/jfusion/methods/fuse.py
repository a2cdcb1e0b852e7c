"""OT fusion: align every model onto a target, then average the aligned weights.

``W_F = sum_k w_k W~_k`` where ``W~_k`` is model k transported by its plans (see
:func:`jfusion.align`) and ``w_k`` are the model weights (OTFusion eq. 3 and its
multi-model extension). The method is the engine's default producer,
:class:`jfusion.core.plans.BalancedPlans`.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax

from jfusion.core.align import prepare, run
from jfusion.core.costs import GroundMetric, resolve_metric
from jfusion.core.plans import BalancedPlans, HeadMatching, Importance, PlanProducer
from jfusion.core.solvers import OTResult, Solver, resolve_solver
from jfusion.core.spec import Spec
from jfusion.core.support import AlignmentMethod
from jfusion.core.tree import PyTree


class Fusion(NamedTuple):
    """Result of :func:`fuse`, :func:`jfusion.prune` and :func:`jfusion.vanilla_average`.

    Attributes:
      params: the fused pytree, with the target's structure and dtypes.
      plans: ``{group: OTResult}`` with a leading K axis on every field: the plans and their
        diagnostics (``converged``, ``iterations``, ``cost``). Under ``jit`` no warning can
        see a traced flag, so this is where a jitted loop reads convergence.
    """

    params: PyTree
    plans: dict[str, OTResult]


def fuse(
    params_list: PyTree | Sequence[PyTree],
    spec: Spec,
    *,
    solver: str | Solver = "exact",
    alignment: str | AlignmentMethod = "weights",
    metric: str | GroundMetric = "euclidean",
    importance: Importance = "uniform",
    heads: HeadMatching = "matched",
    identity_groups: Sequence[str] = (),
    model_weights: jax.Array | Sequence[float] | None = None,
    target: int | PyTree = 0,
    inputs: jax.Array | None = None,
) -> Fusion:
    """Fuse K models into one by optimal-transport alignment and weighted averaging.

    ``W_F = sum_k w_k diag(1/beta) T_k^T W^_k`` per layer, where ``T_k`` aligns model k to
    the target (OTFusion, Singh & Jaggi 2020, eqs. 1-3). With ``target`` a model index the
    fused model has that model's widths; with ``target`` a params pytree of other widths
    the models are fused into that architecture (e.g. a pruned one).

    Pure and traceable: ``jax.jit``, ``lax.scan`` over rounds and ``vmap`` over many fusions
    all work; models of equal widths are aligned under ``vmap`` so the whole pass is one XLA
    program. Called eagerly, it warns with :class:`jfusion.ConvergenceWarning` when an
    iterative solver did not converge; under ``jit`` read ``plans[group].converged``.
    For BatchNorm networks, recompute the statistics afterwards:
    ``recalibrate_batch_stats(train_apply, fuse(...).params, batches)``.

    Args:
      params_list: K pytrees of one structure, or one pytree stacked along a leading K axis.
      spec: the layer topology (:class:`jfusion.Spec`, or the dict it is built from).
      solver: ``"exact"`` (default), ``"sinkhorn"`` or a solver object
        (:class:`jfusion.Exact`, :class:`jfusion.Sinkhorn`).
      alignment: ``"weights"``, :class:`jfusion.ByWeights`, :class:`jfusion.ByActivations` or
        :class:`jfusion.WeightMatching` (Git Re-Basin; equal widths, exact solver).
      metric: ground metric between supports: a :class:`jfusion.GroundMetric` or its kind.
      importance: the neurons' masses: ``"uniform"`` (default) or ``"l1"`` / ``"l2"``, OTFusion's
        importance (mass proportional to the norm of each neuron's support row, on the
        models' and the target's side; see :class:`jfusion.BalancedPlans`). Needs
        ``solver=jfusion.Sinkhorn()``.
      heads: how attention heads (:class:`jfusion.Heads`) are paired: ``"matched"`` (default:
        the head order is solved), ``"in_order"`` (head ``h`` onto head ``h``, as Transformer
        fusion does) or ``"flat"`` (one plan over all ``H hd`` dims of each member, a
        heuristic that ignores head boundaries); see :class:`jfusion.BalancedPlans`.
      identity_groups: groups (or ``Heads`` names) that keep the identity plan instead of
        being solved, e.g. ``("r",)`` to leave a ViT's residual stream unaligned.
      model_weights: the weights ``w_k`` (K,), normalised to sum to one; uniform by default.
      target: index of the model to align onto, or a params pytree of the target
        architecture (other widths: fusing into a smaller or larger model).
      inputs: the batch activation alignment runs on.

    Returns:
      A :class:`Fusion`: the fused ``params`` and the ``plans``.

    Examples:
      Fuse a network with a copy of itself whose hidden neurons were shuffled: alignment
      undoes the shuffle, so the average is the network again (vanilla averaging is not).

      >>> import jax, jax.numpy as jnp, jfusion
      >>> from jfusion.models import MLP, mlp_spec
      >>> model, x, spec = MLP((8, 3)), jnp.ones((1, 4)), mlp_spec(2)  # 4 -> 8 (group h0) -> 3
      >>> params = model.init(jax.random.key(0), x)
      >>> shuffled, _ = jfusion.permute(params, spec, jax.random.key(1))
      >>> result = jfusion.fuse([params, shuffled], spec)
      >>> kernel = params["params"]["Dense_0"]["kernel"]
      >>> bool(jnp.allclose(result.params["params"]["Dense_0"]["kernel"], kernel, atol=1e-6))
      True
      >>> result.plans["h0"].plan.shape  # per model (K = 2): n x m, mass 1/n per matched pair
      (2, 8, 8)
      >>> bool(result.plans["h0"].converged.all())
      True

    References:
      - Sidak Pal Singh and Martin Jaggi. *Model Fusion via Optimal Transport.* NeurIPS 2020.
    """
    producer = BalancedPlans(resolve_solver(solver), resolve_metric(metric), importance, heads, tuple(identity_groups))
    return fuse_with(producer, params_list, spec, alignment=alignment, model_weights=model_weights, target=target, inputs=inputs)


def fuse_with(
    producer: PlanProducer,
    params_list: PyTree | Sequence[PyTree],
    spec: Spec,
    *,
    alignment: str | AlignmentMethod = "weights",
    model_weights: jax.Array | Sequence[float] | None = None,
    target: int | PyTree = 0,
    inputs: jax.Array | None = None,
) -> Fusion:
    """Fuse with any plan producer (:class:`jfusion.PlanProducer`): the engine's entry point.

    :func:`fuse` is ``fuse_with(BalancedPlans(solver, metric), ...)``; a new method is a
    producer passed here (or an entry point of its own around ``prepare`` and ``run`` of
    ``jfusion.core.align`` when the producer depends on the models' widths).
    """
    problem = prepare(params_list, spec, producer, alignment=alignment, target=target, inputs=inputs)
    fused, out = run(problem, model_weights)
    return Fusion(fused, out.plans)
