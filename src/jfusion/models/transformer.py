"""Pre-LN transformer encoders with stock Flax attention (linen and nnx), and their Specs.

An encoder block is ``x + attn(LN(x))``, then ``x + fc2(gelu(fc1(LN(x))))`` (Vaswani et
al. 2017, with the norms before the sublayers as in ViT). Every leaf that writes the
residual stream -- the stem, a learned positional embedding, each attention's output
projection, each MLP's second layer -- and every LayerNorm on it carries one group, ``r``;
block ``i``'s attention is the structured group :class:`jfusion.Heads` ``f"b{i}"``
(members ``b{i}.qk`` and ``b{i}.vo``, see :func:`jfusion.layers.attention`) and its MLP
hidden layer the group ``f"b{i}.mlp"``. A final LayerNorm and a Dense classifier read the
mean token.

The blocks are shared by the Vision Transformers (:class:`jfusion.models.ViT`,
:class:`jfusion.models.NnxViT`) and the text encoders (:class:`jfusion.models.TextEncoder`,
:class:`jfusion.models.NnxTextEncoder`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from jfusion.core.spec import Entries, attention, dense, layer_norm


class EncoderBlock(nn.Module):
    """One pre-LN transformer block (linen): ``x + attn(LN(x))``, then ``x + fc2(gelu(fc1(LN(x))))``."""

    heads: int
    mlp: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.LayerNorm(name="ln1")(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attn")(y, y)
        y = nn.Dense(self.mlp, name="fc1")(nn.LayerNorm(name="ln2")(x))
        return x + nn.Dense(x.shape[-1], name="fc2")(nn.gelu(y))


class NnxEncoderBlock(nnx.Module):
    """:class:`EncoderBlock` in flax.nnx, with stock ``nnx.MultiHeadAttention`` (same leaves, same names)."""

    def __init__(self, dim: int, heads: int, mlp: int, *, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, dim, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
        self.fc1 = nnx.Linear(dim, mlp, rngs=rngs)
        self.fc2 = nnx.Linear(mlp, dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(nnx.gelu(self.fc1(self.ln2(x))))


def encode_and_classify(x: jax.Array, *, heads: int, mlp: int, blocks: int, num_classes: int) -> jax.Array:
    """The linen models' shared body on the embedded stream ``x (B, N, d)``: ``blocks`` encoder
    blocks (``block{i}``), the final LayerNorm ``ln`` and the classifier ``head`` on the mean token.

    Called from a linen model's compact ``__call__``, so the layers are that model's submodules.
    """
    for i in range(blocks):
        x = EncoderBlock(heads, mlp, name=block_path(i))(x)
    x = nn.LayerNorm(name="ln")(x)
    return nn.Dense(num_classes, name="head")(jnp.mean(x, axis=1))


class NnxEncoderClassifier(nnx.Module):
    """The nnx models' shared body: ``blocks`` (an ``nnx.List`` of :class:`NnxEncoderBlock`), the
    final LayerNorm ``ln`` and the classifier ``head``; a model embeds its inputs into the stream
    and calls :meth:`classify`."""

    def __init__(self, dim: int, heads: int, mlp: int, blocks: int, num_classes: int, *, rngs: nnx.Rngs):
        self.blocks = nnx.List([NnxEncoderBlock(dim, heads, mlp, rngs=rngs) for _ in range(blocks)])
        self.ln = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, num_classes, rngs=rngs)

    def classify(self, x: jax.Array) -> jax.Array:
        """The blocks, the final LayerNorm and the classifier on the mean token of ``x (B, N, d)``."""
        for block in self.blocks:
            x = block(x)
        return self.head(jnp.mean(self.ln(x), axis=1))


def block_path(i: int, *, nnx: bool = False) -> str:
    """Block ``i``'s module path: ``block{i}`` in linen, ``blocks/{i}`` (an ``nnx.List``) in nnx."""
    return f"blocks/{i}" if nnx else f"block{i}"


def encoder_entries(blocks: int, *, nnx: bool = False) -> Entries:
    """The Spec entries of ``blocks`` encoder blocks, the final LayerNorm ``ln`` and the classifier ``head``.

    Block ``i``'s LayerNorms carry ``r``, its attention is ``Heads(f"b{i}")`` reading and
    writing ``r``, its MLP hidden layer is ``f"b{i}.mlp"``. The stem's entries (what first
    writes ``r``) are the model's own.
    """
    entries: Entries = {}
    for i in range(blocks):
        block = block_path(i, nnx=nnx)
        entries.update(layer_norm(f"{block}/ln1", "r", nnx=nnx))
        entries.update(attention(f"{block}/attn", "r", f"b{i}", nnx=nnx))
        entries.update(layer_norm(f"{block}/ln2", "r", nnx=nnx))
        entries.update(dense(f"{block}/fc1", "r", f"b{i}.mlp", nnx=nnx))
        entries.update(dense(f"{block}/fc2", f"b{i}.mlp", "r", nnx=nnx))
    entries.update(layer_norm("ln", "r", nnx=nnx))
    entries.update(dense("head", "r", None, nnx=nnx))
    return entries


def position_entry(*, nnx: bool = False) -> Entries:
    """A learned positional embedding ``(1, N, d)`` added to the stream ``r``."""
    return {"pos_embedding" if nnx else "params/pos_embedding": (None, None, "r")}
