"""Ground metrics: the cost of sending neuron p of a model onto neuron q of the target.

``C[p, q] = d(x_p, y_q)`` between neuron supports (rows of ``x`` and ``y``). OTFusion
(Singh & Jaggi 2020, §4) uses the Euclidean distance; its code also offers squared and
cosine distances, normalising every support row, transforming the cost matrix
(``log(1 + C)``, its default, or dividing it by its max, mean or median) and clipping it.
All of these are options here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class GroundMetric:
    """Pairwise cost between two sets of neuron supports.

    Attributes:
      kind: ``"euclidean"`` ``||x - y||``, ``"sqeuclidean"`` ``||x - y||^2`` or
        ``"cosine"`` ``1 - <x, y> / (||x|| ||y||)``.
      normalize_supports: scale every support row to unit norm first (compares neurons by
        direction, not magnitude).
      normalize_cost: divide the cost matrix by its ``"max"``, ``"mean"`` or ``"median"``
        (only the scale changes, so exact plans are unaffected; it makes an absolute
        Sinkhorn epsilon meaningful), or ``"log"``: ``C <- log(1 + C)`` (``log1p``, OTFusion's
        default ``--ground-metric-normalize log``), a monotone but non-linear map that
        compresses large costs, so it can change exact plans as well as Sinkhorn's. None
        keeps raw costs.
      clip_min: clamp the (normalised) cost from below to ``clip_min`` (None: no bound),
        after ``normalize_cost`` as in OTFusion's ``--clip-gm``.
      clip_max: clamp it from above to ``clip_max`` (None: no bound). OTFusion states its
        bounds in units of the Sinkhorn regularisation (it clamps ``C`` to
        ``[reg * clip_min, reg * clip_max]``, defaults 0 and 5); here they are cost values,
        so pass ``clip_max=5 * epsilon`` with ``Sinkhorn(epsilon, relative_epsilon=None)``
        to reproduce it. Clipping above makes every pair farther than ``clip_max`` equally
        bad, so plans stop telling such pairs apart.
      identity_prior: ``lam >= 0``: a price on leaving the identity,
        ``C <- C + lam mean(C) (1 - I)``, for models that share an initialisation
        (federated rounds), whose neuron ``p`` starts as the target's neuron ``p``: a plan
        moves a neuron only where that gains more than ``lam`` times the mean cost. For
        ``n != m`` neurons, ``I`` is ``eye(n, m)``: neuron ``p`` of both keeps its index.
        Scaled by the mean cost, so it means the same for every group and support.
    """

    kind: Literal["euclidean", "sqeuclidean", "cosine"] = "euclidean"
    normalize_supports: bool = False
    normalize_cost: Literal["max", "mean", "median", "log"] | None = None
    clip_min: float | None = None
    clip_max: float | None = None
    identity_prior: float = 0.0

    def __post_init__(self):
        if self.kind not in ("euclidean", "sqeuclidean", "cosine"):
            raise ValueError(f"GroundMetric.kind must be euclidean, sqeuclidean or cosine, not {self.kind!r}")
        if self.normalize_cost not in (None, "max", "mean", "median", "log"):
            raise ValueError(
                f"GroundMetric.normalize_cost must be None, max, mean, median or log, not {self.normalize_cost!r}"
            )
        for name in ("clip_min", "clip_max"):
            bound = getattr(self, name)
            if bound is not None and (
                isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound)
            ):
                raise ValueError(f"GroundMetric.{name} must be None or a finite number, got {bound!r}")
        if self.clip_min is not None and self.clip_max is not None and self.clip_min > self.clip_max:
            raise ValueError(
                f"GroundMetric.clip_min={self.clip_min} is larger than clip_max={self.clip_max}: "
                f"the clipped cost would be empty"
            )
        if not (isinstance(self.identity_prior, (int, float)) and 0.0 <= self.identity_prior < float("inf")):
            raise ValueError(f"GroundMetric.identity_prior must be a finite number >= 0, not {self.identity_prior!r}")

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        """Cost matrix ``(n, m)`` between supports ``x (n, d)`` and ``y (m, d)``."""
        x = x.astype(jnp.float32)
        y = y.astype(jnp.float32)
        if self.normalize_supports or self.kind == "cosine":
            x = x / jnp.maximum(jnp.linalg.norm(x, axis=1, keepdims=True), 1e-12)
            y = y / jnp.maximum(jnp.linalg.norm(y, axis=1, keepdims=True), 1e-12)
            scale = jnp.float32(1.0)
        else:
            # Distances are homogeneous: computed on supports scaled to at most 1 and scaled
            # back, the squares stay inside float32 for weights from 1e-19 to 1e19.
            scale = jnp.maximum(jnp.maximum(jnp.max(jnp.abs(x)), jnp.max(jnp.abs(y))), 1e-30)
            scale = jnp.where(jnp.isfinite(scale), scale, 1.0)
            x, y = x / scale, y / scale
        cross = jnp.matmul(x, y.T, precision=_HIGHEST)
        if self.kind == "cosine":
            cost = 1.0 - cross
        else:
            sq = jnp.sum(x * x, axis=1)[:, None] + jnp.sum(y * y, axis=1)[None, :] - 2.0 * cross
            sq = jnp.maximum(sq, 0.0)
            cost = sq * scale**2 if self.kind == "sqeuclidean" else jnp.sqrt(sq) * scale
        if self.normalize_cost == "max":
            cost = cost / jnp.maximum(jnp.max(cost), 1e-30)
        elif self.normalize_cost == "mean":
            cost = cost / jnp.maximum(jnp.mean(cost), 1e-30)
        elif self.normalize_cost == "median":
            cost = cost / jnp.maximum(jnp.median(cost), 1e-30)
        elif self.normalize_cost == "log":
            cost = jnp.log1p(cost)
        if self.clip_min is not None or self.clip_max is not None:
            cost = jnp.clip(cost, self.clip_min, self.clip_max)
        if self.identity_prior:
            off_identity = 1.0 - jnp.eye(*cost.shape, dtype=cost.dtype)
            cost = cost + self.identity_prior * jnp.mean(cost) * off_identity
        return cost


def resolve_metric(metric: str | GroundMetric) -> GroundMetric:
    """A ground metric from a :class:`GroundMetric` or its kind (``"euclidean"``, ``"cosine"``...)."""
    if isinstance(metric, str):
        return GroundMetric(metric)
    if not isinstance(metric, GroundMetric):
        raise TypeError(
            f"metric must be 'euclidean', 'sqeuclidean', 'cosine' or a jfusion.GroundMetric, "
            f"not {type(metric).__name__}"
        )
    return metric
