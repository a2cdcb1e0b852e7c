"""flax.nnx end to end: activations, BatchNorm recalibration, training, a traced ResNet, the README's example.

Kept fast: tiny widths and inputs, one model instance and one fusion per architecture
(module fixtures), traced specs with ``check=False`` where another test checks them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from planted import assert_same_groups, max_tree_difference
from readme import python_blocks

import jfusion
from jfusion import layers
from jfusion.core.nnx import fresh
from jfusion.core.tree import flatten, unflatten
from jfusion.models import mlp_spec


class MLP(nnx.Module):
    """Sows its pre-activations under its groups' names (those of ``mlp_spec``)."""

    def __init__(self, rngs):
        self.first = nnx.Linear(6, 5, rngs=rngs)
        self.second = nnx.Linear(5, 4, rngs=rngs)
        self.out = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        h = self.first(x)
        self.sow(nnx.Intermediate, "h0", h)
        h = self.second(nnx.relu(h))
        self.sow(nnx.Intermediate, "h1", h)
        return self.out(nnx.relu(h))


class ConvBN(nnx.Module):
    def __init__(self, rngs):
        self.conv1 = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.bn1 = nnx.BatchNorm(4, rngs=rngs)
        self.conv2 = nnx.Conv(4, 5, (3, 3), rngs=rngs)
        self.bn2 = nnx.BatchNorm(5, rngs=rngs)
        self.head = nnx.Linear(5, 2, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = nnx.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean(axis=(1, 2)))


class Block(nnx.Module):
    """A residual block whose 1x1 projection shortcut widens the stream."""

    def __init__(self, cin, cout, rngs):
        self.conv1 = nnx.Conv(cin, cout, (3, 3), use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(cout, rngs=rngs)
        self.conv2 = nnx.Conv(cout, cout, (3, 3), use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(cout, rngs=rngs)
        self.shortcut = nnx.Conv(cin, cout, (1, 1), use_bias=False, rngs=rngs)
        self.shortcut_bn = nnx.BatchNorm(cout, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.bn1(self.conv1(x)))
        return nnx.relu(self.bn2(self.conv2(h)) + self.shortcut_bn(self.shortcut(x)))


class ResNet(nnx.Module):
    def __init__(self, rngs):
        self.stem = nnx.Conv(3, 4, (3, 3), use_bias=False, rngs=rngs)
        self.stem_bn = nnx.BatchNorm(4, rngs=rngs)
        self.block = Block(4, 6, rngs)
        self.head = nnx.Linear(6, 2, rngs=rngs)

    def __call__(self, x):
        x = self.block(nnx.relu(self.stem_bn(self.stem(x))))
        return self.head(x.mean(axis=(1, 2)))


def randomized(module, seed):
    """The module's state with every leaf random (scales and variances in [0.5, 1.5]).

    Flax's zero biases and 0/1 statistics would let a mislabelled leaf go unnoticed.
    """
    leaves, treedef = flatten(nnx.state(module))
    rng = np.random.default_rng(seed)
    return unflatten(treedef, {
        p: jnp.asarray(rng.uniform(0.5, 1.5, x.shape) if p.endswith(("/var", "/scale")) else rng.normal(size=x.shape) * 0.5, jnp.float32)
        for p, x in leaves.items()
    })


def eval_outputs(module, state, x):
    return fresh(nnx.graphdef(module), state, train=False)(x)


X_VECTORS = jax.random.normal(jax.random.key(1), (16, 6))
X_IMAGES = jax.random.normal(jax.random.key(2), (2, 4, 6, 6, 3))  # 2 batches of 4 images


@pytest.fixture(scope="module")
def mlp():
    module = MLP(nnx.Rngs(0))
    state = randomized(module, 0)
    spec = mlp_spec(["first", "second", "out"], prefix="")
    permuted, _ = jfusion.permute(state, spec, jax.random.key(3))
    return module, state, spec, permuted


@pytest.fixture(scope="module")
def conv_bn():
    """A truth whose statistics are its own on the data, a permuted copy, and their fusion."""
    module = ConvBN(nnx.Rngs(0))
    truth = jfusion.recalibrate_batch_stats(module, randomized(module, 1), X_IMAGES)
    spec = jfusion.trace_spec(module, X_IMAGES[0], check=False)
    permuted, _ = jfusion.permute(truth, spec, jax.random.key(4))
    alignment = jfusion.ByActivations.from_module(module, points=spec)
    fused = jfusion.fuse([truth, permuted], spec, alignment=alignment, inputs=X_IMAGES[0]).params
    return module, truth, spec, fused


# -- activations ---------------------------------------------------------------------------


def test_nnx_activations_recover_a_planted_mlp_permutation(mlp):
    # Sown values here; the conv net below uses points (and the next test shows they agree).
    module, state, spec, permuted = mlp
    alignment = jfusion.ByActivations.from_module(module)
    fused = jfusion.fuse([state, permuted], spec, alignment=alignment, inputs=X_VECTORS).params
    assert type(fused) is type(state)
    assert max_tree_difference(fused, state) < 1e-5


def test_nnx_activations_are_a_pure_function_of_the_state(mlp):
    # sow appends to a tuple per call; a fresh module per call means one pass's values.
    module, state, spec, _ = mlp
    acts = jfusion.ByActivations.from_module(module).fn
    first, again = acts(state, X_VECTORS), acts(state, X_VECTORS)
    assert {g: a.shape for g, a in again.items()} == {"h0": (16, 5), "h1": (16, 4)}
    assert max_tree_difference(first, again) == 0
    points = jfusion.ByActivations.from_module(module, points=spec).fn(state, X_VECTORS)
    assert max_tree_difference(points, first) == 0  # a Linear's output is what it sows
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), state, state)
    assert jax.vmap(acts, in_axes=(0, None))(stacked, X_VECTORS)["h0"].shape == (2, 16, 5)
    with pytest.raises(jfusion.SpecError, match=r"group 'h0': module\(s\) \['nowhere'\]"):
        jfusion.ByActivations.from_module(module, points={"h0": ("first", "nowhere")}).fn(state, X_VECTORS)


def test_nnx_activations_recover_a_planted_conv_bn_permutation(conv_bn):
    _, truth, _, fused = conv_bn
    assert max_tree_difference(fused, truth) < 1e-5


# -- BatchNorm recalibration ---------------------------------------------------------------


def test_recalibration_computes_the_running_statistics_of_the_data(conv_bn):
    module, truth, _, _ = conv_bn
    # Independently for the first layer: the mean over batches of each batch's statistics.
    conv = jax.vmap(lambda x: nnx.merge(nnx.graphdef(module), truth).conv1(x))(X_IMAGES)
    np.testing.assert_allclose(truth["bn1"]["mean"][...], conv.mean(axis=(1, 2, 3)).mean(0), atol=1e-5)
    np.testing.assert_allclose(truth["bn1"]["var"][...], conv.var(axis=(1, 2, 3)).mean(0), atol=1e-4)


def test_recalibration_restores_a_fused_nets_corrupted_statistics(conv_bn):
    module, truth, _, fused = conv_bn
    stats, rest = nnx.split_state(fused, nnx.BatchStat, ...)
    corrupted = nnx.merge_state(rest, jax.tree.map(lambda v: v * 3.0 + 1.0, stats))
    assert max_tree_difference(eval_outputs(module, corrupted, X_IMAGES[0]), eval_outputs(module, truth, X_IMAGES[0])) > 0.1
    restored = jfusion.recalibrate_batch_stats(module, corrupted, X_IMAGES)
    assert jax.tree.structure(restored) == jax.tree.structure(truth)
    assert max_tree_difference(restored, truth) < 1e-4
    np.testing.assert_allclose(eval_outputs(module, restored, X_IMAGES[1]), eval_outputs(module, truth, X_IMAGES[1]), atol=1e-4)
    with pytest.raises(jfusion.FusionInputError, match="no nnx.BatchStat"):
        jfusion.recalibrate_batch_stats(MLP(nnx.Rngs(0)), nnx.state(MLP(nnx.Rngs(0))), X_VECTORS[None])


# -- a traced ResNet -----------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::jfusion.ResidualStreamWarning")  # planted truth: weight alignment is exact here
def test_trace_spec_on_an_nnx_resnet_is_checked_and_fuses_planted_permutations():
    module = ResNet(nnx.Rngs(0))
    state = randomized(module, 2)
    nnx.update(module, state)  # trace_spec checks on the module's own (random) state
    spec = jfusion.trace_spec(module, X_IMAGES[0])  # runs check_spec
    # By hand: the stem "s", the block's inner conv "c", and the stream "t" that the second
    # conv and the 1x1 shortcut both write (the shortcut reads the stem).
    def conv_bn(conv, bn, reads, writes):
        return {**layers.conv(conv, reads, writes, bias=False, nnx=True), **layers.batch_norm(bn, writes, nnx=True)}

    hand = jfusion.Spec({
        **conv_bn("stem", "stem_bn", None, "s"),
        **conv_bn("block/conv1", "block/bn1", "s", "c"),
        **conv_bn("block/conv2", "block/bn2", "c", "t"),
        **conv_bn("block/shortcut", "block/shortcut_bn", "s", "t"),
        **layers.dense("head", "t", None, nnx=True),
    })
    assert_same_groups(spec, hand)
    permuted, _ = jfusion.permute(state, spec, jax.random.key(5))
    assert max_tree_difference(permuted, state) > 0.1
    fused = jfusion.fuse([state, permuted], spec).params
    assert max_tree_difference(fused, state) < 1e-5


# -- the README's example: training two nnx nets, tracing, fusing, recalibrating ------------


def readme_example():
    return python_blocks("### flax.nnx")[0]


@pytest.mark.slow  # trains models
def test_the_readmes_nnx_example_trains_fuses_and_recalibrates():
    pytest.importorskip("sklearn")
    namespace = {}
    exec(compile(readme_example(), "README.md (flax.nnx)", "exec"), namespace)
    assert isinstance(namespace["states"], nnx.State)
    assert min(namespace["parents"]) > 0.7  # chance is 0.1
    assert namespace["spec"].groups == ("hidden",)
    assert namespace["accuracy"] > 0.7
