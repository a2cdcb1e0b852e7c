"""REPAIR and RESCALE: give a fused network's channels the statistics its parents' channels had.

Averaging aligned networks shrinks their pre-activations: two matched neurons that are not
identical average into a neuron of smaller variance ("variance collapse"), layer after layer,
until the fused network's outputs barely depend on its inputs. Jordan et al. (2023) correct it
after the fact. For every channel ``q`` of every layer, the target statistics are the
model-weighted interpolation of the aligned parents' statistics of that channel,

    mu*_q = sum_k w_k mu_{k,q},        sigma*_q = sum_k w_k sigma_{k,q},

and the fused network's pre-activation ``y_q`` (mean ``mu_q``, std ``sigma_q`` on the same
inputs) is replaced by the affine map that meets them:

    REPAIR:   y_q <- (sigma*_q / sigma_q) (y_q - mu_q) + mu*_q
    RESCALE:  y_q <- (sigma*_q / sigma_q) y_q            (the std only)

The map is folded into the parameters of the module that writes the channel: its kernel's
output axis (or a norm's scale) is multiplied by ``r_q = sigma*_q / sigma_q`` and its bias
becomes ``r_q (b_q - mu_q) + mu*_q``. A network with BatchNorm is repaired through the
norms' affine parameters (scale and bias), its running statistics are left alone; resetting
those ("reset BN", :func:`jfusion.recalibrate_batch_stats`) is the special case of matching
the fused network to its own batch statistics, and when wanted it comes first.

Repairing a layer changes the inputs of every layer after it, so the repaired modules go in
stages, each from a forward pass of the network repaired so far: a module joins the first
stage after every module its output depends on. The dependence is measured, not read from the
Spec's group order (a residual stream's writers sit at every depth of the network): the
forward pass's jaxpr says which outputs are computed from which module's parameters. A
feed-forward network is then repaired exactly in one pass; ``passes`` repeats the sweep for
networks that call a module more than once (its later calls read its earlier ones).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Literal, Mapping, NamedTuple, Sequence

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import numpy as np

from jfusion.core.align import Alignment
from jfusion.core.combine import model_weights as normalised_weights
from jfusion.core.errors import FusionInputError, SpecError
from jfusion.core.spec import Spec
from jfusion.core.support import ByActivations
from jfusion.core.tree import ModelStack, PyTree, first_difference, flatten, module_path, running_statistics, unflatten

_HIGHEST = jax.lax.Precision.HIGHEST


class Repair(NamedTuple):
    """Result of :func:`repair`, every dict keyed by the module whose output was repaired.

    Attributes:
      params: the repaired pytree (the fused pytree's structure and dtypes).
      scales: ``{module: (m,)}`` the factor ``r`` each output channel was multiplied by
        (over all passes: the module's output ``y`` became ``scales * y + shifts`` for the
        same inputs).
      shifts: ``{module: (m,)}`` the offset added (zero for RESCALE).
      target_mean: ``{module: (m,)}`` the interpolated parents' channel means ``mu*``.
      target_std: ``{module: (m,)}`` the interpolated parents' channel stds ``sigma*``.
    """

    params: PyTree
    scales: dict[str, jax.Array]
    shifts: dict[str, jax.Array]
    target_mean: dict[str, jax.Array]
    target_std: dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class _Unit:
    """One module whose output carries a group: what repair measures and folds into."""

    group: str
    module: str
    scaled: tuple[str, ...]  # kernels, norm scales: multiplied by r along the output axis
    shifted: tuple[str, ...]  # biases: r (b - mu) + mu*


@dataclasses.dataclass(frozen=True)
class _RepairConfig:
    """Everything static about one repair (hashable: the ``jit`` static argument)."""

    units: tuple[_Unit, ...]
    activations: Callable[[PyTree, jax.Array], Mapping[str, jax.Array]]
    treedef: Any
    shift: bool
    passes: int
    stages: tuple[tuple[int, ...], ...]  # indices into units, in dependence order


def _repair_points(spec: Spec, points: Mapping[str, str | Sequence[str]] | None) -> dict[str, tuple[str, ...]]:
    """``{group: module paths}`` whose outputs are repaired, in the Spec's group order.

    By default a group's normalisations (writer modules all of whose leaves carry the group
    alone: BatchNorm, LayerNorm) when it has any -- what follows the conv is what the next
    layer reads -- and otherwise every module with a leaf writing it (Dense, Conv).
    """
    if points is not None:
        unknown = sorted(set(points) - set(spec.groups))
        if unknown:
            raise SpecError(f"repair points name groups {unknown} that the spec does not have (it has {list(spec.groups)})")
        return {g: (points[g],) if isinstance(points[g], str) else tuple(points[g]) for g in spec.groups if g in points}
    chosen = {}
    for group in spec.groups:
        modules: dict[str, list] = {}
        for leaf in spec.writers(group):
            modules.setdefault(module_path(leaf.path), []).append(leaf)
        norms = [m for m, leaves in modules.items() if all(leaf.dims == (group,) for leaf in leaves)]
        chosen[group] = tuple(norms or modules)
    return chosen


def _units(spec: Spec, points: Mapping[str, tuple[str, ...]], statistics: frozenset[str], shift: bool) -> tuple[_Unit, ...]:
    units, seen = [], {}
    for group, modules in points.items():
        for module in modules:
            if module in seen:
                raise SpecError(f"module {module!r} is a repair point of groups {seen[module]!r} and {group!r}; a module writes one group")
            seen[module] = group
            leaves = [l for l in spec.writers(group) if module_path(l.path) == module and l.path not in statistics]
            if not leaves:
                raise SpecError(
                    f"group {group!r}: module {module!r} writes none of its leaves (its writers: "
                    f"{[l.path for l in spec.writers(group)]}), so repair has nothing to fold its output's statistics into"
                )
            blocks = [l.path for l in leaves if spec.part_of(l.path)]
            if blocks:
                raise SpecError(
                    f"group {group!r}: module {module!r} writes it as blocks {blocks} of a Concat axis, beside "
                    f"other groups, and repair rescales a module's whole output; leave the group out with points="
                )
            recurrent = [l.path for l in leaves if group in l.input_groups]
            if recurrent:
                raise SpecError(
                    f"group {group!r}: {recurrent} read the group they write (a recurrent cell): rescaling "
                    f"its channels changes what the recurrence feeds back, which one affine map per channel "
                    f"cannot undo; leave the group out with points="
                )
            shifted = tuple(l.path for l in leaves if l.path.rsplit("/", 1)[-1] == "bias")
            scaled = tuple(l.path for l in leaves if l.path not in shifted)
            if not scaled:
                raise SpecError(f"group {group!r}: module {module!r} has only a bias {list(shifted)}, nothing to rescale its output by")
            if shift and not shifted:
                raise SpecError(
                    f"group {group!r}: module {module!r} has no bias ({list(scaled)}), so its output's mean "
                    f"cannot be moved; use mode='rescale', or repair the norm that follows it (points=)"
                )
            units.append(_Unit(group, module, scaled, shifted))
    return tuple(units)


def _moments(y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-channel mean and (population) std of ``(samples, m)`` values, in float32."""
    y = y.astype(jnp.float32)
    mean = jnp.mean(y, axis=0)
    return mean, jnp.sqrt(jnp.mean(jnp.square(y - mean), axis=0))


def _fold(leaves: dict[str, jax.Array], unit: _Unit, scale: jax.Array, shift: jax.Array) -> dict[str, jax.Array]:
    """The unit's output ``y`` becomes ``scale * y + shift`` (its output group is each leaf's last, fastest dim)."""
    out = dict(leaves)
    m = scale.shape[0]
    for path in unit.scaled + unit.shifted:
        x = leaves[path]
        v = x.astype(jnp.float32).reshape(-1, m) * scale
        if path in unit.shifted:
            v = v + shift
        out[path] = v.reshape(x.shape).astype(x.dtype)
    return out


@functools.partial(jax.jit, static_argnames=("config",))
def _repair_program(config: _RepairConfig, fused, parents, inputs, weights):
    def activations(leaves):
        return config.activations(unflatten(config.treedef, leaves), inputs)

    def moments_of(leaves):
        return {u.module: _moments(y) for u, y in zip(config.units, _unit_values(config.units, activations(leaves)))}

    # The parents' statistics: one forward pass of every parent, vmapped over K.
    parent_moments = jax.vmap(moments_of)(parents)
    target_mean = {u: jnp.tensordot(weights, mean, axes=1, precision=_HIGHEST) for u, (mean, _) in parent_moments.items()}
    target_std = {u: jnp.tensordot(weights, std, axes=1, precision=_HIGHEST) for u, (_, std) in parent_moments.items()}
    scales = {u.module: jnp.ones_like(target_std[u.module]) for u in config.units}
    shifts = {u.module: jnp.zeros_like(target_mean[u.module]) for u in config.units}
    leaves = dict(fused)
    for _ in range(config.passes):
        for stage in config.stages:
            units = [config.units[i] for i in stage]
            # One forward pass of the network as repaired so far: this stage's inputs are final.
            values = _unit_values(units, activations(leaves))
            for unit, y in zip(units, values):
                mean, std = _moments(y)
                # A channel constant on the batch has no spread to rescale: it is only moved.
                spread = std > 1e-6 * (jnp.abs(mean) + 1e-6)
                r = jnp.where(spread, target_std[unit.module] / jnp.where(spread, std, 1.0), 1.0)
                c = target_mean[unit.module] - r * mean if config.shift else jnp.zeros_like(mean)
                leaves = _fold(leaves, unit, r, c)
                scales[unit.module] = r * scales[unit.module]
                shifts[unit.module] = r * shifts[unit.module] + c
    return leaves, scales, shifts, target_mean, target_std


# Call primitives whose body runs once: dependence flows through them variable by variable.
# Any other primitive with a body (scan, while, cond) is taken whole: every output depends on
# every input, since a loop carries values from one iteration to the next.
_CALLS = frozenset({"pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call", "remat", "checkpoint"})


def _flow(jaxpr: jex_core.Jaxpr, inputs: Sequence[frozenset[int]]) -> list[frozenset[int]]:
    """For each output of ``jaxpr``, the units whose parameters it is computed from."""
    env: dict[Any, frozenset[int]] = dict(zip(jaxpr.invars, inputs))

    def read(atom: Any) -> frozenset[int]:
        return frozenset() if isinstance(atom, jex_core.Literal) else env.get(atom, frozenset())

    for eqn in jaxpr.eqns:
        ins = [read(a) for a in eqn.invars]
        body = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
        body = getattr(body, "jaxpr", body)  # a ClosedJaxpr's Jaxpr
        if eqn.primitive.name in _CALLS and isinstance(body, jex_core.Jaxpr) and len(body.invars) == len(ins):
            outs = _flow(body, ins)
        else:
            outs = [frozenset().union(*ins)] * len(eqn.outvars)
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]


def _dependencies(units: tuple[_Unit, ...], activations: Callable, treedef: Any, fused, inputs) -> np.ndarray:
    """``D[u, v]``: whether unit ``v``'s output is computed from unit ``u``'s parameters.

    Read from the forward pass's jaxpr (tracing only, nothing compiled or run), so a path that
    ReLUs close on these inputs still counts.
    """
    paths = list(fused)

    def outputs(*arrays):
        return _unit_values(units, activations(unflatten(treedef, dict(zip(paths, arrays))), inputs))

    closed = jax.make_jaxpr(outputs)(*(fused[p] for p in paths))
    owner = {path: i for i, unit in enumerate(units) for path in unit.scaled + unit.shifted}
    sources = [frozenset({owner[p]}) if p in owner else frozenset() for p in paths]
    depends = np.zeros((len(units), len(units)), bool)
    for v, found in enumerate(_flow(closed.jaxpr, sources)):
        depends[list(found), v] = True
    return depends


def _stages(units: Sequence[_Unit], depends: np.ndarray) -> tuple[tuple[int, ...], ...]:
    """Units in stages: each after every other unit its output depends on."""
    n = len(units)
    depends = depends & ~np.eye(n, dtype=bool)  # a module called twice reads itself: passes settle it
    cyclic = [(units[u].module, units[v].module) for u in range(n) for v in range(u + 1, n) if depends[u, v] and depends[v, u]]
    if cyclic:
        raise SpecError(f"the outputs of modules {cyclic[0]} depend on each other, so neither can be repaired first")
    level = np.zeros(n, int)
    for _ in range(n):  # longest path from a source: at most n relaxations
        level = np.array([max([level[u] + 1 for u in range(n) if depends[u, v]], default=0) for v in range(n)])
    return tuple(tuple(int(i) for i in np.flatnonzero(level == k)) for k in range(int(level.max(initial=-1)) + 1))


def _unit_values(units: Sequence[_Unit], values: Mapping[str, jax.Array]) -> list[jax.Array]:
    out = []
    for unit in units:
        if unit.module not in values:
            raise SpecError(f"group {unit.group!r}: module {unit.module!r} returned no output during the forward pass")
        out.append(values[unit.module])
    return out


def repair(
    fused: PyTree,
    parents: Alignment | PyTree | Sequence[PyTree],
    spec: Spec,
    inputs: jax.Array,
    *,
    model: Any,
    model_weights: jax.Array | Sequence[float] | None = None,
    mode: Literal["repair", "rescale"] = "repair",
    points: Mapping[str, str | Sequence[str]] | None = None,
    passes: int = 1,
    apply_kwargs: Mapping[str, Any] | None = None,
) -> Repair:
    """Rescale (and shift) every group's channels of ``fused`` to its parents' interpolated statistics.

    For each repaired module's output channel ``q`` (see the module docstring): targets
    ``mu*_q = sum_k w_k mu_{k,q}`` and ``sigma*_q = sum_k w_k sigma_{k,q}`` from the aligned
    parents' outputs on ``inputs``; the fused module's output becomes
    ``(sigma*_q / sigma_q) (y_q - mu_q) + mu*_q`` (REPAIR) or ``(sigma*_q / sigma_q) y_q``
    (RESCALE), folded into its kernel (or norm scale) and bias. Composable with every
    method: the parents are whatever was averaged, in the fused network's neuron order.
    Pure and traceable (``jax.jit`` of a fuse-then-repair step works); one XLA program.

    Args:
      fused: the fused pytree (linen variables or an ``nnx.State``).
      parents: the parents aligned onto the fused network's neurons: a
        :class:`jfusion.Alignment` (from :func:`jfusion.align`), its ``aligned`` pytree
        stacked on K, or a list of K pytrees (e.g. the raw models, for vanilla averaging).
      spec: the layer topology.
      inputs: the batch the statistics are measured on (a few hundred training inputs).
      model: the linen module, or the nnx ``Module`` / ``GraphDef``, that applies them
        (statistics come from its modules' outputs, as with ``ByActivations.from_module(model, points=...)``).
      model_weights: the weights ``w_k`` the targets interpolate with (uniform by default);
        those the parents were fused with.
      mode: ``"repair"`` (mean and std) or ``"rescale"`` (std only: no bias needed).
      points: ``{group: module path or paths}`` to repair (only those groups). By default
        every group, at its normalisations (BatchNorm, LayerNorm) when it has any, else at
        every module writing it.
      passes: sweeps over the repaired modules (one is exact for a feed-forward network;
        more settle a module called several times).
      apply_kwargs: keyword arguments of the forward pass (linen ``apply``, e.g.
        ``train=False``; nnx: ``train`` sets the mode, the others go to ``__call__``).

    Returns:
      A :class:`Repair`: the repaired ``params`` and, per module, the ``scales`` and
      ``shifts`` applied and the ``target_mean`` and ``target_std``.

    Examples:
      A network whose hidden channels were scaled and shifted (nothing compensating) is
      repaired back to the network its parents are:

      >>> import jax, jax.numpy as jnp, jfusion
      >>> from jfusion.models import MLP, mlp_spec
      >>> model, spec = MLP((8, 3)), mlp_spec(2)
      >>> x = jax.random.normal(jax.random.key(1), (64, 4))
      >>> params = model.init(jax.random.key(0), x)
      >>> dense = params["params"]["Dense_0"]
      >>> broken = {"params": {**params["params"], "Dense_0": {"kernel": 3.0 * dense["kernel"], "bias": dense["bias"] + 1.0}}}
      >>> repaired = jfusion.repair(broken, [params, params], spec, x, model=model)
      >>> bool(jnp.allclose(repaired.params["params"]["Dense_0"]["kernel"], dense["kernel"], atol=1e-5))
      True

    References:
      - Keller Jordan, Hanie Sedghi, Olga Saukh, Rahim Entezari and Behnam Neyshabur.
        *REPAIR: REnormalizing Permuted Activations for Interpolation Repair.* ICLR 2023.
    """
    if mode not in ("repair", "rescale"):
        raise ValueError(f"mode must be 'repair' or 'rescale', not {mode!r}")
    if not isinstance(passes, int) or isinstance(passes, bool) or passes < 1:
        raise ValueError(f"passes must be an int >= 1, not {passes!r}")
    if isinstance(spec, Mapping):
        spec = Spec(spec)
    fused_leaves, treedef = flatten(fused)
    stack = ModelStack(parents.aligned if isinstance(parents, Alignment) else parents, "parents")
    if stack.stacked is None:
        raise FusionInputError("repair needs parents aligned onto the fused network's neurons: these differ in widths")
    widths = spec.validate({p: np.shape(x) for p, x in fused_leaves.items()}, "fused")
    if stack.treedef != treedef:
        raise FusionInputError(f"parents and fused have different trees: {first_difference(unflatten(stack.treedef, stack.model(0)), fused)}")
    for path, x in fused_leaves.items():
        if np.shape(x) != np.shape(stack.stacked[path])[1:]:
            raise FusionInputError(
                f"parents: {path} has shape {np.shape(stack.stacked[path])[1:]} but the fused network's is "
                f"{np.shape(x)} (widths {widths}); align the parents onto the fused network first"
            )
    chosen = _repair_points(spec, points)
    units = _units(spec, chosen, running_statistics(fused), mode == "repair")
    activations = ByActivations.from_module(
        model, points={u.module: u.module for u in units}, **dict(apply_kwargs or {})
    ).fn
    weights = normalised_weights(model_weights, stack.num_models)
    leaves = {p: jnp.asarray(x) for p, x in fused_leaves.items()}
    inputs = jnp.asarray(inputs)
    stages = _stages(units, _dependencies(units, activations, treedef, leaves, inputs))
    config = _RepairConfig(units, activations, treedef, mode == "repair", passes, stages)
    leaves, scales, shifts, mean, std = _repair_program(config, leaves, stack.stacked, inputs, weights)
    return Repair(unflatten(treedef, leaves), scales, shifts, mean, std)
