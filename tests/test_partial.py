"""Partial fusion: alpha = 0 is OT fusion, alpha = 1 the ensemble, and the layout's counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from planted import max_tree_difference, random_variables

import jfusion
from jfusion.models import MLP, ResNet, mlp_spec

WIDTH = 16
SPEC = mlp_spec(3)


def mlp(width=WIDTH):
    return MLP((width, width, 5))


def random_models(num):
    """Random weights and biases (flax initialises biases to zero, which would hide zeros)."""
    return [random_variables(mlp(), (7,), 100 + k, scale=1 / 3) for k in range(num)]


X = jax.random.normal(jax.random.key(9), (12, 7))


@pytest.mark.parametrize("num_models", [2, 3])
@pytest.mark.parametrize("solver", [jfusion.Exact(), jfusion.Sinkhorn(epsilon=0.01)], ids=["exact", "sinkhorn"])
def test_alpha_zero_is_ot_fusion_exactly(num_models, solver):
    models = random_models(num_models)
    weights = np.linspace(1.0, 2.0, num_models)
    partial = jfusion.partial_fuse(models, SPEC, 0.0, solver=solver, model_weights=weights)
    fused = jfusion.fuse(models, SPEC, solver=solver, model_weights=weights).params
    assert max_tree_difference(partial.params, fused) == 0.0
    assert all(bool(jnp.all(o == -1)) for o in partial.owners.values())


@pytest.mark.parametrize("num_models", [2, 3])
def test_alpha_one_is_the_logit_averaging_ensemble(num_models):
    models = random_models(num_models)
    weights = np.linspace(1.0, 2.0, num_models)
    partial = jfusion.partial_fuse(models, SPEC, 1.0, model_weights=weights)
    ensemble = jfusion.ensemble_apply(mlp().apply, models, X, model_weights=weights)
    np.testing.assert_allclose(mlp(num_models * WIDTH).apply(partial.params, X), ensemble, atol=1e-5)
    for owners in partial.owners.values():  # block by block: model 0, model 1, ...
        np.testing.assert_array_equal(owners, np.repeat(np.arange(num_models), WIDTH))


def test_sinkhorn_partial_fusion_at_alpha_one_is_close_to_the_ensemble():
    models = random_models(2)
    partial = jfusion.partial_fuse(models, SPEC, 1.0, solver=jfusion.Sinkhorn(epsilon=0.01))
    ensemble = jfusion.ensemble_apply(mlp().apply, models, X)
    np.testing.assert_allclose(mlp(2 * WIDTH).apply(partial.params, X), ensemble, atol=1e-3)


@pytest.mark.parametrize("alpha", [0.25, 0.5, 0.75])
def test_parameter_counts_match_the_layout_formula_for_two_models(alpha):
    inputs, classes = 7, 5
    isolated = round(alpha * WIDTH)
    fused = WIDTH - isolated  # neurons each model contributes to the fused block
    width = WIDTH + isolated  # [fused | isolated of model 0 | isolated of model 1]
    partial = jfusion.partial_fuse(random_models(2), SPEC, alpha)
    total = inputs * width + width + width * width + width + width * classes + classes
    assert int(partial.num_parameters) == total
    # Each model fills a WIDTH-neuron block; the blocks overlap on the fused neurons only.
    union = 2 * WIDTH - fused
    nonzero = inputs * union + union + (2 * WIDTH**2 - fused**2) + union + union * classes + classes
    assert int(partial.num_nonzero) == nonzero
    for owners in partial.owners.values():
        np.testing.assert_array_equal(owners, [-1] * fused + [0] * isolated + [1] * isolated)


def test_three_models_share_the_target_neurons_and_isolate_their_own():
    alpha = 0.5
    partial = jfusion.partial_fuse(random_models(3), SPEC, alpha, target=2)
    isolated = round(alpha * WIDTH)
    for owners in partial.owners.values():
        owners = np.asarray(owners)
        assert owners.shape == (WIDTH + 2 * isolated,)
        assert (owners == 0).sum() == isolated and (owners == 1).sum() == isolated
        # Target neurons matched by neither other model are the target's own (model 2).
        assert (owners == -1).sum() + (owners == 2).sum() == WIDTH
        assert list(owners) == sorted(owners)  # [fused | model 0 | model 1 | model 2]


def test_per_group_alpha_and_jit():
    models = random_models(2)
    run = jax.jit(lambda ms: jfusion.partial_fuse(ms, SPEC, {"h0": 0.5}))
    partial = run(models)
    assert partial.params["params"]["Dense_0"]["kernel"].shape == (7, WIDTH + WIDTH // 2)
    assert partial.params["params"]["Dense_1"]["kernel"].shape == (WIDTH + WIDTH // 2, WIDTH)


@pytest.mark.filterwarnings("ignore::jfusion.ResidualStreamWarning")  # planted truth: weight alignment is exact here
def test_partial_fusion_of_a_resnet_with_batchnorm_at_alpha_one_is_the_ensemble():
    # Two stages: residual streams, an identity and a projection shortcut, BatchNorm.
    model = ResNet(stage_sizes=(2, 1), stage_widths=(8, 16))
    models = [random_variables(model, (16, 16, 3), seed, scale=0.3) for seed in (0, 1)]
    spec = model.spec()
    x = jax.random.normal(jax.random.key(2), (4, 16, 16, 3))
    partial = jfusion.partial_fuse(models, spec, 1.0)
    ensemble = jfusion.ensemble_apply(lambda v, x: model.apply(v, x, train=False), models, x)
    wide = ResNet(stage_sizes=(2, 1), stage_widths=(16, 32))
    np.testing.assert_allclose(wide.apply(partial.params, x, train=False), ensemble, atol=1e-4, rtol=1e-4)
    half = jfusion.partial_fuse(models, spec, 0.5)
    assert int(half.num_nonzero) < int(half.num_parameters)
    assert half.params["params"]["stem_conv"]["kernel"].shape[-1] == 8 + 4


def test_bad_alpha_and_target():
    models = random_models(2)
    with pytest.raises(jfusion.FusionInputError, match=r"alpha for group 'h0' is 1.5; it must be in \[0, 1\]"):
        jfusion.partial_fuse(models, SPEC, 1.5)
    with pytest.raises(jfusion.FusionInputError, match=r"alpha names groups \['nope'\]"):
        jfusion.partial_fuse(models, SPEC, {"nope": 0.5})
    with pytest.raises(jfusion.FusionInputError, match="target must be a model index"):
        jfusion.partial_fuse(models, SPEC, 0.5, target=models[0])
