"""Weight matching (Git Re-Basin, Algorithm 1): every group's permutation by coordinate descent.

For a reference ``A`` and a model ``B`` of the same widths, weight matching looks for one
permutation ``P_g`` per group maximising the inner product of the reference with the
permuted model, summed over every leaf ``L``::

    max_P  sum_L < A_L, B_L permuted by P_g on every axis carrying group g >

(for a Dense kernel between groups ``g`` and ``h``, ``<W_A, P_g W_B P_h^T>``; for a
recurrent kernel, ``<H_A, P_g H_B P_g^T>``). The problem is NP-hard in general; Ainsworth
et al.'s Algorithm 1 solves it for one group at a time with the others fixed. Fixing every
``P_h`` (h != g), the objective is linear in ``P_g``::

    S_g[i, j] = sum_{(L, d): axis d of L carries g}  < A_L[i along d],  B_L'[j along d] >

where ``B_L'`` is ``B_L`` permuted on all its other group axes (a recurrent leaf's other
axis by the current ``P_g``, which linearises ``P W P^T`` there). ``P_g`` is then the
linear assignment maximising ``sum_i S_g[i, sigma(i)]`` (an exact solver on the cost
``-S_g``), kept when it raises the objective: for a recurrent group the objective itself is
evaluated, since the linearisation's optimum need not raise it (and steps by it alone can
cycle). Each iteration visits the groups in a fresh random order; it stops when an
iteration changes no permutation or at the iteration cap.

Unlike OTFusion's forward pass (:class:`jfusion.ByWeights`), every group is compared by all
the leaves it touches -- its incoming and outgoing weights -- so a residual stream, whose
writers are few and whose readers are many, is matched by all of them.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jfusion.core.costs import GroundMetric
from jfusion.core.errors import ConvergenceWarning, FusionInputError
from jfusion.core.plans import BalancedPlans, uniform
from jfusion.core.solvers import Exact, OTResult
from jfusion.core.spec import LeafSpec, Spec

_HIGHEST = jax.lax.Precision.HIGHEST
Widths = tuple[tuple[str, int], ...]


@dataclasses.dataclass(frozen=True)
class WeightMatching:
    """Align by weight matching: all groups' permutations by coordinate descent (Git Re-Basin).

    Maximises ``sum_L <W_L^ref, W_L^k permuted on every grouped axis>`` over one
    permutation per group, for each model ``k`` against the reference (see
    :mod:`jfusion.core.matching` for the maths). Iteration ``t`` visits every group once,
    in a random order drawn from ``fold_in(key(seed), t)``; a group's permutation is the
    linear assignment of its similarity under the other groups' current permutations,
    kept only when it raises that similarity by more than ``tolerance`` times its current
    value. Matching stops after an iteration that changes nothing (``converged``) or after
    ``max_iterations``; each group's :class:`jfusion.OTResult` reports the iteration
    count, the convergence, and as ``cost`` ``<-S_g, plan>`` at the group's last visit
    (for a recurrent group, minus its leaves' objective over ``n``), which is at the final
    permutations once converged (the last iteration changed nothing).

    Runs inside the fused program: a ``lax.while_loop`` over iterations, vectorised over
    the K models (every model runs until all have converged; the count is each model's
    own). Needs an exact solver (each step is an assignment; ``solver="exact"``, the
    default) and models of the reference's widths; :func:`jfusion.fuse`,
    :func:`jfusion.align` and :func:`jfusion.barycenter_fuse` take it.

    Attributes:
      max_iterations: the cap on iterations (passes over all groups), >= 1.
      seed: the seed of the groups' random visiting order.
      tolerance: the relative gain below which a group's permutation is kept, >= 0.
      exclude: leaf paths (or path prefixes ending a path segment, e.g. ``"params/head"``)
        left out of the objective; they are still transported. Running statistics
        (:func:`jfusion.running_statistics`: linen ``batch_stats``, nnx ``BatchStat``) are
        data moments, not weights, and are always left out, as from weight supports.

    Examples:
      >>> import jax, jax.numpy as jnp, jfusion
      >>> from jfusion.models import MLP, mlp_spec
      >>> model, x, spec = MLP((16, 16, 3)), jnp.ones((1, 4)), mlp_spec(3)  # 4 -> 16 -> 16 -> 3
      >>> params = model.init(jax.random.key(0), x)
      >>> shuffled, _ = jfusion.permute(params, spec, jax.random.key(1))
      >>> result = jfusion.fuse([params, shuffled], spec, alignment=jfusion.WeightMatching())
      >>> bool(jnp.allclose(result.params["params"]["Dense_1"]["kernel"], params["params"]["Dense_1"]["kernel"], atol=1e-6))
      True
      >>> plans = result.plans["h0"]  # model 1 took iterations[1] passes, the last changing nothing
      >>> bool(plans.converged.all()), int(plans.iterations[0]), int(plans.iterations[1]) >= 2  # the target: none
      (True, 0, True)

    References:
      - Samuel K. Ainsworth, Jonathan Hayase and Siddhartha Srinivasa. *Git Re-Basin: Merging
        Models modulo Permutation Symmetries.* ICLR 2023 (Algorithm 1, weight matching).
    """

    max_iterations: int = 100
    seed: int = 0
    tolerance: float = 1e-6
    exclude: tuple[str, ...] = ()

    def __post_init__(self):
        cap = self.max_iterations
        if isinstance(cap, bool) or not isinstance(cap, (int, np.integer)) or cap < 1:
            raise ValueError(f"WeightMatching.max_iterations must be an int >= 1, got {cap!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise ValueError(f"WeightMatching.seed must be an int, got {self.seed!r}")
        if not (isinstance(self.tolerance, (int, float)) and math.isfinite(self.tolerance) and self.tolerance >= 0):
            raise ValueError(f"WeightMatching.tolerance must be a finite number >= 0, got {self.tolerance!r}")
        exclude = (self.exclude,) if isinstance(self.exclude, str) else tuple(self.exclude)
        if not all(isinstance(p, str) and p for p in exclude):
            raise ValueError(f"WeightMatching.exclude must be leaf paths or path prefixes (strings), got {self.exclude!r}")
        object.__setattr__(self, "exclude", exclude)

    def excludes(self, path: str) -> bool:
        """Whether leaf ``path`` is left out of the objective."""
        return any(_under(path, prefix) for prefix in self.exclude)

    def check(
        self,
        spec: Spec,
        producer: object,
        model_widths: Sequence[Widths],
        reference_widths: Widths,
        stacked: bool,
        statistics: frozenset[str] = frozenset(),
    ) -> None:
        """Refuse, with the reason and what to pass instead, what weight matching cannot do."""
        if not isinstance(producer, BalancedPlans):
            raise FusionInputError(
                f"WeightMatching finds one permutation per group between equal widths, which "
                f"{type(producer).__name__} does not use (partial fusion and pruning build their "
                f"plans from supports): use jfusion.fuse, jfusion.align or jfusion.barycenter_fuse, "
                f"or alignment=jfusion.ByWeights(outgoing=True, sweeps=2) here"
            )
        if not isinstance(producer.solver, Exact):
            raise FusionInputError(
                f"WeightMatching solves every group as a linear assignment, which needs an exact "
                f"solver, not {producer.solver!r}: pass solver='exact' (or jfusion.Exact(...))"
            )
        if producer.metric != GroundMetric():
            raise FusionInputError(
                f"WeightMatching maximises inner products of weights; it takes no ground metric "
                f"(got {producer.metric!r}): leave metric at its default"
            )
        reference = dict(reference_widths)
        for k, widths in enumerate(model_widths):
            for group, n in widths:
                if n != reference[group]:
                    raise FusionInputError(
                        f"group {group!r}: model {k} has {n} neurons but the target {reference[group]}; "
                        f"WeightMatching permutes neurons, so every model needs the target's widths: "
                        f"use alignment=jfusion.ByWeights() to fuse models of other widths"
                    )
        if not stacked:
            raise FusionInputError("WeightMatching aligns models stacked on a leading K axis; they were given apart")
        for prefix in self.exclude:
            if not any(_under(leaf.path, prefix) for leaf in spec.leaves):
                raise FusionInputError(
                    f"WeightMatching.exclude: {prefix!r} is no leaf path nor a prefix of one; "
                    f"the spec's leaves are {list(spec.paths)[:6]}{' ...' if len(spec.paths) > 6 else ''}"
                )
        for group in spec.groups:
            if not _touches(spec, self, group, statistics):
                raise FusionInputError(
                    f"group {group!r}: every leaf carrying it {[l.path for l in spec.leaves_of(group)]} "
                    f"is excluded from weight matching's objective, so nothing decides its permutation"
                )

    def plans(
        self,
        spec: Spec,
        solver: Exact,
        models: Mapping[str, jax.Array],
        reference: Mapping[str, jax.Array],
        widths: Mapping[str, int],
        statistics: frozenset[str] = frozenset(),
    ) -> dict[str, OTResult]:
        """Every group's plan ``P / n`` for each of the models stacked on K, onto ``reference``.

        ``models`` are ``{path: (K, ...)}``, ``reference`` is ``{path: (...)}``, both with
        group widths ``widths``; ``statistics`` are the running statistics' paths, left out
        of the objective. Traceable; the fields of every result have a leading K axis.
        """
        groups = spec.groups
        touched = {g: _touches(spec, self, g, statistics) for g in groups}
        paths = sorted({leaf.path for g in groups for leaf, _ in touched[g]})
        ref_views = {p: _view(reference[p], spec[p], widths) for p in paths}
        views = {p: jax.vmap(lambda x, leaf=spec[p]: _view(x, leaf, widths))(models[p]) for p in paths}
        num = next(iter(views.values())).shape[0]

        def step(index, group, src, values, changed):
            perms = dict(zip(groups, src))
            s = jax.vmap(lambda v, p: _similarity(touched[group], ref_views, v, p, widths[group]))(views, perms)
            n = widths[group]
            # Cost rows are the model's neurons, columns the reference's: C[j, i] = -S[i, j].
            result = jax.vmap(lambda c: solver(c, uniform(n), uniform(n)))(-jnp.swapaxes(s, 1, 2))
            proposed = jnp.argmax(result.plan, axis=1).astype(jnp.int32)  # ref i <- model neuron proposed[i]
            current = src[index]
            if _is_recurrent(group, touched[group]):
                # S is linear in P_g only with P_g fixed on the leaves' other g axes: judge the
                # proposal by the objective itself, so every accepted step raises it (no cycles).
                leaves = tuple(dict.fromkeys(leaf for leaf, _ in touched[group]))
                old, new = (
                    jax.vmap(lambda v, p: _objective(leaves, ref_views, v, p))(views, {**perms, group: perm})
                    for perm in (current, proposed)
                )
            else:
                old, new = _matched(s, current), _matched(s, proposed)
            better = (new - old > self.tolerance * jnp.abs(old)) & jnp.any(proposed != current, axis=1)
            src = _replaced(src, index, jnp.where(better[:, None], proposed, current))
            values = _replaced(values, index, jnp.where(better, new, old))
            return src, values, changed | better

        branches = [
            (lambda state, i=i, g=g: step(i, g, *state)) for i, g in enumerate(groups)
        ]
        key = jax.random.key(self.seed)

        def one_iteration(state):
            t, src, values, done, iterations = state
            order = jax.random.permutation(jax.random.fold_in(key, t), len(groups))
            src, values, changed = jax.lax.fori_loop(
                0, len(groups), lambda i, s: jax.lax.switch(order[i], branches, s), (src, values, jnp.zeros((num,), bool))
            )
            iterations = jnp.where(done, iterations, t + 1)
            return t + 1, src, values, done | ~changed, iterations

        def going(state):
            t, *_, done, _ = state
            return (t < self.max_iterations) & ~jnp.all(done)

        identity = tuple(jnp.broadcast_to(jnp.arange(widths[g], dtype=jnp.int32), (num, widths[g])) for g in groups)
        values = tuple(jnp.zeros((num,), jnp.float32) for _ in groups)
        start = (jnp.int32(0), identity, values, jnp.zeros((num,), bool), jnp.zeros((num,), jnp.int32))
        _, src, values, done, iterations = jax.lax.while_loop(going, one_iteration, start)
        results = {}
        for group, perm, value in zip(groups, src, values):
            n = widths[group]
            plan = jnp.swapaxes(jax.nn.one_hot(perm, n, dtype=jnp.float32), 1, 2) / n  # [model j, ref i]
            results[group] = OTResult(plan, -value / n, done, iterations)
        return results


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


def _touches(
    spec: Spec, matching: WeightMatching, group: str, statistics: frozenset[str]
) -> tuple[tuple[LeafSpec, int], ...]:
    """``(leaf, view dim)`` for every dim carrying ``group`` of a leaf in the objective."""
    return tuple(
        (leaf, dim)
        for leaf in spec.leaves_of(group)
        if not matching.excludes(leaf.path) and leaf.path not in statistics
        for dim, g in enumerate(leaf.dim_groups)
        if g == group
    )


def _view(x: jax.Array, leaf: LeafSpec, widths: Mapping[str, int]) -> jax.Array:
    return x.astype(jnp.float32).reshape(leaf.view_shape(x.shape, widths))


def _is_recurrent(group: str, touched) -> bool:
    """Whether a leaf carries ``group`` on two dims (a recurrent kernel ``(g, g)``)."""
    return any(leaf.dim_groups.count(group) > 1 for leaf, _ in touched)


def _objective(leaves, ref_views, views, src) -> jax.Array:
    """``sum_L <A_L, B_L permuted on every grouped dim>`` over ``leaves``."""
    return sum(jnp.vdot(ref_views[leaf.path], _permuted(views[leaf.path], leaf, src), precision=_HIGHEST) for leaf in leaves)


def _permuted(v: jax.Array, leaf: LeafSpec, src: Mapping[str, jax.Array], skip: int | None = None) -> jax.Array:
    """``v`` with every grouped dim but ``skip`` reordered: new index ``i`` is old ``src[g][i]``."""
    for dim, g in enumerate(leaf.dim_groups):
        if g is not None and dim != skip:
            v = jnp.take(v, src[g], axis=dim)
    return v


def _similarity(touched, ref_views, views, src, n: int) -> jax.Array:
    """``S[i, j]``: reference neuron ``i`` against model neuron ``j``, summed over ``touched``."""
    s = jnp.zeros((n, n), jnp.float32)
    for leaf, dim in touched:
        a = jnp.moveaxis(ref_views[leaf.path], dim, 0).reshape(n, -1)
        b = jnp.moveaxis(_permuted(views[leaf.path], leaf, src, dim), dim, 0).reshape(n, -1)
        s = s + jnp.matmul(a, b.T, precision=_HIGHEST)
    return s


def _replaced(items: tuple, index: int, item) -> tuple:
    return items[:index] + (item,) + items[index + 1 :]


def _matched(s: jax.Array, src: jax.Array) -> jax.Array:
    """``(K,)``: ``sum_i S[k, i, src[k, i]]``, the similarity of the matching ``src``."""
    return jnp.take_along_axis(s, src[:, :, None], axis=2)[:, :, 0].sum(axis=1)


def warn_capped(plans: Mapping[str, OTResult], matching: WeightMatching, stacklevel: int) -> None:
    """One :class:`jfusion.ConvergenceWarning` for the models whose matching hit the cap."""
    first = next(iter(plans.values()))
    if isinstance(first.converged, jax.core.Tracer):
        return
    bad = np.flatnonzero(~np.atleast_1d(np.asarray(first.converged))).tolist()
    if bad:
        warnings.warn(
            f"weight matching stopped at max_iterations={matching.max_iterations} for models {bad} "
            f"while permutations were still changing; raise WeightMatching(max_iterations=...)",
            ConvergenceWarning,
            stacklevel=stacklevel,
        )
