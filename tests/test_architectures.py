"""Real architectures: residual networks with BatchNorm, activation alignment, BN recalibration."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from planted import permutation_matrix, random_variables

import jfusion
from jfusion.workflow.data import load_dataset
from jfusion.models import VGG, ResNet18
from jfusion.workflow.train import evaluate, train_models


RESNET18 = ResNet18()


@pytest.fixture(scope="module")
def resnet18():
    variables = random_variables(RESNET18, (32, 32, 3), seed=0)
    # 16 x 16 inputs still reach every stage (the last at 2 x 2) at a quarter of the convolutions.
    x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
    return variables, x, RESNET18.apply(variables, x, train=False)


@pytest.mark.filterwarnings("ignore::jfusion.ResidualStreamWarning")  # planted truth: weight alignment is exact here
@pytest.mark.parametrize(
    "alignment",
    [jfusion.ByWeights(), jfusion.ByActivations.from_module(RESNET18, train=False)],
    ids=["weights", "activations"],
)
def test_planted_permutations_of_a_full_width_resnet18_with_batchnorm_are_recovered(resnet18, alignment):
    variables, x, reference = resnet18
    spec = RESNET18.spec()
    # One program: the fusion's plans are the alignment's, and its params the recovered network's.
    fuse = jax.jit(lambda models: jfusion.fuse(models, spec, alignment=alignment, inputs=x))
    for seed in range(2):
        permuted, perms = jfusion.permute(variables, spec, jax.random.key(100 + seed))
        fused = fuse(jfusion.stack_models([variables, permuted]))
        for group, perm in perms.items():
            plan = np.asarray(fused.plans[group].plan[1]) * len(perm)
            np.testing.assert_array_equal(plan, permutation_matrix(perm).T, err_msg=f"seed {seed} {group}")
        np.testing.assert_allclose(RESNET18.apply(fused.params, x, train=False), reference, atol=1e-4, rtol=1e-4)


def test_vgg_with_batchnorm_is_recovered_by_weights_and_by_activations():
    model = VGG(features=(16, "M", 32, "M", 32), batch_norm=True)
    spec = model.spec()
    variables = random_variables(model, (16, 16, 3), seed=3)
    x = jax.random.normal(jax.random.key(1), (8, 16, 16, 3))
    permuted, _ = jfusion.permute(variables, spec, jax.random.key(4))
    for alignment in [jfusion.ByWeights(sweeps=2), jfusion.ByActivations.from_module(model, train=False)]:
        fused = jfusion.fuse([variables, permuted], spec, target=1, alignment=alignment, inputs=x).params
        np.testing.assert_allclose(
            model.apply(fused, x, train=False), model.apply(variables, x, train=False), atol=1e-4
        )


class PlainMLP(nn.Module):
    """A user's model that sows nothing: activations are captured at module outputs."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(12, name="first")(x))
        x = nn.relu(nn.Dense(8, name="second")(x))
        return nn.Dense(3, name="out")(x)


def test_activations_captured_at_named_modules_align_a_model_that_sows_nothing():
    model = PlainMLP()
    spec = jfusion.Spec(
        {
            "params/first/kernel": (None, "a"),
            "params/first/bias": ("a",),
            "params/second/kernel": ("a", "b"),
            "params/second/bias": ("b",),
            "params/out/kernel": ("b", None),
            "params/out/bias": (None,),
        }
    )
    variables = model.init(jax.random.key(0), jnp.ones((1, 5)))
    x = jax.random.normal(jax.random.key(1), (32, 5))
    permuted, perms = jfusion.permute(variables, spec, jax.random.key(2))
    alignment = jfusion.ByActivations.from_module(model, points={"a": "first", "b": "second"})
    result = jfusion.align([variables, permuted], spec, alignment=alignment, inputs=x)
    for group, perm in perms.items():
        np.testing.assert_array_equal(
            np.asarray(result.plans[group].plan[1]) * len(perm), permutation_matrix(perm).T
        )
    with pytest.raises(jfusion.SpecError, match=r"group 'a': no module 'missing' ran"):
        bad = jfusion.ByActivations.from_module(model, points={"a": "missing", "b": "second"})
        jfusion.align([variables, permuted], spec, alignment=bad, inputs=x)


class ConvBN(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(6, (3, 3), name="conv")(x)
        return nn.BatchNorm(use_running_average=not train, momentum=0.7, name="bn")(x)


def test_recalibration_gives_the_exact_mean_of_batch_statistics_and_touches_nothing_else():
    model = ConvBN()
    variables = model.init(jax.random.key(0), jnp.ones((1, 8, 8, 2)))
    variables = {**variables, "batch_stats": jax.tree.map(lambda s: s + 3.0, variables["batch_stats"])}
    batches = jax.random.normal(jax.random.key(1), (5, 16, 8, 8, 2)) * 2.0 + 0.5

    def train_apply(v, x):
        return model.apply(v, x, train=True, mutable=["batch_stats"])

    out = jfusion.recalibrate_batch_stats(train_apply, variables, batches)
    conv = nn.Conv(6, (3, 3))
    features = np.stack([np.asarray(conv.apply({"params": variables["params"]["conv"]}, b)) for b in batches])
    means = features.mean(axis=(1, 2, 3))
    variances = (features**2).mean(axis=(1, 2, 3)) - means**2  # flax keeps the biased variance
    np.testing.assert_allclose(out["batch_stats"]["bn"]["mean"], means.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["batch_stats"]["bn"]["var"], variances.mean(0), rtol=1e-4, atol=1e-5)
    assert out["params"] is variables["params"]
    with pytest.raises(jfusion.FusionInputError, match="no 'batch_stats' collection"):
        jfusion.recalibrate_batch_stats(train_apply, {"params": variables["params"]}, batches)


@pytest.mark.slow
def test_recalibration_after_fusing_batchnorm_networks_trained_on_digits_restores_accuracy():
    data = load_dataset("digits")
    model = VGG(features=(16, "M", 32), batch_norm=True)
    spec = model.spec()
    parents = train_models(model, (data.train_images, data.train_labels), [0, 1], epochs=6, batch_size=32)
    fused = jfusion.fuse(parents, spec).params

    def train_apply(v, x):
        return model.apply(v, x, train=True, mutable=["batch_stats"])

    batches = jnp.asarray(data.train_images[: 8 * 64]).reshape(8, 64, 8, 8, 1)
    recalibrated = jfusion.recalibrate_batch_stats(train_apply, fused, batches)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), recalibrated["params"], fused["params"])))
    assert not np.allclose(recalibrated["batch_stats"]["BatchNorm_1"]["var"], fused["batch_stats"]["BatchNorm_1"]["var"])

    def accuracy(v):
        return evaluate(model, v, data.test_images, data.test_labels)

    parent_accuracy = min(accuracy(jax.tree.map(lambda a: a[k], parents)) for k in range(2))
    assert parent_accuracy > 0.85
    assert accuracy(recalibrated) > accuracy(fused)
    assert accuracy(recalibrated) > 0.5 * parent_accuracy
