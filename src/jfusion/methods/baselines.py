"""The baselines fusion is measured against: vanilla averaging and prediction ensembles."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal, Sequence

import jax
import jax.numpy as jnp

from jfusion.core.align import prepare, run
from jfusion.core.combine import model_weights as normalised_weights
from jfusion.core.errors import FusionInputError
from jfusion.core.spec import Spec
from jfusion.core.tree import ModelStack, PyTree, unflatten
from jfusion.methods.fuse import Fusion


@dataclasses.dataclass(frozen=True)
class IdentityPlans:
    """Vanilla averaging's producer: neuron p of every model is neuron p of the fused model."""

    def output_width(self, group: str, reference_width: int) -> int:
        return reference_width

    def reference_plan(self, group: str, support: jax.Array) -> None:
        return None

    def plan(self, group: str, support: jax.Array, reference_support: jax.Array, model: jax.Array) -> None:
        return None

    def head_plans(self, name: str, supports, reference_supports, model: jax.Array) -> None:
        return None

    def coverage(self, group: str, received: jax.Array) -> jax.Array:
        return jnp.ones_like(received)


def vanilla_average(
    params_list: PyTree | Sequence[PyTree],
    spec: Spec | None = None,
    *,
    model_weights: jax.Array | Sequence[float] | None = None,
) -> Fusion:
    """Element-wise weighted average ``sum_k w_k W_k`` without alignment (FedAvg's aggregation).

    Needs equal shapes; ``params_list`` is a list of pytrees or one stacked along axis 0.
    ``spec`` is optional (the plans are identities whatever the groups); without one every
    leaf is treated as ungrouped.

    Examples:
      >>> import jax, jax.numpy as jnp, jfusion
      >>> from jfusion.models import MLP, mlp_spec
      >>> model, x, spec = MLP((8, 3)), jnp.ones((1, 4)), mlp_spec(2)  # 4 -> 8 (group h0) -> 3
      >>> params = model.init(jax.random.key(0), x)
      >>> other = model.init(jax.random.key(1), x)
      >>> average = jfusion.vanilla_average([params, other], model_weights=[3, 1]).params
      >>> expected = 0.75 * params["params"]["Dense_1"]["bias"] + 0.25 * other["params"]["Dense_1"]["bias"]
      >>> bool(jnp.allclose(average["params"]["Dense_1"]["bias"], expected))
      True

    References:
      - Brendan McMahan, Eider Moore, Daniel Ramage, Seth Hampson and Blaise Agüera y Arcas.
        *Communication-Efficient Learning of Deep Networks from Decentralized Data.*
        AISTATS 2017 (FedAvg).
    """
    models = ModelStack(params_list)
    shapes = [models.shapes(k) for k in range(models.num_models)]
    differing = [p for p in shapes[0] if any(s[p] != shapes[0][p] for s in shapes)]
    if differing:
        path = differing[0]
        k = next(k for k, s in enumerate(shapes) if s[path] != shapes[0][path])
        raise FusionInputError(
            f"vanilla averaging needs equal shapes: {path} is {shapes[0][path]} in model 0 but "
            f"{shapes[k][path]} in model {k}; use jfusion.fuse to combine different widths"
        )
    if spec is None:
        spec = Spec({p: (None,) * len(shape) for p, shape in models.shapes(0).items()})
    fused, out = run(prepare(params_list, spec, IdentityPlans(), matches=False), model_weights)
    return Fusion(fused, out.plans)


def ensemble_apply(
    apply_fn: Callable[[PyTree, Any], jax.Array],
    params_list: PyTree | Sequence[PyTree],
    x: Any,
    model_weights: jax.Array | Sequence[float] | None = None,
    *,
    average: Literal["logits", "probabilities"] = "logits",
) -> jax.Array:
    """Prediction ensemble: the weighted average of the K models' outputs on ``x``.

    ``average="probabilities"`` averages softmax outputs (and returns their log, so argmax
    and cross-entropy read it like logits); ``"logits"`` averages raw outputs, which is
    what a fully isolated partial fusion (alpha = 1) computes.
    """
    if average not in ("logits", "probabilities"):
        raise ValueError(f"average must be 'logits' or 'probabilities', not {average!r}")
    models = ModelStack(params_list)
    w = normalised_weights(model_weights, models.num_models)
    outputs = [apply_fn(unflatten(models.treedef, models.model(k)), x) for k in range(models.num_models)]
    if average == "probabilities":
        return jnp.log(sum(wk * jax.nn.softmax(o, axis=-1) for wk, o in zip(w, outputs)))
    return sum(wk * o for wk, o in zip(w, outputs))
