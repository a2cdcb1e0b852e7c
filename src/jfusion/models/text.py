"""A small transformer text (sequence) encoder with stock Flax attention, in linen and nnx, and its Spec.

Tokens ``(B, L)`` are embedded by a table ``(vocab, d)`` -- which writes the residual
stream ``r`` on its last axis -- plus a learned positional embedding ``(1, length, d)``
(its first ``L`` rows); the pre-LN blocks, the final LayerNorm and the mean-token
classifier are those of :mod:`jfusion.models.transformer`, shared with the ViT.
"""

from __future__ import annotations

import flax.linen as nn
import jax
from flax import nnx

from jfusion.core.spec import Spec, embed
from jfusion.models.transformer import NnxEncoderClassifier, encode_and_classify, encoder_entries, position_entry


class TextEncoder(nn.Module):
    """A transformer encoder classifying token sequences ``(B, L)`` of ints, ``L <= length``.

    Token embedding (``nn.Embed``) plus a learned positional embedding, ``blocks`` pre-LN
    blocks with stock attention, a final LayerNorm and a classifier on the mean token.

    Attributes:
      vocab: the number of tokens.
      length: the longest sequence (the positional embedding's rows).
      dim: the width of the residual stream (divisible by ``heads``).
      heads: attention heads per block.
      blocks: the number of encoder blocks.
      mlp: the width of each block's MLP hidden layer.
      num_classes: the number of logits.

    References:
      - Ashish Vaswani et al. *Attention Is All You Need.* NeurIPS 2017.
    """

    vocab: int = 256
    length: int = 64
    dim: int = 32
    heads: int = 4
    blocks: int = 2
    mlp: int = 64
    num_classes: int = 10

    def spec(self) -> Spec:
        """This model's Spec (see :func:`text_encoder_spec`)."""
        return text_encoder_spec(self.blocks)

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = nn.Embed(self.vocab, self.dim, name="embed")(tokens)
        positions = self.param("pos_embedding", nn.initializers.normal(0.02), (1, self.length, self.dim))
        x = x + positions[:, : x.shape[1]]
        return encode_and_classify(x, heads=self.heads, mlp=self.mlp, blocks=self.blocks, num_classes=self.num_classes)


class NnxTextEncoder(NnxEncoderClassifier):
    """:class:`TextEncoder` in flax.nnx (``nnx.Embed``, :class:`jfusion.models.transformer.NnxEncoderClassifier`); the same arguments, and ``rngs``."""

    def __init__(
        self,
        *,
        vocab: int = 256,
        length: int = 64,
        dim: int = 32,
        heads: int = 4,
        blocks: int = 2,
        mlp: int = 64,
        num_classes: int = 10,
        rngs: nnx.Rngs,
    ):
        self.embed = nnx.Embed(vocab, dim, rngs=rngs)
        self.pos_embedding = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (1, length, dim)))
        super().__init__(dim, heads, mlp, blocks, num_classes, rngs=rngs)

    def spec(self) -> Spec:
        """This model's Spec: :func:`text_encoder_spec` with ``nnx=True``."""
        return text_encoder_spec(len(self.blocks), nnx=True)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return self.classify(self.embed(tokens) + self.pos_embedding[:, : tokens.shape[1]])


def text_encoder_spec(blocks: int, *, nnx: bool = False) -> Spec:
    """Spec of :class:`TextEncoder` (or, with ``nnx=True``, of :class:`NnxTextEncoder`'s state).

    The token embedding table ``(vocab, d)`` and the positional embedding ``(1, L, d)`` write
    the stream ``r`` on their last axis; the blocks are :func:`jfusion.models.transformer.encoder_entries`.

    Examples:
      >>> from jfusion.models.text import text_encoder_spec
      >>> spec = text_encoder_spec(1)
      >>> spec.units, spec["params/embed/embedding"].axes
      (('r', 'b0', 'b0.mlp'), (None, 'r'))
      >>> text_encoder_spec(1, nnx=True)["blocks/0/attn/out/kernel"].axes
      (Heads('b0'), 'b0.vo', 'r')
    """
    return Spec({**embed("embed", "r", nnx=nnx), **position_entry(nnx=nnx), **encoder_entries(blocks, nnx=nnx)})
