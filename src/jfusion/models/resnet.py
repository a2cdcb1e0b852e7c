"""CIFAR ResNets with BatchNorm: ResNet18 (He et al.'s ImageNet widths on a 3x3 stem) and ResNet20.

Every block's output is summed into a residual stream, so all leaves that write into one
stream share one group: the stem (when the first block keeps its width), every block's
second conv and BatchNorm, and the 1x1 projection shortcut of the block that opens a stage.

Module and group names (``S`` stages, stage ``s`` has blocks ``b = 0, 1, ...``)::

    stem_conv, stem_bn                 -> group "s0" (or "stem" if stage 0 projects, below)
    stage{s}_block{b}/conv1, bn1       -> group "s{s}.b{b}"  (the block's inner channels)
    stage{s}_block{b}/conv2, bn2       -> group "s{s}"       (stage s's residual stream)
    stage{s}_block0/proj_conv, proj_bn -> group "s{s}", reading the previous stream
    head                               -> ungrouped logits, reading "s{S-1}"

A block projects (1x1 conv with its stride, then BatchNorm: He et al.'s option B) when it
changes the resolution or the width: the first block of every stage after the first, and
the first block of stage 0 when ``stem_width != stage_widths[0]``; the stem then writes a
group of its own, ``"stem"``.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jfusion.core.spec import Spec, batch_norm, conv, dense
from jfusion.models.sow import record_activations
from jfusion.models.widths import check_groups


def _batch_norm(train: bool, name: str) -> nn.BatchNorm:
    # PyTorch's defaults (momentum 0.1 there is 0.9 here), so trained torch models port over.
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` with 3x3 convs.

    ``shortcut`` is the identity, or ``proj_bn(proj_conv(x))`` (1x1, stride ``strides``)
    when the block changes the resolution or the width. Sows the pre-ReLU output of ``bn1``
    under ``inner_group`` and the pre-ReLU sum under ``stream_group``.
    """

    features: int
    strides: int = 1
    inner_group: str = "h"
    stream_group: str = "s"


    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        def conv(features: int, kernel: int, strides: int, name: str) -> nn.Conv:
            return nn.Conv(
                features,
                (kernel, kernel),
                strides=(strides, strides),
                padding=kernel // 2,  # symmetric, as PyTorch's padding=1 (not "SAME")
                use_bias=False,
                name=name,
            )

        y = conv(self.features, 3, self.strides, "conv1")(x)
        y = _batch_norm(train, "bn1")(y)
        record_activations(self, self.inner_group, y)
        y = nn.relu(y)
        y = conv(self.features, 3, 1, "conv2")(y)
        y = _batch_norm(train, "bn2")(y)
        if self.strides != 1 or x.shape[-1] != self.features:
            x = conv(self.features, 1, self.strides, "proj_conv")(x)
            x = _batch_norm(train, "proj_bn")(x)
        y = y + x
        record_activations(self, self.stream_group, y)
        return nn.relu(y)


def _projects(stage: int, in_width: int, out_width: int) -> bool:
    return stage > 0 or in_width != out_width


class ResNet(nn.Module):
    """A CIFAR ResNet of :class:`BasicBlock` stages (see the module docstring for names).

    3x3 stem conv (stride 1, no max-pool) + BatchNorm + ReLU; stage ``s`` has
    ``stage_sizes[s]`` blocks of ``stage_widths[s]`` channels, its first block striding by 2
    for ``s > 0``; global average pool; ``Dense`` head. Pre-activations of every group are
    sown into ``"activations"`` under the group names of :func:`resnet_spec`: the stream
    groups at the stem and at every block's pre-ReLU sum.

    Use ``apply(variables, x, train=True, mutable=["batch_stats"])`` to train with batch
    statistics; ``train=False`` (default) uses the running averages.
    """

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    stage_widths: Sequence[int] = (64, 128, 256, 512)
    stem_width: Optional[int] = None  # defaults to stage_widths[0]
    num_classes: int = 10


    def spec(self) -> Spec:
        """This model's Spec (see :func:`resnet_spec`)."""
        return resnet_spec(self.stage_sizes, self.stage_widths, stem_width=self.stem_width)

    def with_widths(self, widths: Mapping[str, int]) -> "ResNet":
        """This ResNet with stage s ``widths[f"s{s}"]`` wide (and the stem ``widths["stem"]``
        when it has a group of its own); groups not named keep their width.

        A ResNet has one width per stage, so every block's inner group ``s{s}.b{b}`` must
        be as wide as its stage (as after :func:`jfusion.partial_fuse` with one alpha for
        all groups); otherwise this raises ValueError naming the block.
        """
        stem_group = _stem_group(self.stage_sizes, self.stage_widths, self.stem_width)
        stages = {_stream_group(s): w for s, w in enumerate(self.stage_widths)}
        inner = {_inner_group(s, b): w for s, (n, w) in enumerate(zip(self.stage_sizes, self.stage_widths)) for b in range(n)}
        known = {**stages, **inner, **({"stem": self.stem_width or self.stage_widths[0]} if stem_group == "stem" else {})}
        check_groups(widths, known, "this ResNet")
        new_stages = tuple(int(widths.get(g, w)) for g, w in stages.items())
        for group in inner:
            stage = int(group.split(".")[0][1:])
            if group in widths and int(widths[group]) != new_stages[stage]:
                raise ValueError(
                    f"group {group!r} is {widths[group]} wide but its stage {_stream_group(stage)!r} is "
                    f"{new_stages[stage]}: this ResNet has one width per stage"
                )
        if stem_group == "stem":
            stem = int(widths.get("stem", self.stem_width))
        else:  # the stem writes stage 0's stream: its width is the stage's
            stem = None if self.stem_width is None else new_stages[0]
        return self.clone(stage_widths=new_stages, stem_width=stem)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if len(self.stage_sizes) != len(self.stage_widths):
            raise ValueError(
                f"stage_sizes {tuple(self.stage_sizes)} and stage_widths "
                f"{tuple(self.stage_widths)} must have one entry per stage"
            )
        if x.ndim == 3:
            x = x[..., None]
        stem_width = self.stem_width or self.stage_widths[0]
        x = nn.Conv(stem_width, (3, 3), padding=1, use_bias=False, name="stem_conv")(x)
        x = _batch_norm(train, "stem_bn")(x)
        record_activations(self, _stem_group(self.stage_sizes, self.stage_widths, self.stem_width), x)
        x = nn.relu(x)
        for s, (blocks, width) in enumerate(zip(self.stage_sizes, self.stage_widths)):
            for b in range(blocks):
                x = BasicBlock(
                    width,
                    strides=2 if s > 0 and b == 0 else 1,
                    inner_group=_inner_group(s, b),
                    stream_group=_stream_group(s),
                    name=f"stage{s}_block{b}",
                )(x, train=train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="head")(x)


def _stream_group(stage: int) -> str:
    return f"s{stage}"


def _inner_group(stage: int, block: int) -> str:
    return f"s{stage}.b{block}"


def _stem_group(
    stage_sizes: Sequence[int], stage_widths: Sequence[int], stem_width: Optional[int]
) -> str:
    stem = stem_width or stage_widths[0]
    first_projects = stage_sizes[0] > 0 and _projects(0, stem, stage_widths[0])
    return "stem" if first_projects else _stream_group(0)


def ResNet18(*, num_classes: int = 10, width: int = 1) -> ResNet:
    """CIFAR ResNet18: 4 stages of 2 blocks, ``64/128/256/512`` channels (times ``width``)."""
    return ResNet((2, 2, 2, 2), tuple(c * width for c in (64, 128, 256, 512)), num_classes=num_classes)


def ResNet20(*, num_classes: int = 10, width: int = 1) -> ResNet:
    """CIFAR ResNet20 (He et al. 2016, section 4.2 with option-B shortcuts): 3 stages of 3
    blocks, ``16/32/64`` channels times ``width``."""
    return ResNet((3, 3, 3), tuple(c * width for c in (16, 32, 64)), num_classes=num_classes)


def resnet_spec(
    stage_sizes: Sequence[int],
    stage_widths: Sequence[int],
    *,
    stem_width: Optional[int] = None,
) -> Spec:
    """Spec of :class:`ResNet` models with this configuration.

    Widths only decide which blocks project (a model scaled by a ``width`` multiplier has
    the same Spec). Groups, as in the module docstring: ``"s{s}"`` is stage ``s``'s residual
    stream, written by the stem (stage 0, unless its first block projects; then the stem
    writes ``"stem"``), every block's ``conv2``/``bn2`` and the stage's projection shortcut;
    ``"s{s}.b{b}"`` is block ``b``'s inner channels (``conv1``/``bn1``). Every BatchNorm's
    ``params`` scale/bias and ``batch_stats`` mean/var carry the group of the conv it follows.
    """
    if len(stage_sizes) != len(stage_widths):
        raise ValueError(
            f"stage_sizes {tuple(stage_sizes)} and stage_widths {tuple(stage_widths)} must have "
            f"one entry per stage"
        )
    axes: dict = {}

    def conv_bn(prefix: str, conv_name: str, bn: str, reads: Optional[str], writes: str) -> None:
        axes.update(conv(f"{prefix}{conv_name}", reads, writes, bias=False))
        axes.update(batch_norm(f"{prefix}{bn}", writes))

    stream = _stem_group(stage_sizes, stage_widths, stem_width)
    width = stem_width or stage_widths[0]
    conv_bn("", "stem_conv", "stem_bn", None, stream)
    for s, (blocks, out_width) in enumerate(zip(stage_sizes, stage_widths)):
        out = _stream_group(s)
        for b in range(blocks):
            block = f"stage{s}_block{b}/"
            inner = _inner_group(s, b)
            conv_bn(block, "conv1", "bn1", stream, inner)
            conv_bn(block, "conv2", "bn2", inner, out)
            if b == 0 and _projects(s, width, out_width):
                conv_bn(block, "proj_conv", "proj_bn", stream, out)
            stream, width = out, out_width
    axes.update(dense("head", stream, None))
    return Spec(axes)
