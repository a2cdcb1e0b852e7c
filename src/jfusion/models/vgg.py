"""VGG networks for CIFAR-size images (OTFusion's CIFAR10 VGG11 is ``VGG(use_bias=False)``)."""

from __future__ import annotations

from typing import Mapping, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from jfusion.core.spec import Spec, conv, dense
from jfusion.core.spec import batch_norm as norm
from jfusion.models.sow import record_activations
from jfusion.models.widths import check_groups

Layer = Union[int, str]

#: VGG11's conv widths, with ``"M"`` for a 2x2 max-pool (Simonyan & Zisserman's configuration A).
VGG11: tuple[Layer, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def _scaled(width: int, multiplier: float) -> int:
    return max(1, int(round(width * multiplier)))


class VGG(nn.Module):
    """3x3 convs ``Conv_i`` (each optionally followed by ``BatchNorm_i``, then ReLU), 2x2
    max-pools at the ``"M"`` entries, a global average pool and one ``Dense_0`` head.

    ``i`` counts convs only (pools are not numbered). Pools use ``"SAME"`` padding: on even
    sizes this is PyTorch's ``MaxPool2d(2, 2)``, and odd sizes round up (28x28 inputs go
    28-14-7-4-2-1 through VGG11's five pools instead of dying at 0). The head reads the
    global average of the last feature map: for 32x32 inputs to VGG11 that map is 1x1, so
    this is exactly OTFusion's flatten followed by ``Linear(512, num_classes)``; for other
    sizes it keeps the head at ``c_last -> num_classes``, so the Spec does not depend on the
    input size.

    Pre-activations (the conv output, after BatchNorm when ``batch_norm``) are sown into
    ``"activations"`` as ``c0, c1, ...``, the group names of :func:`vgg_spec`.

    Attributes:
      features: conv widths and ``"M"`` pools, e.g. :data:`jfusion.models.vgg.VGG11`.
      batch_norm: a BatchNorm after every conv; ``__call__(x, train=True)`` then uses
        batch statistics and updates ``batch_stats`` (pass ``mutable=["batch_stats"]``).
      num_classes: logits.
      use_bias: biases on the convs and the head (OTFusion's VGG11 has none).
      width: multiplier of every conv width (rounded, at least 1).
    """

    features: Sequence[Layer] = VGG11
    batch_norm: bool = False
    num_classes: int = 10
    use_bias: bool = True
    width: float = 1.0


    def spec(self) -> Spec:
        """This model's Spec (see :func:`vgg_spec`)."""
        return vgg_spec(self.features, batch_norm=self.batch_norm, use_bias=self.use_bias)

    def with_widths(self, widths: Mapping[str, int]) -> "VGG":
        """This VGG with conv i ``widths[f"c{i}"]`` wide (groups not named keep their
        width): the conv widths become absolute and ``width`` 1."""
        convs = [_scaled(layer, self.width) for layer in self.features if layer != "M"]
        groups = {f"c{i}": w for i, w in enumerate(convs)}
        check_groups(widths, groups, "this VGG")
        new = iter(int(widths.get(g, w)) for g, w in groups.items())
        return self.clone(features=tuple("M" if layer == "M" else next(new) for layer in self.features), width=1.0)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if x.ndim == 3:
            x = x[..., None]
        i = 0
        for layer in self.features:
            if layer == "M":
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
                continue
            x = nn.Conv(
                _scaled(layer, self.width), (3, 3), padding=1, use_bias=self.use_bias, name=f"Conv_{i}"
            )(x)
            if self.batch_norm:
                x = nn.BatchNorm(
                    use_running_average=not train, momentum=0.9, epsilon=1e-5, name=f"BatchNorm_{i}"
                )(x)
            record_activations(self, f"c{i}", x)
            x = nn.relu(x)
            i += 1
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, use_bias=self.use_bias, name="Dense_0")(x)


def vgg_spec(
    features: Sequence[Layer] = VGG11,
    *,
    batch_norm: bool = False,
    use_bias: bool = True,
) -> Spec:
    """Spec of :class:`VGG` models with these ``features`` (any ``width`` multiplier).

    Conv ``i`` (counting convs only) writes group ``c{i}``: its kernel ``(3, 3, c{i-1}, c{i})``
    (the first reads the ungrouped image channels), its bias, and ``BatchNorm_i``'s
    ``params`` scale/bias and ``batch_stats`` mean/var. The head ``Dense_0`` reads the last
    conv's group (after global average pooling, no view is needed) and writes ungrouped logits.
    """
    num_convs = sum(layer != "M" for layer in features)
    if num_convs == 0:
        raise ValueError(f"features {tuple(features)} has no conv layer")
    axes = {}
    for i in range(num_convs):
        group = f"c{i}"
        axes.update(conv(f"Conv_{i}", f"c{i - 1}" if i else None, group, bias=use_bias))
        if batch_norm:
            axes.update(norm(f"BatchNorm_{i}", group))
    axes.update(dense("Dense_0", f"c{num_convs - 1}", None, bias=use_bias))
    return Spec(axes)
