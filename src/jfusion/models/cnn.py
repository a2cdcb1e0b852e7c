"""Plain convolutional networks: a conv stack, a flatten, a dense head."""

from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax

from jfusion.core.spec import Spec, conv, dense
from jfusion.models.mlp import _prefixed
from jfusion.models.sow import record_activations
from jfusion.models.widths import check_groups


class CNN(nn.Module):
    """``Conv_i`` (3x3, ReLU, 2x2 max-pool) for each conv width, flatten, ``Dense_j`` layers.

    Pre-activations are sown into ``"activations"`` as ``c0, c1, ...`` (convs) and
    ``f0, f1, ...`` (hidden dense layers).

    Attributes:
      conv_features: conv widths.
      dense_features: dense widths, the last being the logits.
      image_size: the input's ``H`` (or ``(H, W)``). Optional, but :meth:`spec` needs it:
        the flatten folds the last feature map's positions into ``Dense_0``'s input axis,
        and their number depends on the input size. When set, other inputs are refused.
    """

    conv_features: Sequence[int] = (32, 64)
    dense_features: Sequence[int] = (128, 10)
    image_size: Optional[Union[int, tuple[int, int]]] = None

    def _image_hw(self) -> tuple[int, int] | None:
        if self.image_size is None:
            return None
        if isinstance(self.image_size, int):
            return (self.image_size, self.image_size)
        return tuple(self.image_size)

    def spec(self) -> Spec:
        """This model's Spec (see :func:`cnn_spec`); needs ``image_size``."""
        hw = self._image_hw()
        if hw is None:
            raise ValueError(
                "CNN.spec() needs the CNN's image_size: the flatten before Dense_0 folds "
                "(H // 2**num_convs) * (W // 2**num_convs) positions into its input axis"
            )
        # SAME convs keep the size; each VALID 2x2 pool floors it to half.
        shrink = 2 ** len(self.conv_features)
        positions = (hw[0] // shrink) * (hw[1] // shrink)
        return cnn_spec(len(self.conv_features), len(self.dense_features), positions)

    def with_widths(self, widths: Mapping[str, int]) -> "CNN":
        """This CNN with conv i ``widths[f"c{i}"]`` and hidden dense j ``widths[f"f{j}"]``
        wide (groups not named keep their width; the logits stay)."""
        convs = {f"c{i}": w for i, w in enumerate(self.conv_features)}
        dense = {f"f{j}": w for j, w in enumerate(self.dense_features[:-1])}
        check_groups(widths, {**convs, **dense}, "this CNN")
        return self.clone(
            conv_features=tuple(int(widths.get(g, w)) for g, w in convs.items()),
            dense_features=(*(int(widths.get(g, w)) for g, w in dense.items()), self.dense_features[-1]),
        )


    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim == 3:
            x = x[..., None]
        hw = self._image_hw()
        if hw is not None and tuple(x.shape[1:3]) != hw:
            raise ValueError(f"this CNN was declared for {hw} images (image_size); got {tuple(x.shape[1:3])}")
        for i, width in enumerate(self.conv_features):
            x = nn.Conv(width, (3, 3), name=f"Conv_{i}")(x)
            record_activations(self, f"c{i}", x)
            x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        for j, width in enumerate(self.dense_features):
            x = nn.Dense(width, name=f"Dense_{j}")(x)
            if j < len(self.dense_features) - 1:
                record_activations(self, f"f{j}", x)
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
    layer, nnx = _prefixed(prefix)
    axes = {}
    for i in range(num_convs):
        axes.update(conv(layer(f"Conv_{i}"), f"c{i - 1}" if i else None, f"c{i}", nnx=nnx))
    for j in range(num_dense):
        inp = f"f{j - 1}" if j else ((spatial, f"c{num_convs - 1}") if num_convs else None)
        out = f"f{j}" if j < num_dense - 1 else None
        axes.update(dense(layer(f"Dense_{j}"), inp, out, nnx=nnx))
    return Spec(axes)
