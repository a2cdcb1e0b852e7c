"""Reference VGG and ResNet models: their Specs match their variables and survive permutations."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jfusion
from jfusion.models import VGG, ResNet, ResNet18, ResNet20, resnet_spec, vgg_spec
from jfusion.core.tree import flatten, unflatten

# name: (model, its spec builder call, one input image's shape). Specs are built in the
# tests, so a builder that raises fails its own cases only.
CASES = {
    "vgg11": (VGG(), lambda: vgg_spec(), (32, 32, 3)),
    "vgg11_bn": (VGG(batch_norm=True), lambda: vgg_spec(batch_norm=True), (32, 32, 3)),
    "vgg11_bn_nobias_28x28": (
        VGG(batch_norm=True, use_bias=False, width=0.25),
        lambda: vgg_spec(batch_norm=True, use_bias=False),
        (28, 28, 1),
    ),
    "resnet18": (ResNet18(), lambda: resnet_spec((2, 2, 2, 2), (64, 128, 256, 512)), (32, 32, 3)),
    "resnet20": (ResNet20(), lambda: resnet_spec((3, 3, 3), (16, 32, 64)), (32, 32, 3)),
    "resnet20_w2": (ResNet20(width=2), lambda: resnet_spec((3, 3, 3), (32, 64, 128)), (32, 32, 3)),
    "resnet20_28x28": (ResNet20(), lambda: resnet_spec((3, 3, 3), (16, 32, 64)), (28, 28, 1)),
    # The stem is narrower than stage 0, so stage 0's first block projects too.
    "resnet_stem_projects": (
        ResNet((1, 2), (8, 16), stem_width=4),
        lambda: resnet_spec((1, 2), (8, 16), stem_width=4),
        (16, 16, 3),
    ),
}


def randomised(variables, seed=0):
    """Every leaf replaced by random values (variances positive), at a trainable scale.

    Fresh BatchNorm (mean 0, var 1, scale 1, bias 0) is invariant under any permutation, so
    a BN leaf labelled with the wrong group would pass a permutation test; random values
    make every leaf's labels matter. (numpy draws them: a jax.random call per leaf shape
    would compile a kernel per shape.)
    """
    rng = np.random.default_rng(seed)
    leaves, treedef = flatten(variables)
    out = {}
    for path, x in leaves.items():
        name = path.rsplit("/", 1)[-1]
        if name == "kernel":
            value = rng.normal(size=x.shape) * (1.5 / np.sqrt(np.prod(x.shape[:-1])))
        elif name in ("var", "scale"):
            value = rng.uniform(0.5, 1.5, size=x.shape)
        else:  # biases, means
            value = 0.3 * rng.normal(size=x.shape)
        out[path] = jnp.asarray(value, jnp.float32)
    return unflatten(treedef, out)


def setup_case(name, batch=2):
    """The model, its spec, randomised variables of ``model.init``'s structure, and inputs."""
    model, build_spec, image = CASES[name]
    spec = build_spec()
    x = jnp.asarray(np.random.default_rng(1).normal(size=(batch, *image)), jnp.float32)
    # Traced, not run: every value is replaced, and running init would compile a random
    # kernel per parameter shape.
    variables = randomised(jax.eval_shape(model.init, jax.random.key(0), x))
    return model, spec, variables, x


def eval_apply(model):
    return lambda variables, x: model.apply(variables, x, train=False)


def sown(model, variables, x):
    """``{group: [values]}`` from the ``activations`` collection, over all modules."""
    logits, state = model.apply(variables, x, train=False, mutable=["activations"])
    values = {}
    for path, value in flatten(state["activations"])[0].items():
        # sow stores a tuple per module: ".../<group>/<index>"
        values.setdefault(path.split("/")[-2], []).append(value)
    return logits, values


@pytest.mark.parametrize("name", list(CASES))
def test_spec_labels_exactly_the_variables_and_survives_permutations(name):
    model, spec, variables, x = setup_case(name)
    leaves = flatten(variables)[0]
    assert set(spec.paths) == set(leaves)
    assert "activations" not in variables
    widths = spec.validate({p: np.shape(v) for p, v in leaves.items()})
    assert set(widths) == set(spec.groups)
    assert spec == model.spec()
    jfusion.check_spec(eval_apply(model), variables, spec, x)


def widths_of(name):
    _, spec, variables, _ = setup_case(name)
    return spec.validate({p: np.shape(v) for p, v in flatten(variables)[0].items()})


def test_vgg_spec_widths():
    assert widths_of("vgg11") == {
        "c0": 64, "c1": 128, "c2": 256, "c3": 256, "c4": 512, "c5": 512, "c6": 512, "c7": 512
    }
    assert widths_of("vgg11_bn_nobias_28x28")["c7"] == 128


def test_resnet_spec_widths():
    widths = widths_of("resnet20_w2")
    assert {g: widths[g] for g in ("s0", "s1", "s2", "s0.b0", "s1.b2", "s2.b1")} == {
        "s0": 32, "s1": 64, "s2": 128, "s0.b0": 32, "s1.b2": 64, "s2.b1": 128
    }
    assert len(widths) == 3 + 9  # three streams, one inner group per block
    widths = widths_of("resnet18")
    assert [widths[f"s{s}"] for s in range(4)] == [64, 128, 256, 512]
    widths = widths_of("resnet_stem_projects")
    assert widths["stem"] == 4 and widths["s0"] == 8


@pytest.mark.parametrize("name", list(CASES))
def test_every_group_sows_its_preactivations(name):
    model, spec, variables, x = setup_case(name)
    widths = spec.validate({p: np.shape(v) for p, v in flatten(variables)[0].items()})
    logits, values = sown(model, variables, x)
    assert set(values) == set(spec.groups)
    for group, arrays in values.items():
        for a in arrays:
            assert a.shape[0] == x.shape[0] and a.shape[-1] == widths[group], (group, a.shape)
    if isinstance(model, ResNet):
        # The stream is sown at each of its writers: the stem and every block's sum.
        for s, blocks in enumerate(model.stage_sizes):
            from_stem = s == 0 and "stem" not in values
            assert len(values[f"s{s}"]) == blocks + from_stem
        last, head = values[f"s{len(model.stage_sizes) - 1}"][-1], variables["params"]["head"]
        features = jax.nn.relu(last)
    else:
        features = jax.nn.relu(values[f"c{len(values) - 1}"][0])
        for layer in reversed(model.features):  # VGG11 ends with a pool
            if layer != "M":
                break
            features = nn.max_pool(features, (2, 2), strides=(2, 2), padding="SAME")
        head = variables["params"]["Dense_0"]
    # Pre-activations: ReLU, pooling and the head turn the last one into the logits.
    features = jnp.mean(features, axis=(1, 2))
    expected = features @ head["kernel"] + head.get("bias", 0.0)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stage", [1, 2])
def test_a_shortcut_with_its_own_group_is_caught_and_named(stage):
    model, spec, variables, x = setup_case("resnet20")
    block = f"stage{stage}_block0"
    shortcut = [
        f"params/{block}/proj_conv/kernel",
        f"params/{block}/proj_bn/scale",
        f"params/{block}/proj_bn/bias",
        f"batch_stats/{block}/proj_bn/mean",
        f"batch_stats/{block}/proj_bn/var",
    ]
    axes = spec.as_dict()
    assert axes[shortcut[0]] == (None, None, f"s{stage - 1}", f"s{stage}")
    axes[shortcut[0]] = (None, None, f"s{stage - 1}", "shortcut")
    for path in shortcut[1:]:
        assert axes[path] == (f"s{stage}",)
        axes[path] = ("shortcut",)
    with pytest.raises(jfusion.SpecError) as err:
        jfusion.check_spec(eval_apply(model), variables, jfusion.Spec(axes), x)
    message = str(err.value)
    assert "group 'shortcut'" in message
    for path in shortcut:
        assert path in message


@pytest.mark.parametrize(
    "relabel, named",
    [
        # Conv_3's input and output groups swapped (both 256 wide, so the shapes still fit).
        ({"params/Conv_3/kernel": (None, None, "c3", "c2")}, "params/Conv_3/kernel"),
        # Two BatchNorms' running means swapped.
        (
            {"batch_stats/BatchNorm_2/mean": ("c3",), "batch_stats/BatchNorm_3/mean": ("c2",)},
            "batch_stats/BatchNorm_2/mean",
        ),
        # A running variance left ungrouped.
        ({"batch_stats/BatchNorm_5/var": (None,)}, "group 'c5'"),
    ],
    ids=["conv_in_out_swapped", "bn_means_swapped", "bn_var_ungrouped"],
)
def test_a_wrong_vgg_spec_is_caught(relabel, named):
    model, spec, variables, x = setup_case("vgg11_bn")
    axes = spec.as_dict()
    assert set(relabel) <= set(axes)
    axes.update(relabel)
    # Caught when the Spec is built (a group nothing reads) or, where its shapes still fit,
    # by permuting: either way the message names the culprit.
    with pytest.raises(jfusion.SpecError) as err:
        wrong = jfusion.Spec(axes)
        wrong.validate({p: np.shape(v) for p, v in flatten(variables)[0].items()})
        jfusion.check_spec(eval_apply(model), variables, wrong, x)
    assert named in str(err.value)


def test_train_mode_updates_batch_stats_of_every_bn():
    model = ResNet20()
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 32, 32, 3)), jnp.float32)
    variables = randomised(jax.eval_shape(model.init, jax.random.key(0), x))
    _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    old, new = flatten(variables["batch_stats"])[0], flatten(updates["batch_stats"])[0]
    assert set(old) == set(new)
    assert all(not np.allclose(old[p], new[p]) for p in old)


def test_init_gives_params_and_batch_stats_only():
    # The other tests trace init (jax.eval_shape) and randomise every value; run it once.
    model = ResNet20()
    x = jnp.zeros((2, 28, 28, 1))
    variables = model.init(jax.random.key(0), x)
    assert set(variables) == {"params", "batch_stats"}
    traced = jax.eval_shape(model.init, jax.random.key(0), x)
    assert jax.tree.structure(variables) == jax.tree.structure(traced)
    assert model.apply(variables, x).shape == (2, 10)
