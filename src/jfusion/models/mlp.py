"""Multi-layer perceptrons (OTFusion's MLPNet is ``MLP((400, 200, 100, 10))``)."""

from __future__ import annotations

from typing import Mapping, Sequence

import flax.linen as nn
import jax

from jfusion.core.spec import Spec, dense
from jfusion.models.sow import record_activations
from jfusion.models.widths import check_groups


class MLP(nn.Module):
    """Dense layers ``Dense_0 ... Dense_{L-1}`` with ReLU between them; inputs are flattened.

    Each hidden layer's pre-activations are sown into the ``"activations"`` collection
    under its group name (``h0``, ``h1``, ...), for activation-based alignment.
    """

    features: Sequence[int]
    use_bias: bool = True

    def spec(self) -> Spec:
        """This model's Spec (see :func:`mlp_spec`)."""
        return mlp_spec(len(self.features), bias=self.use_bias)

    def with_widths(self, widths: Mapping[str, int]) -> "MLP":
        """This MLP with hidden layer i ``widths[f"h{i}"]`` wide (groups not named keep
        their width; the logits stay): the module of a fused pytree of other widths."""
        groups = {f"h{i}": f for i, f in enumerate(self.features[:-1])}
        check_groups(widths, groups, "this MLP")
        hidden = tuple(int(widths.get(g, f)) for g, f in groups.items())
        return self.clone(features=(*hidden, self.features[-1]))

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape((x.shape[0], -1))
        for i, width in enumerate(self.features):
            x = nn.Dense(width, use_bias=self.use_bias, name=f"Dense_{i}")(x)
            if i < len(self.features) - 1:
                record_activations(self, f"h{i}", x)
                x = nn.relu(x)
        return x


def mlp_spec(
    layers: int | Sequence[str],
    *,
    prefix: str = "params",
    bias: bool = True,
    group_prefix: str = "h",
) -> Spec:
    """Spec of a chain of Dense layers: hidden layer i's output is group ``f"{group_prefix}{i}"``.

    Args:
      layers: the number of Dense layers (named ``Dense_0``... as linen's ``nn.compact``
        names them) or their names in order (e.g. nnx attribute names).
      prefix: path prefix of the parameters: ``"params"`` for a linen variable dict,
        ``""`` for an ``nnx.State`` of parameters.
      bias: whether the layers have biases.
      group_prefix: prefix of the group names.
    """
    names = [f"Dense_{i}" for i in range(layers)] if isinstance(layers, int) else list(layers)
    layer, nnx = _prefixed(prefix)
    axes = {}
    for i, name in enumerate(names):
        inp = f"{group_prefix}{i - 1}" if i > 0 else None
        out = f"{group_prefix}{i}" if i < len(names) - 1 else None
        axes.update(dense(layer(name), inp, out, bias=bias, nnx=nnx))
    return Spec(axes)


def _prefixed(prefix: str):
    """``prefix`` as the layer builders take it: ``"params"`` is linen's collection, any
    other prefix (``""`` for an nnx State) is prepended to the module path as it is."""
    if prefix == "params":
        return (lambda name: name), False
    return (lambda name: f"{prefix}/{name}" if prefix else name), True
