"""Spec entries for common layers, so a Spec reads as the model does.

Each builder returns the ``{path: axes}`` entries of one layer's leaves, named as Flax
names them; merge them into the dict a :class:`jfusion.Spec` is built from::

    from jfusion import layers

    spec = jfusion.Spec({
        **layers.conv("Conv_0", None, "c0"),          # kernel (H, W, in, out) and bias
        **layers.batch_norm("BatchNorm_0", "c0"),     # scale, bias; batch_stats mean, var
        **layers.dense("Dense_0", (49, "c0"), "h0"),  # reads a flattened 7x7 map of c0
        **layers.dense("Dense_1", "h0", None),        # logits: ungrouped output
    })

Paths are linen's (``"params/Conv_0/kernel"``, ``"batch_stats/BatchNorm_0/mean"``) by
default and an ``nnx.State``'s (``"conv/kernel"``, ``"norm/mean"``) with ``nnx=True``.

Attention is a structured group (:class:`jfusion.Heads`): :func:`attention` labels stock
``nn.MultiHeadDotProductAttention`` / ``nnx.MultiHeadAttention`` (separate ``(d, H, hd)``
query, key and value kernels; members ``qk`` and ``vo``), :func:`fused_attention` one fused
q/k/v Dense kernel ``(d, 3 H hd)`` (a :class:`jfusion.Concat` of q, k and v blocks, the same
members) and a Dense output::

    spec = jfusion.Spec({
        **layers.embed("embed", "r"),                    # token table (vocab, d): writes the stream
        **layers.layer_norm("block0/ln1", "r"),
        **layers.attention("block0/attn", "r", "b0"),    # Heads("b0"): b0.qk, b0.vo
        **layers.dense("head", "r", None),
    })
"""

from jfusion.core.spec import attention, batch_norm, bias, conv, dense, embed, fused_attention, layer_norm

__all__ = ["attention", "batch_norm", "bias", "conv", "dense", "embed", "fused_attention", "layer_norm"]
