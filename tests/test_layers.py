"""The layer builders (``jfusion.layers``): what the reference models' specs are made of.

``tests/data/reference_specs.json`` holds the reference models' specs as they were written
by hand before they moved onto the builders (28 configurations, the key order included);
the builders must reproduce them exactly, and specs of BatchNorm, LayerNorm, embedding and
1-D conv nets built from them must pass ``check_spec`` (linen) and equal the traced spec (nnx).
"""

import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import jfusion
from jfusion import layers
from jfusion.core.nnx import fresh
from jfusion.models import (  # noqa: F401 -- the snapshot's keys are calls of these
    CNN,
    MLP,
    VGG,
    RecurrentClassifier,
    ResNet18,
    ResNet20,
    cnn_spec,
    mlp_spec,
    resnet_spec,
    rnn_spec,
    vgg_spec,
)

SNAPSHOT = json.loads((Path(__file__).parent / "data" / "reference_specs.json").read_text())


def as_tuples(entry):
    return tuple(as_tuples(e) for e in entry) if isinstance(entry, list) else entry


@pytest.mark.parametrize("call", sorted(SNAPSHOT))
def test_the_builders_reproduce_the_hand_written_reference_specs(call):
    expected = [(path, as_tuples(axes)) for path, axes in SNAPSHOT[call]]
    assert list(eval(call).as_dict().items()) == expected  # same entries, same order


def test_public_namespace():
    assert "layers" in jfusion.__all__
    assert set(layers.__all__) == {"attention", "batch_norm", "bias", "conv", "dense", "embed", "fused_attention", "layer_norm"}


def test_linen_and_nnx_paths():
    assert layers.batch_norm("stage0_block0/bn1", "s0.b0") == {
        "params/stage0_block0/bn1/scale": ("s0.b0",),
        "params/stage0_block0/bn1/bias": ("s0.b0",),
        "batch_stats/stage0_block0/bn1/mean": ("s0.b0",),
        "batch_stats/stage0_block0/bn1/var": ("s0.b0",),
    }
    assert layers.batch_norm("norm", "h", nnx=True, scale=False) == {
        "norm/bias": ("h",),
        "norm/mean": ("h",),
        "norm/var": ("h",),
    }
    assert layers.conv("layers/0", None, "c", nnx=True) == {"layers/0/kernel": (None, None, None, "c"), "layers/0/bias": ("c",)}
    assert layers.conv("Conv_0", None, "c", spatial=3, bias=False) == {"params/Conv_0/kernel": (None,) * 4 + ("c",)}
    assert layers.dense("Dense_0", (49, "c1"), "h0", bias=False) == {"params/Dense_0/kernel": ((49, "c1"), "h0")}
    assert layers.layer_norm("ln", "h", bias=False, nnx=True) == {"ln/scale": ("h",)}
    assert layers.embed("tokens", "e", nnx=True) == {"tokens/embedding": (None, "e")}
    assert layers.bias("Recurrent_0/hi", "r0") == {"params/Recurrent_0/hi/bias": ("r0",)}
    qk, vo = (jfusion.Heads("b", 2), "b.qk"), (jfusion.Heads("b", 2), "b.vo")
    assert layers.fused_attention("attn", "r", "b", 2, bias=False, nnx=True, qkv="in_proj") == {
        "attn/in_proj/kernel": ("r", jfusion.Concat(qk, qk, vo)),
        "attn/out/kernel": (vo, "r"),
    }
    with pytest.raises(jfusion.SpecError, match="count is the number of heads"):
        layers.fused_attention("attn", "r", "b", 0)


@pytest.mark.parametrize("name", ["", "/Dense_0", "Dense_0/", None])
def test_a_bad_layer_name_is_refused(name):
    with pytest.raises(jfusion.SpecError, match="module path"):
        layers.dense(name, None, "h")


def test_a_bad_spatial_rank_is_refused():
    with pytest.raises(jfusion.SpecError, match="spatial"):
        layers.conv("Conv_0", None, "c", spatial=-1)


class ConvBNNet(nn.Module):
    """Conv, BatchNorm, a 4x4 pool to 7x7, flatten, two Dense: the README's Spec example."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(8, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.max_pool(nn.relu(x), (4, 4), strides=(4, 4))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(16)(x))
        return nn.Dense(3)(x)


def test_a_batchnorm_nets_spec_from_the_builders_passes_check_spec():
    model, x = ConvBNNet(), jax.random.normal(jax.random.key(0), (2, 28, 28, 1))
    variables = model.init(jax.random.key(1), x)
    spec = jfusion.Spec({
        **layers.conv("Conv_0", None, "c0"),
        **layers.batch_norm("BatchNorm_0", "c0"),
        **layers.dense("Dense_0", (49, "c0"), "h0"),
        **layers.dense("Dense_1", "h0", None),
    })
    apply = jax.jit(model.apply)
    jfusion.check_spec(apply, variables, spec, x)
    # The statistics travel with their channels: a var left unpermuted is caught.
    wrong = jfusion.Spec({**spec.as_dict(), "batch_stats/BatchNorm_0/var": (None,)})
    with pytest.raises(jfusion.SpecError, match=r"group 'c0' \(outputs change"):
        jfusion.check_spec(apply, variables, wrong, x)


class SequenceNet(nn.Module):
    """Embedding, LayerNorm, a 1-D conv, RMSNorm, mean over time, Dense."""

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(11, 6)(tokens)
        x = nn.LayerNorm()(x)
        x = nn.Conv(5, (3,), use_bias=False)(x)
        x = nn.RMSNorm()(x)
        return nn.Dense(2)(jnp.mean(nn.gelu(x), axis=1))


def test_embedding_layernorm_and_1d_conv_builders_pass_check_spec():
    model = SequenceNet()
    tokens = jax.random.randint(jax.random.key(0), (3, 7), 0, 11)
    variables = model.init(jax.random.key(1), tokens)
    spec = jfusion.Spec({
        **layers.embed("Embed_0", "e"),
        **layers.layer_norm("LayerNorm_0", "e"),
        **layers.conv("Conv_0", "e", "c", bias=False, spatial=1),
        **layers.layer_norm("RMSNorm_0", "c", bias=False),
        **layers.dense("Dense_0", "c", None),
    })
    jfusion.check_spec(jax.jit(model.apply), variables, spec, tokens)


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.norm = nnx.BatchNorm(4, rngs=rngs)
        self.out = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.mean(nnx.relu(self.norm(self.conv(x))), axis=(1, 2)))


def test_nnx_paths_equal_the_traced_spec_and_pass_check_spec():
    module, x = NnxNet(nnx.Rngs(0)), jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
    spec = jfusion.Spec({
        **layers.conv("conv", None, "conv", nnx=True),
        **layers.batch_norm("norm", "conv", nnx=True),
        **layers.dense("out", "conv", None, nnx=True),
    })
    traced = jfusion.trace_spec(module, x, check=False)  # its groups are named after the modules
    assert traced.as_dict() == spec.as_dict()
    graphdef, state = nnx.split(module)
    jfusion.check_spec(jax.jit(lambda s, x: fresh(graphdef, s, train=False)(x)), state, spec, x)
