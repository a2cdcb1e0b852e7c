"""The baselines fusion is measured against: vanilla averaging and prediction ensembles."""

from __future__ import annotations

from typing import Any, Callable, Literal, Sequence

import jax
import jax.numpy as jnp

from jfusion.core.errors import FusionInputError
from jfusion.methods.fuse import model_weights, weighted_sum
from jfusion.core.tree import ModelStack, PyTree, unflatten


def vanilla_average(
    params_list: PyTree | Sequence[PyTree], weights: jax.Array | Sequence[float] | None = None
) -> PyTree:
    """Element-wise weighted average ``sum_k w_k W_k`` without alignment (FedAvg's aggregation).

    Needs equal shapes; ``params_list`` is a list of pytrees or one stacked along axis 0.
    """
    models = ModelStack(params_list)
    if models.stacked is None:
        shapes = [models.shapes(k) for k in range(models.num_models)]
        path = next(p for p in shapes[0] if any(s[p] != shapes[0][p] for s in shapes))
        k = next(k for k, s in enumerate(shapes) if s[path] != shapes[0][path])
        raise FusionInputError(
            f"vanilla averaging needs equal shapes: {path} is {shapes[0][path]} in model 0 but "
            f"{shapes[k][path]} in model {k}; use jfusion.fuse to combine different widths"
        )
    w = model_weights(weights, models.num_models)
    return unflatten(models.treedef, weighted_sum(models.stacked, w, models.dtypes))


def ensemble_apply(
    apply_fn: Callable[[PyTree, Any], jax.Array],
    params_list: PyTree | Sequence[PyTree],
    x: Any,
    weights: jax.Array | Sequence[float] | None = None,
    *,
    average: Literal["logits", "probabilities"] = "logits",
) -> jax.Array:
    """Prediction ensemble: the weighted average of the K models' outputs on ``x``.

    ``average="probabilities"`` averages softmax outputs (and returns their log, so argmax
    and cross-entropy read it like logits); ``"logits"`` averages raw outputs, which is
    what a fully isolated partial fusion (alpha = 1) computes.
    """
    models = ModelStack(params_list)
    w = model_weights(weights, models.num_models)
    outputs = [apply_fn(unflatten(models.treedef, models.model(k)), x) for k in range(models.num_models)]
    if average == "probabilities":
        probs = sum(wk * jax.nn.softmax(o, axis=-1) for wk, o in zip(w, outputs))
        return jnp.log(probs)
    if average != "logits":
        raise ValueError(f"average must be 'logits' or 'probabilities', not {average!r}")
    return sum(wk * o for wk, o in zip(w, outputs))
