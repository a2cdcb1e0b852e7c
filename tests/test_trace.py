"""trace_spec: specs read off the jaxpr equal the hand-written ones, and fuse models exactly.

Kept fast (the suite is slow already): tiny widths and inputs, one model instance per
architecture, and ``check=False`` where the hand spec is the oracle anyway.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend.core import Primitive
from planted import assert_same_groups, max_tree_difference, random_variables

import jfusion
from jfusion.core.tree import flatten
from jfusion.models import (
    CNN,
    MLP,
    VGG,
    VGG11,
    RecurrentClassifier,
    NnxViT,
    ResNet,
    TextEncoder,
    ViT,
    mlp_spec,
    rnn_spec,
)


def shapes(model, x):
    """The variables' shapes: all tracing needs (no arrays are made, nothing is compiled)."""
    return jax.eval_shape(model.init, jax.random.key(0), x)


IMAGE = jnp.ones((1, 8, 8, 3))
SEQUENCE = jnp.ones((2, 4, 3))


# -- the reference models ----------------------------------------------------------------

REFERENCE = {
    "mlp": (MLP((5, 4, 3)), jnp.ones((2, 6))),
    "cnn": (CNN((3, 4), (5, 2), image_size=8), jnp.ones((1, 8, 8, 1))),
    "vgg11": (VGG(VGG11, width=1 / 16), IMAGE),
    "vgg11_bn": (VGG(VGG11, batch_norm=True, width=1 / 16), IMAGE),
    "resnet18": (ResNet((2, 2, 2, 2), (4, 8, 8, 8)), IMAGE),
    "resnet20": (ResNet((3, 3, 3), (4, 8, 8)), IMAGE),
    **{f"rnn_{cell}": (RecurrentClassifier((5,), 3, cell), SEQUENCE) for cell in ("simple", "lstm", "gru")},
    # Stock attention: the heads, q/k's and v/o's dims inside them (Heads), as vit_spec has them.
    "vit": (ViT(patch=4, dim=8, heads=2, blocks=2, mlp=6), jnp.ones((1, 8, 8))),
    "text": (TextEncoder(vocab=7, length=5, dim=8, heads=2, blocks=1, mlp=6), jnp.ones((2, 4), jnp.int32)),
}


@pytest.mark.parametrize("name", list(REFERENCE))
def test_traced_spec_equals_the_hand_spec(name):
    model, x = REFERENCE[name]
    traced = jfusion.trace_spec(model.apply, shapes(model, x), x, check=False)
    assert_same_groups(traced, model.spec())


def test_traced_views_and_names_are_readable():
    model, x = REFERENCE["cnn"]
    traced = jfusion.trace_spec(model.apply, shapes(model, x), x, check=False)
    # The 2x2x4 map after two pools flattens into Dense_0's input: 4 positions x Conv_1's group.
    assert traced["params/Dense_0/kernel"].axes == ((4, "Conv_1"), "Dense_0")
    assert traced.groups == ("Conv_0", "Conv_1", "Dense_0")
    model, x = REFERENCE["resnet20"]
    traced = jfusion.trace_spec(model.apply, shapes(model, x), x, check=False)
    assert traced["params/stage1_block0/proj_conv/kernel"].axes == (None, None, "stage0_block0/conv2", "stage1_block0/conv2")
    assert traced["batch_stats/stage1_block0/bn1/mean"].axes == ("stage1_block0/conv1",)


def test_traced_spec_of_a_recurrent_cell_carries_its_group_on_both_axes():
    model, x = REFERENCE["rnn_lstm"]
    traced = jfusion.trace_spec(model.apply, shapes(model, x), x, check=False)
    assert traced["params/Recurrent_0/hi/kernel"].axes == ("Recurrent_0", "Recurrent_0")


# -- models written for this file ---------------------------------------------------------


class ResidualCNN(nn.Module):
    """A block with a 1x1 projection shortcut, then global average pooling."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), name="stem")(x))
        y = nn.relu(nn.Conv(5, (3, 3), name="conv_a")(x))
        y = nn.Conv(6, (3, 3), name="conv_b")(y)
        x = nn.relu(y + nn.Conv(6, (1, 1), name="shortcut")(x))
        return nn.Dense(3, name="head")(x.mean(axis=(1, 2)))


RESIDUAL_SPEC = jfusion.Spec(
    {
        "params/stem/kernel": (None, None, None, "a"),
        "params/stem/bias": ("a",),
        "params/conv_a/kernel": (None, None, "a", "b"),
        "params/conv_a/bias": ("b",),
        "params/conv_b/kernel": (None, None, "b", "stream"),
        "params/conv_b/bias": ("stream",),
        "params/shortcut/kernel": (None, None, "a", "stream"),
        "params/shortcut/bias": ("stream",),
        "params/head/kernel": ("stream", None),
        "params/head/bias": (None,),
    }
)


class LayerNormMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.LayerNorm(name="norm_0")(nn.Dense(6, name="Dense_0")(x)))
        x = nn.relu(nn.LayerNorm(name="norm_1")(nn.Dense(5, name="Dense_1")(x)))
        return nn.Dense(3, name="Dense_2")(x)


LAYERNORM_SPEC = jfusion.Spec(
    {
        **mlp_spec(3).as_dict(),
        **{f"params/norm_{i}/{leaf}": (f"h{i}",) for i in range(2) for leaf in ("scale", "bias")},
    }
)


class SeparableBlock(nn.Module):
    """A depthwise conv with channel multiplier 2, then a pointwise 1x1 conv."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), name="stem")(x))
        x = nn.Conv(8, (3, 3), feature_group_count=4, name="depthwise")(x)
        x = nn.relu(nn.Conv(6, (1, 1), name="pointwise")(x))
        return nn.Dense(3, name="head")(x.mean(axis=(1, 2)))


# Depthwise output channel 2g + j is multiplier j of input channel g: a view (channel, multiplier),
# both permutable (the multipliers alike in every channel).
SEPARABLE_SPEC = jfusion.Spec(
    {
        "params/stem/kernel": (None, None, None, "c"),
        "params/stem/bias": ("c",),
        "params/depthwise/kernel": (None, None, None, ("c", "m")),
        "params/depthwise/bias": (("c", "m"),),
        "params/pointwise/kernel": (None, None, ("c", "m"), "p"),
        "params/pointwise/bias": ("p",),
        "params/head/kernel": ("p", None),
        "params/head/bias": (None,),
    }
)


class ScanGRU(nn.Module):
    """A GRU cell scanned over time with ``nn.scan``, read out from its last carry."""

    @nn.compact
    def __call__(self, x):
        scanned = nn.scan(
            nn.GRUCell, variable_broadcast="params", split_rngs={"params": False}, in_axes=1, out_axes=1
        )
        carry, _ = scanned(5, name="gru")(jnp.zeros((x.shape[0], 5)), x)
        return nn.Dense(3, name="head")(carry)


class TiedMLP(nn.Module):
    """One Dense layer applied twice: its kernel reads and writes the same group."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(5, name="embed")(x))
        shared = nn.Dense(5, name="shared")
        x = nn.relu(shared(nn.relu(shared(x))))
        return nn.Dense(3, name="head")(x)


TIED_SPEC = jfusion.Spec(
    {
        "params/embed/kernel": (None, "h"),
        "params/embed/bias": ("h",),
        "params/shared/kernel": ("h", "h"),
        "params/shared/bias": ("h",),
        "params/head/kernel": ("h", None),
        "params/head/bias": (None,),
    }
)

OWN = {
    "residual_cnn": (ResidualCNN(), IMAGE, RESIDUAL_SPEC),
    "layernorm_mlp": (LayerNormMLP(), jnp.ones((2, 4)), LAYERNORM_SPEC),
    "separable": (SeparableBlock(), IMAGE, SEPARABLE_SPEC),
    "scan_gru": (ScanGRU(), SEQUENCE, rnn_spec("gru", 1, layer_names=["gru"], readout="head")),
    "tied": (TiedMLP(), jnp.ones((2, 4)), TIED_SPEC),
}


# trace_spec's own check runs on these (each check compiles a few programs; the rest are
# checked by their hand specs).
CHECKED = ("residual_cnn", "separable", "scan_gru")


@pytest.fixture(scope="module")
def own_traced():
    """Each model of this file: its variables and its traced spec."""
    out = {}
    for name, (model, x, _) in OWN.items():
        variables = random_variables(model, x.shape[1:], 0)
        out[name] = variables, jfusion.trace_spec(model.apply, variables, x, check=name in CHECKED)
    return out


@pytest.mark.parametrize("name", list(OWN))
def test_traced_spec_of_models_written_here(name, own_traced):
    _, traced = own_traced[name]
    assert_same_groups(traced, OWN[name][2])


@pytest.mark.filterwarnings("ignore::jfusion.ResidualStreamWarning")  # planted truth: weight alignment is exact here
@pytest.mark.parametrize("name", list(OWN))
def test_planted_permutations_of_traced_groups_are_recovered_by_fuse(name, own_traced):
    variables, traced = own_traced[name]
    permuted, _ = jfusion.permute(variables, traced, jax.random.key(3))
    assert max_tree_difference(permuted, variables) > 0.1
    fused = jfusion.fuse([variables, permuted], traced).params
    assert max_tree_difference(fused, variables) < 1e-5


def test_a_wrong_hand_spec_fails_the_check_where_the_traced_one_passes(own_traced):
    # A common slip: the 1x1 shortcut's input axis left ungrouped, though it reads the stem's group.
    variables, traced = own_traced["residual_cnn"]
    model, x, _ = OWN["residual_cnn"]
    wrong = jfusion.Spec({**RESIDUAL_SPEC.as_dict(), "params/shortcut/kernel": (None, None, None, "stream")})
    jfusion.check_spec(model.apply, variables, traced, x)
    with pytest.raises(jfusion.SpecError, match=r"group 'a' \(outputs change"):
        jfusion.check_spec(model.apply, variables, wrong, x, seed=1)  # seed 0 draws 'a' unpermuted


# -- flax.nnx ------------------------------------------------------------------------------


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.first = nnx.Linear(6, 5, rngs=rngs)
        self.norm = nnx.LayerNorm(5, rngs=rngs)
        self.second = nnx.Linear(5, 4, rngs=rngs)
        self.out = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.second(nnx.relu(self.norm(self.first(x))))))


def test_nnx_module_traces_to_paths_of_its_state():
    # (test_spec shows that fuse takes nnx states under these paths.)
    module = NnxMLP(nnx.Rngs(0))
    traced = jfusion.trace_spec(module, jax.random.normal(jax.random.key(1), (4, 6)))  # checked too
    hand = {**mlp_spec(["first", "second", "out"], prefix="").as_dict(), "norm/scale": ("h0",), "norm/bias": ("h0",)}
    assert_same_groups(traced, jfusion.Spec(hand))
    assert traced.groups == ("first", "second")
    assert set(traced.paths) == set(flatten(nnx.split(module)[1])[0])


def test_traced_heads_of_an_nnx_vit_are_named_after_the_attention():
    model = NnxViT(image_size=8, patch=4, dim=8, heads=2, blocks=1, mlp=6, rngs=nnx.Rngs(0))
    traced = jfusion.trace_spec(model, jnp.ones((2, 8, 8)), check=False)  # the hand spec: test_heads
    assert_same_groups(traced, model.spec())
    assert traced.heads == (("blocks/0/attn", ("blocks/0/attn/key+query", "blocks/0/attn/value")),)
    assert traced["blocks/0/attn/query/kernel"].axes == ("blocks/0/attn/out", jfusion.Heads("blocks/0/attn"), "blocks/0/attn/key+query")
    assert traced.units == ("blocks/0/attn/out", "blocks/0/attn", "blocks/0/fc1")  # the stream first, as vit_spec


class NnxQKNormAttention(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Linear(4, 8, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(2, 8, decode=False, normalize_qk=True, rngs=rngs)
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        x = self.embed(x)
        return self.head((x + self.attn(x)).mean(axis=1))


def test_heads_with_a_shared_qk_norm_scale_stay_in_place():
    # The (hd,) LayerNorm scales are shared by every head: no per-head permutation of q/k's
    # dims keeps them, so no Heads is inferred, and the values' dims move alike in all heads.
    traced = jfusion.trace_spec(NnxQKNormAttention(nnx.Rngs(0)), jnp.ones((2, 5, 4)), check=False)
    assert traced.heads == ()
    assert traced["attn/query/kernel"].axes == ("attn/out", None, None)
    assert traced["attn/value/kernel"].axes == ("attn/out", None, "attn/value")


class NnxConvBN(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.bn(self.conv(x))).mean(axis=(1, 2)))


def test_nnx_batch_norm_in_training_mode_keeps_its_running_statistics_in_the_group():
    # Training mode only writes the running mean and variance; they are traced through the
    # module's updated state, so they still move with their channels.
    traced = jfusion.trace_spec(NnxConvBN(nnx.Rngs(0)), IMAGE, check=False)
    hand = {
        "conv/kernel": (None, None, None, "c"),
        "conv/bias": ("c",),
        **{f"bn/{leaf}": ("c",) for leaf in ("scale", "bias", "mean", "var")},
        "head/kernel": ("c", None),
        "head/bias": (None,),
    }
    assert_same_groups(traced, jfusion.Spec(hand))


# -- primitives without a rule -------------------------------------------------------------

flip_features_p = Primitive("flip_features")  # reverses the last axis: not equivariant
flip_features_p.def_impl(lambda x: x[..., ::-1])
flip_features_p.def_abstract_eval(lambda aval: aval)


class FlippedMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = flip_features_p.bind(nn.relu(nn.Dense(5, name="Dense_0")(x)))
        x = nn.relu(nn.Dense(4, name="Dense_1")(x))
        return nn.Dense(3, name="Dense_2")(x)


def test_an_unknown_primitive_is_named_with_its_leaves_and_source_line():
    model, x = FlippedMLP(), jnp.ones((2, 6))
    variables = random_variables(model, x.shape[1:], 0)
    with pytest.raises(jfusion.TraceError, match=r"'flip_features'.*test_trace\.py:\d+.*params/Dense_0/kernel"):
        jfusion.trace_spec(model.apply, variables, x)
    # Conservatively: the flipped features stay in place, the next group is still found.
    traced = jfusion.trace_spec(model.apply, variables, x, unknown="tie", check=False)
    jfusion.check_spec(model.apply, variables, traced, x)  # eagerly: the primitive has no lowering
    assert traced["params/Dense_0/kernel"].axes == (None, None)
    assert traced["params/Dense_1/kernel"].axes == (None, "Dense_1")
    assert traced["params/Dense_2/kernel"].axes == ("Dense_1", None)


def test_every_leaf_is_labelled_and_unknown_modes_are_checked():
    model, x = REFERENCE["mlp"]
    variables = shapes(model, x)
    traced = jfusion.trace_spec(model.apply, variables, x, check=False)
    assert set(traced.paths) == set(flatten(variables)[0])
    with pytest.raises(ValueError, match="unknown must be one of"):
        jfusion.trace_spec(model.apply, variables, x, unknown="guess")


def test_traced_spec_is_a_static_argument_like_a_hand_one():
    model, x = REFERENCE["mlp"]
    variables = shapes(model, x)
    first = jfusion.trace_spec(model.apply, variables, x, check=False)
    again = jfusion.trace_spec(model.apply, variables, x, check=False)
    assert first == again and hash(first) == hash(again)
    np.testing.assert_equal(first.groups, again.groups)
