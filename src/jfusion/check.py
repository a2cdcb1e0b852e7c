"""Planted truths: permute a network's neurons group by group, and check a Spec with it.

Permuting the neurons of a group -- every axis that carries it, consistently -- does not
change the function a network computes. If a spec is right, any such permutation leaves the
outputs unchanged; a wrong spec (a shortcut given its own group, a flatten labelled without
its view) changes them. Wrong specs are the most common failure of fusion code.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jfusion.core.errors import SpecError
from jfusion.core.spec import Spec
from jfusion.core.transport import permute_groups
from jfusion.core.tree import PyTree, flatten, unflatten


def permute(
    params: PyTree,
    spec: Spec,
    key: jax.Array,
    groups: tuple[str, ...] | None = None,
) -> tuple[PyTree, dict[str, jax.Array]]:
    """Apply a random permutation to each group's neurons (all groups, or ``groups``).

    Returns the permuted pytree and ``{group: perm}``, where new neuron ``q`` is old neuron
    ``perm[q]``; the network computes the same function.

    Structured groups (:class:`jfusion.Heads`) are permuted as attention allows: a ``Heads``
    name in ``groups`` draws a permutation ``pi`` of its heads (returned under that name),
    shared by all its members; a member group draws one permutation ``s_h`` of the dims
    inside each head. The member's flat permutation (its width is ``H * hd``) is then
    ``perm[q hd + j] = pi[q] hd + s_q[j]`` (identities for what is not drawn).

    Examples:
      >>> import jax, jax.numpy as jnp, jfusion
      >>> from jfusion.models import MLP, mlp_spec
      >>> model, x, spec = MLP((8, 3)), jnp.ones((1, 4)), mlp_spec(2)  # 4 -> 8 (group h0) -> 3
      >>> params = model.init(jax.random.key(0), x)
      >>> shuffled, perms = jfusion.permute(params, spec, jax.random.key(1))
      >>> sorted(perms), perms["h0"].shape
      (['h0'], (8,))
      >>> bool(jnp.allclose(model.apply(shuffled, x), model.apply(params, x), atol=1e-6))
      True

    References:
      - Sidak Pal Singh and Martin Jaggi. *Model Fusion via Optimal Transport.* NeurIPS 2020.
    """
    leaves, treedef = flatten(params)
    widths = spec.validate({p: np.shape(x) for p, x in leaves.items()}, "params")
    heads = dict(spec.heads)
    chosen = spec.groups + tuple(heads) if groups is None else groups
    members = {g: name for name, gs in heads.items() for g in gs}
    drawn = dict(zip(chosen, jax.random.split(key, len(chosen))))
    perms = {name: jax.random.permutation(drawn[name], widths[name]) for name in heads if name in drawn}
    for g in spec.groups:
        if g not in members:
            if g in drawn:
                perms[g] = jax.random.permutation(drawn[g], widths[g])
            continue
        name = members[g]
        if g not in drawn and name not in drawn:
            continue
        count = widths[name]
        size = widths[g] // count
        order = perms.get(name, jnp.arange(count))
        inside = (
            jax.vmap(lambda k: jax.random.permutation(k, size))(jax.random.split(drawn[g], count))
            if g in drawn
            else jnp.broadcast_to(jnp.arange(size), (count, size))
        )
        perms[g] = (order[:, None] * size + inside).reshape(-1)
    leaves = {p: jnp.asarray(x) for p, x in leaves.items()}
    moved = permute_groups(leaves, spec, {g: p for g, p in perms.items() if g not in heads}, widths)
    return unflatten(treedef, moved), perms


def _max_difference(a: PyTree, b: PyTree) -> float:
    diffs = jax.tree.map(lambda x, y: jnp.max(jnp.abs(jnp.asarray(x) - jnp.asarray(y))), a, b)
    return float(max(jax.tree.leaves(diffs), default=0.0))


def _scale(a: PyTree) -> float:
    return float(max((jnp.max(jnp.abs(jnp.asarray(x))) for x in jax.tree.leaves(a)), default=0.0))


def perturb_constant_leaves(variables: PyTree, key: jax.Array) -> PyTree:
    """Make every floating-point leaf whose entries are all equal vary (others are kept).

    Freshly initialised variables hide mistakes: a zero bias or a BatchNorm mean of 0, a
    variance or scale of 1 look the same under any permutation, so a wrong label on them
    cannot change the outputs. Positive constants (variances, scales) are multiplied by
    uniform factors in [0.5, 1.5], others get Gaussian noise of scale ``0.1 max(|c|, 1)``.
    """
    leaves, treedef = flatten(variables)
    out = {}
    for (path, x), k in zip(leaves.items(), jax.random.split(key, max(len(leaves), 1))):
        x = jnp.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.floating) or x.size < 2:
            out[path] = x
            continue
        values = np.asarray(x)  # on the host: no program compiled per leaf shape
        constant = values.reshape(-1)[0]
        if not (values == constant).all():
            out[path] = x
            continue
        if constant > 0:
            noisy = x * jax.random.uniform(k, x.shape, jnp.float32, 0.5, 1.5)
        else:
            noisy = x + 0.1 * jnp.maximum(jnp.abs(constant), 1.0) * jax.random.normal(k, x.shape)
        out[path] = noisy.astype(x.dtype)
    return unflatten(treedef, out)


def permutation_error(
    apply_fn: Callable[[PyTree, Any], Any], variables: PyTree, spec: Spec, x: Any, *, seed: int = 0, rtol: float = 1e-4
) -> tuple[PyTree, Any, float, float]:
    """How far one random permutation of every group moves the outputs: :func:`check_spec`'s test.

    Returns the variables with their constant leaves perturbed, their outputs, the
    tolerance (``rtol`` times the outputs' largest magnitude, at least ``rtol``) and the
    largest change of the outputs under :func:`permute` with ``seed``.
    """
    variables = perturb_constant_leaves(variables, jax.random.fold_in(jax.random.key(seed), 1))
    reference = apply_fn(variables, x)
    tolerance = rtol * max(_scale(reference), 1.0)
    permuted, _ = permute(variables, spec, jax.random.key(seed))
    return variables, reference, tolerance, _max_difference(reference, apply_fn(permuted, x))


def check_spec(
    apply_fn: Callable[[PyTree, Any], Any],
    variables: PyTree,
    spec: Spec,
    x: Any,
    *,
    seed: int = 0,
    rtol: float = 1e-4,
) -> None:
    """Raise SpecError unless random permutations of the spec's groups keep the outputs.

    Permutes all groups at once and compares ``apply_fn(variables, x)`` before and after
    (tolerance ``rtol`` times the outputs' largest magnitude). On a mismatch, each group (and
    each :class:`jfusion.Heads` name, its head order) is permuted alone to name the groups --
    and their leaves -- that break the function. The
    check runs on a copy of ``variables`` whose constant leaves were perturbed
    (:func:`jfusion.check.perturb_constant_leaves`), so it also sees through ``model.init`` output.

    Examples:
      A right spec returns None; one that leaves the hidden group off the second kernel's
      input axis is caught, and the message names the group and its leaves:

      >>> import jax, jax.numpy as jnp, jfusion
      >>> from jfusion.models import MLP, mlp_spec
      >>> model, x, spec = MLP((8, 3)), jnp.ones((1, 4)), mlp_spec(2)  # 4 -> 8 (group h0) -> 3
      >>> params = model.init(jax.random.key(0), x)
      >>> jfusion.check_spec(model.apply, params, spec, x)
      >>> wrong = jfusion.Spec({**spec.as_dict(), "params/Dense_0/kernel": (None, None)})
      >>> jfusion.check_spec(model.apply, params, wrong, x)
      Traceback (most recent call last):
        ...
      jfusion.core.errors.SpecError: the spec does not describe the model: ...

    References:
      - Samuel K. Ainsworth, Jonathan Hayase and Siddhartha Srinivasa. *Git Re-Basin: Merging
        Models modulo Permutation Symmetries.* ICLR 2023 (its permutation specs label
        parameter axes the way a Spec does).
    """
    variables, reference, tolerance, error = permutation_error(apply_fn, variables, spec, x, seed=seed, rtol=rtol)
    if error <= tolerance:
        return
    key = jax.random.key(seed)
    culprits = []
    units = spec.groups + tuple(name for name, _ in spec.heads)
    for group, k in zip(units, jax.random.split(key, len(units))):
        alone, perm = permute(variables, spec, k, groups=(group,))
        if bool(jnp.all(perm[group] == jnp.arange(perm[group].shape[0]))):
            continue
        group_error = _max_difference(reference, apply_fn(alone, x))
        if group_error > tolerance:
            of = dict(spec.heads).get(group, (group,))
            culprits.append(
                f"  group {group!r} (outputs change by {group_error:.3g}): its leaves "
                f"{list(dict.fromkeys(leaf.path for g in of for leaf in spec.leaves_of(g)))}"
            )
    detail = (
        "\n".join(culprits)
        if culprits
        else "  no single group breaks it alone; look at leaves that mix several groups"
    )
    raise SpecError(
        f"the spec does not describe the model: permuting its groups changed the outputs by "
        f"{error:.3g} (tolerance {tolerance:.3g}). Groups whose permutation alone changes "
        f"them -- a leaf there is labelled with the wrong group or misses a view:\n{detail}"
    )
