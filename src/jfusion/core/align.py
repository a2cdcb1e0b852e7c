"""The engine: the one path every method runs through.

``params_k + Spec -> supports -> costs -> plans -> transport -> combine``. For every group in
topological order (OTFusion Algorithm 1) and every sweep, the engine builds the reference's
support and each model's (incoming weights after the already-solved groups are transported
into the fused basis, or activations), and asks the method's plan producer
(:class:`jfusion.core.plans.PlanProducer`) for the plans. Every model is then transported by
its plans and the K aligned models are combined slot by slot.

The *reference* is the model aligned onto (``target=k``), or a pytree of another
architecture (``target=params``: fusing into other widths; barycenter fusion's estimate).
Models of equal widths are stacked on a leading K axis and aligned under one ``vmap`` (the
reference model is left out: its plans are the producer's own; when the K axis is sharded
over devices it stays in, its row replaced afterwards, so that K stays sharded); models of
other widths are unrolled in the same program. Either way the aligned models come out stacked on K (they have
the fused model's shapes), so combine has one input form. Everything static -- the Spec, the
producer, the alignment, every model's widths -- is validated once in :func:`prepare` and
passed to ``jit`` as one hashable :class:`EngineConfig`.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import warnings
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jfusion.core.combine import combine, model_weights, slot_weights
from jfusion.core.costs import GroundMetric, resolve_metric
from jfusion.core.errors import ConvergenceWarning, FusionInputError, ResidualStreamWarning, SpecError
from jfusion.core.matching import WeightMatching, warn_capped
from jfusion.core.plans import BalancedPlans, HeadMatching, Importance, PlanProducer, identity_result
from jfusion.core.solvers import OTResult, Solver, resolve_solver
from jfusion.core.spec import Spec
from jfusion.core.support import (
    AlignmentMethod,
    ByActivations,
    RelationalSupport,
    activation_support,
    relation_support,
    resolve_alignment,
    weight_support,
)
from jfusion.core.transport import GroupMap, group_map, transport_model
from jfusion.core.tree import ModelStack, PyTree, first_difference, flatten, unflatten

Widths = tuple[tuple[str, int], ...]


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Everything static about one alignment (hashable: the ``jit`` static argument).

    Attributes:
      spec: the layer topology.
      alignment: how supports are built (:class:`jfusion.ByWeights`, :class:`jfusion.ByActivations`),
        or :class:`jfusion.WeightMatching`, which computes every model's plans itself.
      producer: the method's plan producer.
      model_widths: every model's group widths.
      reference: the index of the model aligned onto, or None for a reference pytree.
      reference_widths: the reference's group widths.
      dtypes: the fused leaves' dtypes (the reference's), in the reference's leaf order.
      treedef: the models' tree structure; reference_treedef: the reference's.
      vectorized: the models are stacked on a leading K axis and aligned under ``vmap``.
      split_models: their K axis is split over devices (a sharded ``jax.Array``): the
        reference is aligned under the same ``vmap`` too, so K stays sharded (see
        :func:`align_models`).
      statistics: the paths of running statistics, left out of weight supports
        (:func:`jfusion.running_statistics`).
    """

    spec: Spec
    alignment: AlignmentMethod
    producer: PlanProducer
    model_widths: tuple[Widths, ...]
    reference: int | None
    reference_widths: Widths
    dtypes: tuple[tuple[str, Any], ...]
    treedef: Any
    reference_treedef: Any
    vectorized: bool
    split_models: bool = False
    statistics: frozenset[str] = frozenset()

    @property
    def num_models(self) -> int:
        return len(self.model_widths)

    @property
    def output_widths(self) -> dict[str, int]:
        return {g: self.producer.output_width(g, m) for g, m in self.reference_widths}


class Problem(NamedTuple):
    """A validated alignment: the static config and the arrays the jitted program takes."""

    config: EngineConfig
    models: dict[str, jax.Array] | tuple[dict[str, jax.Array], ...]
    reference: dict[str, jax.Array] | None
    inputs: jax.Array | None

    def with_producer(self, producer: PlanProducer) -> "Problem":
        """The same problem for a producer that depends on the widths :func:`prepare` read."""
        return self._replace(config=dataclasses.replace(self.config, producer=producer))


class EngineOutput(NamedTuple):
    """What the engine computes before combining.

    Attributes:
      aligned: ``{path: (K, ...)}``: every model transported into the fused layout.
      received: ``{group: (K, m)}``: the mass each model's plan sends to each fused slot.
      plans: ``{group: OTResult}`` (and the head plan of every ``Heads`` name), every
        field with a leading K axis; for models of
        different widths the ``plan`` field is a tuple of K arrays of their own shapes.
      reference: the reference's leaves (what a non-float leaf keeps).
    """

    aligned: dict[str, jax.Array]
    received: dict[str, jax.Array]
    plans: dict[str, OTResult]
    reference: dict[str, jax.Array]


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


@jax.jit  # one program per tree structure, not one per leaf shape
def _finite_flags(leaves: list[jax.Array]) -> jax.Array:
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def _check_finite(leaves: Mapping[str, Any], what: str, model_axis: bool = False) -> None:
    """Raise on NaN/Inf in concrete leaves (traced ones cannot be inspected)."""
    checked = {
        path: x
        for path, x in leaves.items()
        if _is_concrete(x) and jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    }
    if not checked:
        return
    # One reduction per leaf on the device and one transfer; details only for a bad leaf. Eager
    # even inside a trace (concrete leaves closed over by a jitted function).
    with jax.ensure_compile_time_eval():
        finite = np.asarray(_finite_flags(list(checked.values())))
    for (path, x), ok in zip(checked.items(), finite):
        if not ok:
            index = np.argwhere(~np.isfinite(_host_value(x)))[0].tolist()
            name = f"model {index.pop(0)}" if model_axis else what
            raise FusionInputError(
                f"{name}: leaf {path} has NaN or Inf values (first at index {index}); "
                f"fusion would spread them to every neuron they are averaged into"
            )


def _split_over_devices(stacked: Mapping[str, Any]) -> bool:
    """Whether a stacked leaf's K axis is split over devices (its sharding's shards are shorter).

    Read from a concrete ``jax.Array``'s sharding, or a traced value's explicit one (a tracer
    under ``jit`` with automatic sharding carries none).
    """
    for x in stacked.values():
        sharding = getattr(x, "sharding", None) if _is_concrete(x) else jax.typeof(x).sharding
        if sharding is not None and sharding.shard_shape(np.shape(x))[0] < np.shape(x)[0]:
            return True
    return False


def check_target(target: Any, num: int) -> int | None:
    """The reference model's index, or None when ``target`` is a pytree."""
    if isinstance(target, jax.core.Tracer):
        raise FusionInputError(
            "target must be a Python int or a params pytree, not a traced value: the model "
            "aligned onto decides the program's shapes, so make it static (static_argnames)"
        )
    if isinstance(target, (bool, np.bool_)) or isinstance(target, (float, np.floating)):
        raise FusionInputError(f"target must be a model index (an int) or a params pytree, not {target!r}")
    if isinstance(target, (int, np.integer)) or (isinstance(target, (np.ndarray, jax.Array)) and np.ndim(target) == 0):
        if not np.issubdtype(np.asarray(target).dtype, np.integer):
            raise FusionInputError(f"target must be a model index (an int) or a params pytree, not {target!r}")
        if not -num <= int(target) < num:
            raise FusionInputError(f"target={int(target)} is not a model index for K={num} models")
        return int(target) % num
    return None


def _as_spec(spec: Any) -> Spec:
    if isinstance(spec, Spec):
        return spec
    if isinstance(spec, Mapping):
        return Spec(spec)
    raise TypeError(f"spec must be a jfusion.Spec or a dict {{path: axes}}, not {type(spec).__name__}")


def prepare(
    params_list: PyTree | Sequence[PyTree],
    spec: Spec | Mapping[str, Any],
    producer: PlanProducer | None,
    *,
    alignment: str | AlignmentMethod = "weights",
    target: int | PyTree = 0,
    inputs: jax.Array | None = None,
    stack: bool = True,
    matches: bool = True,
) -> Problem:
    """Validate everything that can be checked before tracing; raise named errors.

    ``stack=False`` keeps a list of equal-width models apart (the unrolled path). A method
    whose producer depends on the widths passes ``producer=None`` and then
    :meth:`Problem.with_producer`. ``matches=False`` says the producer matches no neurons
    between models (vanilla averaging), so weight alignment's advice on residual streams
    (:class:`jfusion.ResidualStreamWarning`) does not apply.
    """
    spec = _as_spec(spec)
    if producer is not None and hasattr(producer, "check_spec"):
        producer.check_spec(spec)
    alignment = resolve_alignment(alignment)
    if isinstance(alignment, WeightMatching) and getattr(producer, "identity_groups", ()):
        raise FusionInputError(
            f"identity_groups={list(producer.identity_groups)} with WeightMatching, which solves every group's "
            f"plan itself; use ByWeights or ByActivations to keep groups at the identity"
        )
    # One activation function per model: each model runs its own (different modules cannot vmap).
    stack = stack and not (isinstance(alignment, ByActivations) and alignment.model_fns is not None)
    models = ModelStack(params_list, stack=stack)
    num = models.num_models
    all_widths = [spec.validate(models.shapes(k), f"model {k}") for k in range(num)]
    models.split(spec, all_widths)
    if models.stacked is not None:
        _check_finite(models.stacked, "models", model_axis=True)
    else:
        for k, leaves in enumerate(models.models):
            _check_finite(leaves, f"model {k}")
    reference = check_target(target, num)
    if reference is not None:
        reference_leaves, reference_treedef = None, models.treedef
        reference_shapes, reference_widths = models.shapes(reference), all_widths[reference]
        dtypes = models.dtypes[reference]
    else:
        flat, reference_treedef = flatten(target)
        if {q for p in flat for q in spec.part_paths(p)} != set(models.paths):
            raise FusionInputError(
                f"target has a different tree from the models: {first_difference(spec.join(models.model(0)), flat)}"
            )
        reference_widths = spec.validate({p: np.shape(x) for p, x in flat.items()}, "target")
        reference_leaves = {p: jnp.asarray(x) for p, x in spec.split(flat, reference_widths, "target").items()}
        reference_shapes = {p: tuple(x.shape) for p, x in reference_leaves.items()}
        dtypes = {p: x.dtype for p, x in reference_leaves.items()}
        _check_finite(reference_leaves, "target")
    for leaf in spec.leaves:
        if leaf.groups and not jnp.issubdtype(dtypes[leaf.path], jnp.inexact):
            raise SpecError(
                f"{leaf.path} has dtype {dtypes[leaf.path]} but carries groups {leaf.groups}: only "
                f"floating-point leaves can be transported; label it with None on every axis "
                f"(it then keeps the target's value)"
            )
    for k in range(num):
        shapes = models.shapes(k)
        for leaf in spec.leaves:
            expected = leaf.shape_for(shapes[leaf.path], all_widths[k], reference_widths)
            found = reference_shapes[leaf.path]
            for axis, (e, f) in enumerate(zip(expected, found)):
                if e != f:
                    raise FusionInputError(
                        f"model {k}: {leaf.path} axis {axis} has size {shapes[leaf.path][axis]}, "
                        f"which maps to {e} in the target, but the target has {f} there; "
                        f"ungrouped axes must agree between models"
                    )
    kept = getattr(producer, "identity_groups", ())
    streams = [g for g in spec.residual_streams if g not in kept]
    if matches and num > 1 and not isinstance(alignment, ByActivations) and streams:
        warnings.warn(
            f"weight alignment of a model with residual streams {streams}: each "
            f"stream's map is solved from its first writers (stem, projection shortcuts), which "
            f"may have moved little from their initialisation, so the matching can be no better "
            f"than the identity; align by activations (jfusion.ByActivations.from_module(model), "
            f"inputs=x) and check with jfusion.plan_diagnostics",
            ResidualStreamWarning,
            stacklevel=caller_stacklevel(),
        )
    if isinstance(alignment, ByActivations):
        if inputs is None:
            raise FusionInputError("activation alignment needs inputs=x, a batch to compute activations on")
        if np.size(inputs) == 0 or np.ndim(inputs) == 0 or np.shape(inputs)[0] == 0:
            raise FusionInputError(f"inputs has shape {np.shape(inputs)}: activation alignment needs a non-empty batch")
        if _is_concrete(inputs) and jnp.issubdtype(jnp.result_type(inputs), jnp.inexact):
            with jax.ensure_compile_time_eval():
                finite = bool(jnp.all(jnp.isfinite(jnp.asarray(inputs))))
            if not finite:
                raise FusionInputError("inputs has NaN or Inf values: the activations would be too")
    order = list(reference_leaves) if reference_leaves is not None else models.paths
    config = EngineConfig(
        spec=spec,
        alignment=alignment,
        producer=producer,
        model_widths=tuple(tuple(w.items()) for w in all_widths),
        reference=reference,
        reference_widths=tuple(reference_widths.items()),
        dtypes=tuple((p, dtypes[p]) for p in order),
        treedef=models.treedef,
        reference_treedef=reference_treedef,
        vectorized=models.stacked is not None,
        split_models=models.stacked is not None and _split_over_devices(models.stacked),
        statistics=models.statistics,
    )
    arrays = models.stacked if models.stacked is not None else tuple(models.models)
    return Problem(config, arrays, reference_leaves, inputs)


def _activations(config: EngineConfig, leaves, inputs, index: int | None):
    """Each group's activations of model ``index`` (None: the reference pytree)."""
    alignment = config.alignment
    if index is None and alignment.target_fn is not None:
        fn = alignment.target_fn
    elif index is not None and alignment.model_fns is not None:
        fn = alignment.model_fns[index]
    else:
        fn = alignment.fn
    treedef = config.treedef if index is not None else config.reference_treedef
    return dict(fn(unflatten(treedef, config.spec.join(leaves)), inputs))


def _steps(config: EngineConfig):
    """``(unit, solved)`` per step: every unit (a group, or a ``Heads`` name for its members)
    of every sweep, with the groups that have a plan.

    Static, so the reference's and every model's supports use the same leaves and layout.
    """
    spec = config.spec
    heads = dict(spec.heads)
    sweeps = config.alignment.sweeps if not isinstance(config.alignment, ByActivations) else 1
    for sweep in range(sweeps):
        solved: list[str] = []
        for unit in spec.units:
            yield unit, frozenset(spec.groups if sweep else solved)
            solved.extend(heads.get(unit, (unit,)))


def _support(config, leaves, widths, activations, maps, solved, group) -> jax.Array | RelationalSupport:
    if activations is not None:
        features = activation_support(activations, group, widths[group])
    else:
        features = weight_support(
            leaves, config.spec, group, widths, maps, solved, config.alignment.outgoing, config.statistics
        )
    if not getattr(config.producer, "relational", False):
        return features
    relation = relation_support(leaves, config.spec, group, widths, maps, solved)
    return features if relation is None else RelationalSupport(features, relation)


def _step_support(config, leaves, widths, activations, maps, solved, unit):
    """A group's support, or for a ``Heads`` name one ``(H, hd, d)`` support per member."""
    members = dict(config.spec.heads).get(unit)
    if members is None:
        return _support(config, leaves, widths, activations, maps, solved, unit)
    count = widths[unit]
    return tuple(
        _support(config, leaves, widths, activations, maps, solved, g).reshape(count, widths[g] // count, -1)
        for g in members
    )


def _record(results, maps, group, result, width) -> None:
    if result is None:
        results[group] = identity_result(width)
        maps.pop(group, None)
    else:
        results[group] = result
        maps[group] = group_map(result.plan)


def _record_step(config, results, maps, unit, result, widths) -> None:
    """Record a group's plan, or a ``Heads`` name's :class:`HeadPlans` (None: identities)."""
    members = dict(config.spec.heads).get(unit)
    if members is None:
        _record(results, maps, unit, result, widths[unit])
        return
    results[unit] = identity_result(widths[unit]) if result is None else result.heads
    for i, g in enumerate(members):
        _record(results, maps, g, None if result is None else result.members[i], widths[g])


def _reference_pass(config, leaves, activations):
    """The reference's own plans and its support at every step (its plans depend on it alone).

    The reference keeps its own heads (identities) for every ``Heads`` name.
    """
    widths = dict(config.reference_widths)
    heads = dict(config.spec.heads)
    results: dict[str, OTResult] = {}
    maps: dict[str, GroupMap] = {}
    supports = []
    for unit, solved in _steps(config):
        y = _step_support(config, leaves, widths, activations, maps, solved, unit)
        plan = None if unit in heads else config.producer.reference_plan(unit, y)
        _record_step(config, results, maps, unit, plan, widths)
        supports.append(y)
    aligned = transport_model(leaves, config.spec.leaves, maps, widths)
    return aligned, results, supports


def _model_pass(config, leaves, widths, activations, reference_supports, model):
    """One model's plans against the reference's supports, and the model transported by them."""
    heads = dict(config.spec.heads)
    results: dict[str, OTResult] = {}
    maps: dict[str, GroupMap] = {}
    for (unit, solved), y in zip(_steps(config), reference_supports):
        x = _step_support(config, leaves, widths, activations, maps, solved, unit)
        producer = config.producer
        plan = producer.head_plans(unit, x, y, model) if unit in heads else producer.plan(unit, x, y, model)
        _record_step(config, results, maps, unit, plan, widths)
    return transport_model(leaves, config.spec.leaves, maps, widths), results


def _check_heads(config: EngineConfig) -> None:
    """Structured groups need a producer with ``head_plans`` and alignment step by step."""
    if not config.spec.heads:
        return
    names = [name for name, _ in config.spec.heads]
    if isinstance(config.alignment, WeightMatching):
        raise FusionInputError(f"WeightMatching does not solve structured groups {names}; use ByWeights or ByActivations")
    if not hasattr(config.producer, "head_plans"):
        raise FusionInputError(
            f"the spec has structured groups {names} (jfusion.Heads), but the method's producer "
            f"{type(config.producer).__name__} has no head_plans to solve them"
        )


def _take(tree, index):
    return jax.tree.map(lambda x: x[index], tree)


def _select(mine: jax.Array, one: jax.Array, stacked: jax.Array) -> jax.Array:
    """``stacked`` (K, ...) with row ``k`` replaced by ``one`` where ``mine[k]``."""
    dtype = jnp.promote_types(one.dtype, stacked.dtype)
    mine = mine.reshape(mine.shape + (1,) * (stacked.ndim - 1))
    return jnp.where(mine, one.astype(dtype), stacked.astype(dtype))


def _vmapped_passes(config: EngineConfig, models, acts, reference_supports, index: jax.Array):
    """:func:`_model_pass` of the stacked models ``index`` (equal widths), under one ``vmap``.

    Weight matching instead finds all groups' plans of all the models at once (its
    ``reference_supports`` are the reference's leaves), and the models are transported by them.
    """
    widths = dict(config.model_widths[0])
    if isinstance(config.alignment, WeightMatching):
        results = config.alignment.plans(
            config.spec, config.producer.solver, models, reference_supports, widths, config.statistics
        )

        def transport(leaves, plans):
            return transport_model(leaves, config.spec.leaves, {g: group_map(r.plan) for g, r in plans.items()}, widths)

        return jax.vmap(transport)(models, results), results
    return jax.vmap(lambda leaves, a, k: _model_pass(config, leaves, widths, a, reference_supports, k))(models, acts, index)


def align_models(config: EngineConfig, models, reference_leaves, inputs) -> EngineOutput:
    """The traced engine (see the module docstring); pure, called inside ``jit``."""
    _check_heads(config)
    by_activations = isinstance(config.alignment, ByActivations)
    num, r = config.num_models, config.reference
    if config.vectorized:
        model_leaves = [None] * num  # read lazily below: the vmapped path takes slices
        acts = jax.vmap(lambda leaves: _activations(config, leaves, inputs, 0))(models) if by_activations else None
    else:
        model_leaves = list(models)
        acts = [_activations(config, leaves, inputs, k) for k, leaves in enumerate(models)] if by_activations else None
    if r is None:
        ref_leaves = reference_leaves
        ref_acts = _activations(config, ref_leaves, inputs, None) if by_activations else None
    else:
        ref_leaves = _take(models, r) if config.vectorized else model_leaves[r]
        ref_acts = None if acts is None else (_take(acts, r) if config.vectorized else acts[r])
    if isinstance(config.alignment, WeightMatching):
        # No steps: the models are matched to the reference's leaves in _vmapped_passes.
        config.alignment.check(
            config.spec, config.producer, config.model_widths, config.reference_widths, config.vectorized, config.statistics
        )
        ref_results = {g: identity_result(n) for g, n in config.reference_widths}
        ref_aligned, ref_supports = ref_leaves, ref_leaves
    else:
        ref_aligned, ref_results, ref_supports = _reference_pass(config, ref_leaves, ref_acts)
    others = [k for k in range(num) if k != r]

    if config.vectorized and others and config.split_models:
        # Models sharded on K: every model, the reference too, under one vmap over the K axis
        # as it was given, never sliced into the K - 1 others nor restacked from pieces (both
        # move models between devices), so K stays sharded up to the combine. The
        # reference's row is then replaced by its own plans (a select, local to its device).
        # On one device this costs the reference's wasted alignment, hence the other path.
        index = jnp.arange(num, dtype=jnp.int32)
        aligned, results = _vmapped_passes(config, models, acts, ref_supports, index)
        if r is not None:
            mine = index == r
            aligned = {p: _select(mine, ref_aligned[p], x) for p, x in aligned.items()}
            results = {g: OTResult(*map(functools.partial(_select, mine), ref_results[g], res)) for g, res in results.items()}
        received = {g: results[g].plan.sum(axis=1) for g in config.spec.groups}
        return EngineOutput(aligned, received, results, ref_leaves)
    if config.vectorized and others:
        index = np.asarray(others, np.int32)
        aligned, results = _vmapped_passes(
            config, _take(models, index), None if acts is None else _take(acts, index), ref_supports, jnp.asarray(index)
        )
        per_model = [(_take(aligned, i), _take(results, i)) for i in range(len(others))]
    else:
        per_model = [
            _model_pass(
                config, model_leaves[k], dict(config.model_widths[k]), None if acts is None else acts[k],
                ref_supports, jnp.int32(k),
            )
            for k in others
        ]
    by_model = dict(zip(others, per_model))
    if r is not None:
        by_model[r] = (ref_aligned, ref_results)
    order = [by_model[k] for k in range(num)]
    aligned = {p: jnp.stack([a[p] for a, _ in order]) for p in order[0][0]}
    groups = config.spec.groups
    received = {g: jnp.stack([res[g].plan.sum(axis=0) for _, res in order]) for g in groups}
    plans = {}
    for g in groups + tuple(name for name, _ in config.spec.heads):
        fields = [res[g] for _, res in order]
        shapes = {f.plan.shape for f in fields}
        plans[g] = OTResult(
            jnp.stack([f.plan for f in fields]) if len(shapes) == 1 else tuple(f.plan for f in fields),
            jnp.stack([f.cost for f in fields]),
            jnp.stack([f.converged for f in fields]),
            jnp.stack([f.iterations for f in fields]),
        )
    return EngineOutput(aligned, received, plans, ref_leaves)


def combine_models(config: EngineConfig, out: EngineOutput, weights: jax.Array) -> dict[str, jax.Array]:
    """The fused model's leaves, in the reference's leaf order (see :func:`jfusion.core.combine.combine`)."""
    lambdas = {
        g: slot_weights(config.producer.coverage(g, out.received[g]), weights) for g in config.spec.groups
    }
    dtypes = dict(config.dtypes)
    fused = combine(config.spec, out.aligned, lambdas, weights, dtypes, out.reference)
    return {p: fused[p] for p in dtypes}


@functools.partial(jax.jit, static_argnames=("config",))
def fusion_program(config: EngineConfig, models, reference_leaves, inputs, weights):
    """Align and combine: ``(fused leaves, engine output)``. One XLA program."""
    out = align_models(config, models, reference_leaves, inputs)
    return combine_models(config, out, weights), out


def run(problem: Problem, weights: jax.Array | Sequence[float] | None = None) -> tuple[PyTree, EngineOutput]:
    """Run a prepared problem: the fused pytree (reference's structure) and the engine output.

    Warns (eagerly) about every plan whose solver did not converge.
    """
    config = problem.config
    w = model_weights(weights, config.num_models)
    fused, out = fusion_program(config, problem.models, problem.reference, problem.inputs, w)
    warn_unconverged(out.plans, config.alignment)
    return unflatten(config.reference_treedef, config.spec.join(fused)), out


def caller_stacklevel() -> int:
    """The ``warnings.warn`` stacklevel of the first frame outside jfusion (the user's call)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] == "jfusion":
        frame, level = frame.f_back, level + 1
    return level


class Alignment(NamedTuple):
    """Result of :func:`align`.

    Attributes:
      aligned: the K models transported onto the target's neurons, as one pytree stacked on
        a leading K axis, in the target's widths and tree structure
        (:func:`jfusion.unstack_models` gives a list).
      plans: ``{group: OTResult}``, each field with a leading K axis (the target model's
        plan is the identity); for models of different widths ``plan`` is a tuple of K
        arrays.
    """

    aligned: PyTree
    plans: dict[str, OTResult]


def align(
    params_list: PyTree | Sequence[PyTree],
    spec: Spec,
    *,
    solver: str | Solver = "exact",
    alignment: str | AlignmentMethod = "weights",
    metric: str | GroundMetric = "euclidean",
    importance: Importance = "uniform",
    heads: HeadMatching = "matched",
    identity_groups: Sequence[str] = (),
    target: int | PyTree = 0,
    inputs: jax.Array | None = None,
) -> Alignment:
    """Align every model's neurons onto a target's, group by group (OTFusion Algorithm 1).

    For each group ``l`` in topological order and each model ``k``: supports ``X_k`` (rows
    of the incoming weights after past correction, or activations on ``inputs``) and ``Y``
    of the target; cost ``C = d(X_k, Y)``; plan ``T_k = OT(mu(X_k), mu(Y), C)`` (``1/n_k``, ``1/m``
    unless ``importance``); then every
    leaf is transported, output dims by ``T diag(1/beta)`` and input dims by
    ``diag(1/alpha) T``.

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
      heads: how attention heads (:class:`jfusion.Heads`) are paired: ``"matched"`` (default),
        ``"in_order"`` or ``"flat"`` (see :class:`jfusion.BalancedPlans`).
      identity_groups: groups (or ``Heads`` names) that keep the identity plan instead of
        being solved, e.g. ``("r",)``, a ViT's residual stream.
      target: index of the model to align onto, or a params pytree of the target
        architecture (other widths: fusing into a smaller or larger model).
      inputs: the batch activation alignment runs on.

    Reference: Singh & Jaggi, "Model Fusion via Optimal Transport", NeurIPS 2020.
    """
    producer = BalancedPlans(resolve_solver(solver), resolve_metric(metric), importance, heads, tuple(identity_groups))
    problem = prepare(params_list, spec, producer, alignment=alignment, target=target, inputs=inputs)
    _, out = run(problem)
    aligned = problem.config.spec.join({p: out.aligned[p] for p, _ in problem.config.dtypes})
    return Alignment(unflatten(problem.config.reference_treedef, aligned), out.plans)


@jax.jit
def _finite_rows(x: jax.Array) -> jax.Array:
    return jnp.all(jnp.isfinite(x).reshape(x.shape[0], -1), axis=1)


def _host_value(x: Any) -> np.ndarray:
    """A concrete array's value on the host.

    An array spanning other processes' devices (models sharded on K in a multi-host run) is
    gathered to every process first: used for the K per-model flags and counts only.
    """
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def warn_unconverged(plans: Mapping[str, OTResult], alignment: AlignmentMethod | None = None) -> None:
    """Warn (eagerly; a no-op under tracing) about every plan whose solver did not converge.

    The warning points at the user's line that called jfusion. Weight matching's plans share
    one outcome, the coordinate descent's: one warning when it hit its cap.
    """
    if isinstance(alignment, WeightMatching):
        warn_capped(plans, alignment, caller_stacklevel() + 1)
        return
    for group, result in plans.items():
        if not (_is_concrete(result.converged) and _is_concrete(result.iterations)):
            continue
        flags = np.atleast_1d(_host_value(result.converged))
        if flags.all():
            continue
        iters = np.atleast_1d(_host_value(result.iterations))
        bad = np.flatnonzero(~flags).tolist()
        if isinstance(result.plan, tuple):
            finite = [not _is_concrete(p) or bool(np.isfinite(np.asarray(p)).all()) for p in result.plan]
        else:
            finite = _host_value(_finite_rows(result.plan)) if _is_concrete(result.plan) else [True] * len(flags)
        non_finite = [k for k in bad if not finite[k]]
        exact = [k for k in bad if k not in non_finite and int(iters[k]) == 0]
        if non_finite:
            advice = (
                f"the plans of models {non_finite} are NaN/Inf: the supports (weights or "
                f"activations) were not finite or overflowed float32, so no solver setting helps"
            )
        elif exact:
            advice = (
                f"the exact solver's cost for models {exact} was not finite or constant: the "
                f"supports do not tell the neurons apart (NaN/Inf, zero weights or a constant "
                f"batch), so the matching is arbitrary"
            )
        else:
            advice = "raise max_iterations or epsilon, or use jfusion.Exact()"
        warnings.warn(
            f"group {group!r}: the OT solver did not converge for models {bad} "
            f"(stopped after {', '.join(str(iters[k]) for k in bad)} iterations); {advice}",
            ConvergenceWarning,
            stacklevel=caller_stacklevel(),
        )
