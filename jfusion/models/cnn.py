"""Plain convolutional networks: a conv stack, a flatten, a dense head."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax

from jfusion.spec import Spec


class CNN(nn.Module):
    """``Conv_i`` (3x3, ReLU, 2x2 max-pool) for each conv width, flatten, ``Dense_j`` layers.

    Pre-activations are sown into ``"activations"`` as ``c0, c1, ...`` (convs) and
    ``f0, f1, ...`` (hidden dense layers).
    """

    conv_features: Sequence[int] = (32, 64)
    dense_features: Sequence[int] = (128, 10)

    def _record(self, group: str, x: jax.Array) -> None:
        # Sown only when applying: init must return parameters alone.
        if not self.is_initializing():
            self.sow("activations", group, x)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim == 3:
            x = x[..., None]
        for i, width in enumerate(self.conv_features):
            x = nn.Conv(width, (3, 3), name=f"Conv_{i}")(x)
            self._record(f"c{i}", x)
            x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        for j, width in enumerate(self.dense_features):
            x = nn.Dense(width, name=f"Dense_{j}")(x)
            if j < len(self.dense_features) - 1:
                self._record(f"f{j}", x)
                x = nn.relu(x)
        return x


def cnn_spec(num_convs: int, num_dense: int, spatial: int, *, prefix: str = "params") -> Spec:
    """Spec of :class:`CNN`-shaped models.

    Args:
      num_convs: conv layers ``Conv_0 ...``; conv i writes group ``c{i}``.
      num_dense: dense layers ``Dense_0 ...``; hidden dense j writes group ``f{j}``.
      spatial: positions ``H * W`` of the last feature map, which the flatten folds into
        the first dense kernel's input axis (a view ``(spatial, c_last)``).
      prefix: ``"params"`` for linen variables, ``""`` for an nnx State.
    """
    base = f"{prefix}/" if prefix else ""
    axes = {}
    for i in range(num_convs):
        axes[f"{base}Conv_{i}/kernel"] = (None, None, f"c{i - 1}" if i else None, f"c{i}")
        axes[f"{base}Conv_{i}/bias"] = (f"c{i}",)
    for j in range(num_dense):
        inp = f"f{j - 1}" if j else ((spatial, f"c{num_convs - 1}") if num_convs else None)
        out = f"f{j}" if j < num_dense - 1 else None
        axes[f"{base}Dense_{j}/kernel"] = (inp, out)
        axes[f"{base}Dense_{j}/bias"] = (out,)
    return Spec(axes)
