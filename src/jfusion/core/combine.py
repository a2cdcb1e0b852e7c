"""Combine: the weighted average of the K aligned models, slot by slot.

``W_F = sum_k Lambda_k ⊙ W~_k``, where ``W~_k`` is model k transported by its plans and
``Lambda_k[q]`` the weight of model k in fused slot q, read on each leaf's output group. For
OT fusion ``Lambda_k = w_k`` (OTFusion eq. 3 and its K-model extension); a slot only some
models fill (a partial fusion's isolated neuron) averages those alone.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jfusion.core.errors import FusionInputError
from jfusion.core.spec import Spec

_HIGHEST = jax.lax.Precision.HIGHEST


def model_weights(weights: jax.Array | Sequence[float] | None, num_models: int) -> jax.Array:
    """Model weights ``w_k`` normalised to sum to one (uniform when None); checked when concrete."""
    if weights is None:
        return jnp.full((num_models,), 1.0 / num_models, jnp.float32)
    if isinstance(weights, str) or (
        isinstance(weights, (list, tuple)) and any(isinstance(w, (str, bytes)) for w in weights)
    ):
        raise FusionInputError(f"model_weights must be numbers, one per model; got {weights!r}")
    try:
        w = jnp.asarray(weights, jnp.float32)
    except (TypeError, ValueError) as err:
        raise FusionInputError(f"model_weights must be numbers, one per model; got {weights!r} ({err})") from None
    if w.shape != (num_models,):
        raise FusionInputError(f"model_weights has shape {w.shape}; expected ({num_models},), one per model")
    if not isinstance(w, jax.core.Tracer):
        values = np.asarray(w, np.float64)
        if not np.isfinite(values).all() or (values < 0).any() or values.sum() <= 0:
            raise FusionInputError(
                f"model_weights must be finite, non-negative and not all zero; got {values.tolist()}"
            )
    return _sum_to_one(w)


@jax.jit  # one small program, not five eager ones, per call outside a trace
def _sum_to_one(w: jax.Array) -> jax.Array:
    # Scale by a power of two first (exact), so the sum of weights near float32's maximum
    # cannot overflow; XLA divides by multiplying with the reciprocal, which would flush.
    w = jnp.ldexp(w, -jnp.frexp(jnp.max(w))[1])
    return w / jnp.sum(w)


def slot_weights(coverage: jax.Array, weights: jax.Array) -> jax.Array:
    """Per-model weight of every fused slot: ``Lambda_k[q] = w_k c_k[q] / sum_j w_j c_j[q]``.

    ``coverage (K, m)`` is the share of slot q each model fills. In OT fusion every model
    fills every slot, so ``Lambda_k = w_k``; a slot only some models fill (a partial
    fusion's isolated neuron) averages those alone, so an isolated neuron keeps weight 1.
    """
    share = weights[:, None] * coverage
    total = jnp.sum(share, axis=0, keepdims=True)
    return share / jnp.where(total > 0, total, 1.0)


def combine(
    spec: Spec,
    aligned: Mapping[str, jax.Array],
    lambdas: Mapping[str, jax.Array],
    weights: jax.Array,
    dtypes: Mapping[str, jnp.dtype],
    reference_leaves: Mapping[str, jax.Array],
) -> dict[str, jax.Array]:
    """``sum_k Lambda_k ⊙ aligned_k`` per leaf, in the reference's dtypes.

    Args:
      spec: the layer topology.
      aligned: every leaf of the K aligned models, stacked on a leading K axis (they share
        the fused model's shapes).
      lambdas: ``{group: (K, m)}`` slot weights (:func:`slot_weights`).
      weights: the model weights ``(K,)``, for leaves with no output group.
      dtypes: the fused leaves' dtypes (the reference's).
      reference_leaves: the reference's leaves; a leaf that is not floating point (a step
        counter, a mask, a PRNG key) cannot be averaged and keeps the reference's value.
    """
    fused = {}
    for leaf in spec.leaves:
        path, x = leaf.path, aligned[leaf.path]
        if not jnp.issubdtype(dtypes[path], jnp.inexact):
            fused[path] = reference_leaves[path]
            continue
        group = leaf.output_group
        if group is None:
            out = jnp.tensordot(weights, x.astype(jnp.float32), axes=1, precision=_HIGHEST)
        else:
            lam = lambdas[group]
            # The output group is the leaf's last view dim, the fastest-varying in C order.
            view = x.astype(jnp.float32).reshape(x.shape[0], -1, lam.shape[1])
            out = jnp.einsum("km,kim->im", lam, view, precision=_HIGHEST).reshape(x.shape[1:])
        fused[path] = out.astype(dtypes[path])
    return fused
