"""A small Vision Transformer (Dosovitskiy et al. 2021) with stock Flax attention, and its Spec.

Patches are flattened and embedded by a Dense layer, a learned positional embedding is
added, and ``blocks`` pre-LN encoder blocks follow (``x + attn(LN(x))``, then
``x + MLP(LN(x))``) with ``flax.linen.MultiHeadDotProductAttention``; a final LayerNorm and a
classifier read the mean token. Every layer that writes the residual stream (the patch
embedding, the positional embedding, each attention's output projection and each MLP's
second layer) and every LayerNorm on it carries one group, ``r``; each attention layer is a
structured group (:class:`jfusion.Heads` ``f"b{i}"``, with members ``b{i}.qk`` and
``b{i}.vo``) and each MLP's hidden layer the group ``b{i}.mlp``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jfusion.core.spec import Spec, attention, dense, layer_norm
from jfusion.models.sow import record_activations


class EncoderBlock(nn.Module):
    """One pre-LN transformer block: ``x + attn(LN(x))``, then ``x + fc2(gelu(fc1(LN(x))))``.

    ``fc1``'s pre-activations are sown under ``mlp_group``.
    """

    heads: int
    mlp: int
    mlp_group: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.LayerNorm(name="ln1")(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attn")(y, y)
        y = nn.Dense(self.mlp, name="fc1")(nn.LayerNorm(name="ln2")(x))
        record_activations(self, self.mlp_group, y)
        return x + nn.Dense(x.shape[-1], name="fc2")(nn.gelu(y))


class ViT(nn.Module):
    """A Vision Transformer on images ``(B, H, W)`` or ``(B, H, W, C)``; ``patch`` divides H and W.

    Attributes:
      patch: the side of the square patches.
      dim: the width of the residual stream (divisible by ``heads``).
      heads: attention heads per block (each ``dim // heads`` wide).
      blocks: the number of encoder blocks.
      mlp: the width of each block's MLP hidden layer.
      num_classes: the number of logits.

    References:
      - Alexey Dosovitskiy et al. *An Image is Worth 16x16 Words: Transformers for Image
        Recognition at Scale.* ICLR 2021.
      - Ashish Vaswani et al. *Attention Is All You Need.* NeurIPS 2017.
    """

    patch: int = 7
    dim: int = 32
    heads: int = 4
    blocks: int = 2
    mlp: int = 64
    num_classes: int = 10

    def spec(self) -> Spec:
        """This model's Spec (see :func:`vit_spec`)."""
        return vit_spec(self.blocks)

    def activations(self) -> "ViTActivations":
        """Every group's activations, for ``jfusion.ByActivations(model.activations())``."""
        return ViTActivations(self)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim == 3:
            x = x[..., None]
        b, h, w, c = x.shape
        p = self.patch
        x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, p * p * c)
        x = nn.Dense(self.dim, name="embed")(x)
        x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1, x.shape[1], self.dim))
        for i in range(self.blocks):
            x = EncoderBlock(self.heads, self.mlp, f"b{i}.mlp", name=f"block{i}")(x)
        x = nn.LayerNorm(name="ln")(x)
        return nn.Dense(self.num_classes, name="head")(jnp.mean(x, axis=1))


def vit_spec(blocks: int) -> Spec:
    """Spec of :class:`ViT` with ``blocks`` encoder blocks.

    The residual stream is group ``r`` (patch embedding, positional embedding ``(1, N, d)``,
    every LayerNorm, every attention output and MLP output); block ``i``'s attention is
    :class:`jfusion.Heads` ``f"b{i}"`` (:func:`jfusion.layers.attention`) and its MLP hidden
    layer group ``f"b{i}.mlp"``.

    Examples:
      >>> from jfusion.models.vit import vit_spec
      >>> spec = vit_spec(2)
      >>> spec.units
      ('r', 'b0', 'b0.mlp', 'b1', 'b1.mlp')
      >>> spec["params/block0/attn/query/kernel"].axes
      ('r', Heads('b0'), 'b0.qk')
    """
    entries = {**dense("embed", None, "r"), "params/pos_embedding": (None, None, "r")}
    for i in range(blocks):
        block = f"block{i}"
        entries.update(layer_norm(f"{block}/ln1", "r"))
        entries.update(attention(f"{block}/attn", "r", f"b{i}"))
        entries.update(layer_norm(f"{block}/ln2", "r"))
        entries.update(dense(f"{block}/fc1", "r", f"b{i}.mlp"))
        entries.update(dense(f"{block}/fc2", f"b{i}.mlp", "r"))
    entries.update(layer_norm("ln", "r"))
    entries.update(dense("head", "r", None))
    return Spec(entries)


@dataclasses.dataclass(frozen=True)
class ViTActivations:
    """A :class:`ViT`'s activations per group, captured from its submodules' outputs.

    ``r``: the outputs of the patch embedding and of every attention and MLP (what each
    writes to the stream); ``b{i}.qk``: the queries and the keys of block ``i``, ``(B, N, H,
    hd)`` flattened head-major to ``H * hd`` features (the layout of the Spec's member
    group); ``b{i}.vo``: its values; ``b{i}.mlp``: its MLP's pre-activations. Values of one
    group are stacked along the sample axis. Hashable, so ``jit`` caches its programs.
    """

    module: ViT

    def __call__(self, variables: Any, inputs: jax.Array) -> dict[str, jax.Array]:
        _, state = self.module.apply(variables, inputs, capture_intermediates=True, mutable=["intermediates"])
        got = state["intermediates"]

        def out(*path: str, heads: bool = False) -> jax.Array:
            node = got
            for name in path:
                node = node[name]
            value = node["__call__"][0]
            return value.reshape(-1, value.shape[-2] * value.shape[-1] if heads else value.shape[-1])

        streams = [out("embed")]
        groups: dict[str, jax.Array] = {}
        for i in range(self.module.blocks):
            block = f"block{i}"
            streams += [out(block, "attn"), out(block, "fc2")]
            attn = (block, "attn")
            groups[f"b{i}.qk"] = jnp.concatenate([out(*attn, "query", heads=True), out(*attn, "key", heads=True)])
            groups[f"b{i}.vo"] = out(*attn, "value", heads=True)
            groups[f"b{i}.mlp"] = out(block, "fc1")
        return {"r": jnp.concatenate(streams), **groups}
