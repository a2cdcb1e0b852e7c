"""A small Vision Transformer (Dosovitskiy et al. 2021) with stock Flax attention, in linen and nnx, and its Spec.

Patches are flattened and embedded by a Dense layer, a learned positional embedding is
added, and ``blocks`` pre-LN encoder blocks follow (:mod:`jfusion.models.transformer`:
``x + attn(LN(x))``, then ``x + MLP(LN(x))``, with ``flax.linen.MultiHeadDotProductAttention``
or ``nnx.MultiHeadAttention``); a final LayerNorm and a classifier read the mean token.
Every layer that writes the residual stream (the patch embedding, the positional embedding,
each attention's output projection and each MLP's second layer) and every LayerNorm on it
carries one group, ``r``; each attention layer is a structured group (:class:`jfusion.Heads`
``f"b{i}"``, with members ``b{i}.qk`` and ``b{i}.vo``) and each MLP's hidden layer the group
``b{i}.mlp``. Align them by activations with ``jfusion.ByActivations.from_module(model,
points=model.spec())``: each group's activations are its writer modules' outputs, the
query, key and value projections' ``(B, N, H, hd)`` flattened head-major.
"""

from __future__ import annotations

import flax.linen as nn
import jax
from flax import nnx

from jfusion.core.spec import Spec, dense
from jfusion.models.transformer import NnxEncoderClassifier, encode_and_classify, encoder_entries, position_entry


def patches(x: jax.Array, patch: int) -> jax.Array:
    """Images ``(B, H, W)`` or ``(B, H, W, C)`` as ``(B, N, patch * patch * C)`` flattened square patches."""
    if x.ndim == 3:
        x = x[..., None]
    b, h, w, c = x.shape
    p = patch
    return x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, p * p * c)


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

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Dense(self.dim, name="embed")(patches(x, self.patch))
        x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1, x.shape[1], self.dim))
        return encode_and_classify(x, heads=self.heads, mlp=self.mlp, blocks=self.blocks, num_classes=self.num_classes)


class NnxViT(NnxEncoderClassifier):
    """:class:`ViT` in flax.nnx, with stock ``nnx.MultiHeadAttention``: the same layers and
    leaf names (blocks are ``blocks/{i}``, an ``nnx.List``), for images of ``image_size``
    squared pixels and ``channels`` channels (nnx layers are built with their input sizes).

    Examples:
      >>> import jax.numpy as jnp, jfusion
      >>> from flax import nnx
      >>> from jfusion.models.vit import NnxViT
      >>> model = NnxViT(image_size=14, patch=7, dim=8, heads=2, blocks=1, mlp=16, rngs=nnx.Rngs(0))
      >>> model(jnp.ones((3, 14, 14))).shape
      (3, 10)
      >>> model.spec().validate({p: x.shape for p, x in jfusion.core.tree.flatten(nnx.state(model))[0].items()})
      {'r': 8, 'b0': 2, 'b0.qk': 8, 'b0.vo': 8, 'b0.mlp': 16}
    """

    def __init__(
        self,
        *,
        image_size: int = 28,
        channels: int = 1,
        patch: int = 7,
        dim: int = 32,
        heads: int = 4,
        blocks: int = 2,
        mlp: int = 64,
        num_classes: int = 10,
        rngs: nnx.Rngs,
    ):
        self.patch = patch
        self.embed = nnx.Linear(patch * patch * channels, dim, rngs=rngs)
        tokens = (image_size // patch) ** 2
        self.pos_embedding = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (1, tokens, dim)))
        super().__init__(dim, heads, mlp, blocks, num_classes, rngs=rngs)

    def spec(self) -> Spec:
        """This model's Spec: :func:`vit_spec` with ``nnx=True``."""
        return vit_spec(len(self.blocks), nnx=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.classify(self.embed(patches(x, self.patch)) + self.pos_embedding[...])


def vit_spec(blocks: int, *, nnx: bool = False) -> Spec:
    """Spec of :class:`ViT` with ``blocks`` encoder blocks (of :class:`NnxViT`'s state with ``nnx=True``).

    The residual stream is group ``r`` (patch embedding, positional embedding ``(1, N, d)``,
    every LayerNorm, every attention output and MLP output); block ``i``'s attention is
    :class:`jfusion.Heads` ``f"b{i}"`` (:func:`jfusion.layers.attention`) and its MLP hidden
    layer group ``f"b{i}.mlp"`` (:func:`jfusion.models.transformer.encoder_entries`).

    Examples:
      >>> from jfusion.models.vit import vit_spec
      >>> spec = vit_spec(2)
      >>> spec.units
      ('r', 'b0', 'b0.mlp', 'b1', 'b1.mlp')
      >>> spec["params/block0/attn/query/kernel"].axes
      ('r', Heads('b0'), 'b0.qk')
      >>> vit_spec(2, nnx=True)["blocks/1/attn/out/kernel"].axes
      (Heads('b1'), 'b1.vo', 'r')
    """
    return Spec({**dense("embed", None, "r", nnx=nnx), **position_entry(nnx=nnx), **encoder_entries(blocks, nnx=nnx)})
