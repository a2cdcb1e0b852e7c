"""Planted truths for OT fusion: permuted and duplicated neurons must be recovered exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from planted import duplicate_neurons, max_tree_difference, permutation_matrix, random_variables

import jfusion
from jfusion.models import CNN, MLP, cnn_spec, mlp_spec
from jfusion.core.tree import flatten

MLPNET = MLP((400, 200, 100, 10))
MLPNET_SPEC = mlp_spec(4)
SMALL_CNN = CNN((8, 16), (32, 10))
SMALL_CNN_SPEC = cnn_spec(2, 2, 49)


def init(model, seed, shape):
    return random_variables(model, shape, seed)


@pytest.mark.parametrize(
    "model, spec, shape",
    [(MLPNET, MLPNET_SPEC, (784,)), (SMALL_CNN, SMALL_CNN_SPEC, (28, 28, 1))],
    ids=["mlpnet", "cnn-flatten"],
)
def test_planted_permutations_are_recovered_for_20_seeds(model, spec, shape):
    original = init(model, 0, shape)
    x = jax.random.normal(jax.random.key(1), (8, *shape))
    jfusion.check_spec(model.apply, original, spec, x)
    reference = model.apply(original, x)
    planted = [jfusion.permute(original, spec, jax.random.key(100 + seed)) for seed in range(20)]
    # The 20 fusions as one vmapped program: axes (seed, model, ...).
    batch = jfusion.stack_models([jfusion.stack_models([original, permuted]) for permuted, _ in planted])
    fused = jax.jit(jax.vmap(lambda models: jfusion.fuse(models, spec, target=0)))(batch)
    for seed, (_, perms) in enumerate(planted):
        params = jax.tree.map(lambda a: a[seed], fused.params)
        # The average of the original and the re-aligned copy is the original only if the copy is.
        assert max_tree_difference(params, original) <= 1e-5, f"seed {seed}"
        for group, perm in perms.items():
            # Permuted neuron q is original neuron perm[q]: the plan must send it exactly there.
            plan = np.asarray(fused.plans[group].plan[seed, 1]) * len(perm)
            np.testing.assert_array_equal(plan, permutation_matrix(np.asarray(perm)).T, err_msg=f"seed {seed}")
        np.testing.assert_allclose(model.apply(params, x), reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "model, wide_model, spec, shape",
    [
        (MLP((40, 30, 20, 10)), MLP((80, 60, 40, 10)), mlp_spec(4), (50,)),
        (SMALL_CNN, CNN((16, 32), (64, 10)), SMALL_CNN_SPEC, (28, 28, 1)),
    ],
    ids=["mlp", "cnn-flatten"],
)
def test_duplicated_neurons_fused_into_the_original_widths_give_the_original(model, wide_model, spec, shape):
    original = init(model, 0, shape)
    doubled = duplicate_neurons(original, spec, jax.random.key(7))
    x = jax.random.normal(jax.random.key(1), (8, *shape))
    np.testing.assert_allclose(wide_model.apply(doubled, x), model.apply(original, x), atol=1e-4)
    widths = spec.validate({p: v.shape for p, v in flatten(doubled)[0].items()})
    assert all(w % 2 == 0 for w in widths.values())

    # One model (the doubled one) fused into the original architecture.
    compressed = jfusion.fuse([doubled], spec, target=original).params
    assert max_tree_difference(compressed, original) <= 1e-5
    # Two models of different widths fused together (an unrolled, not vmapped, alignment).
    fused = jfusion.fuse([original, doubled], spec, target=0, model_weights=[0.3, 0.7]).params
    assert max_tree_difference(fused, original) <= 1e-5
    # By activations, each model through a module of its own widths.
    by_activations = jfusion.ByActivations.from_module(model, modules=(model, wide_model))
    fused = jfusion.fuse([original, doubled], spec, target=0, alignment=by_activations, inputs=x).params
    assert max_tree_difference(fused, original) <= 1e-5
    # The other direction: the original fused into the doubled architecture keeps its function.
    expanded = jfusion.fuse([original], spec, target=doubled).params
    np.testing.assert_allclose(wide_model.apply(expanded, x), model.apply(original, x), atol=1e-4)


@pytest.mark.parametrize("num_models", [2, 3, 5, 8])
def test_k_permuted_copies_with_model_weights_fuse_back_to_the_network(num_models):
    model, spec = MLP((24, 16, 5)), mlp_spec(3)
    original = init(model, 0, (12,))
    copies = [jfusion.permute(original, spec, jax.random.key(k))[0] for k in range(num_models)]
    weights = np.random.default_rng(num_models).uniform(0.1, 1.0, num_models)
    x = jax.random.normal(jax.random.key(1), (8, 12))
    fused = jfusion.fuse(copies, spec, model_weights=weights, target=num_models - 1).params
    np.testing.assert_allclose(model.apply(fused, x), model.apply(original, x), atol=1e-5)


def test_model_weights_enter_linearly_and_a_one_hot_weight_returns_that_model_aligned():
    model, spec = MLP((24, 16, 5)), mlp_spec(3)
    a, b = init(model, 1, (12,)), init(model, 2, (12,))
    x = jax.random.normal(jax.random.key(1), (8, 12))
    only_a = jfusion.fuse([a, b], spec, model_weights=[1.0, 0.0], target=1).params
    only_b = jfusion.fuse([a, b], spec, model_weights=[0.0, 1.0], target=1).params
    # Weight on A alone gives A permuted into B's order: A's function, not B's weights.
    np.testing.assert_allclose(model.apply(only_a, x), model.apply(a, x), atol=1e-5)
    assert max_tree_difference(only_b, b) == 0.0
    mixed = jfusion.fuse([a, b], spec, model_weights=[0.25, 0.75], target=1).params
    expected = jax.tree.map(lambda p, q: 0.25 * p + 0.75 * q, only_a, only_b)
    assert max_tree_difference(mixed, expected) <= 1e-6
    assert max_tree_difference(jfusion.fuse([a, b], spec, model_weights=[2.0, 6.0], target=1).params, mixed) <= 1e-6


def test_sinkhorn_with_small_epsilon_agrees_with_exact_on_well_separated_neurons():
    model, spec = MLP((64, 32, 10)), mlp_spec(3)
    original = init(model, 0, (20,))
    permuted, _ = jfusion.permute(original, spec, jax.random.key(3))
    noisy = jax.tree.map(
        lambda x: x + 0.01 * jax.random.normal(jax.random.key(4), x.shape), permuted
    )
    exact = jfusion.fuse([original, noisy], spec, solver=jfusion.Exact()).params
    sinkhorn = jfusion.fuse([original, noisy], spec, solver=jfusion.Sinkhorn(epsilon=1e-3)).params
    assert max_tree_difference(exact, sinkhorn) <= 1e-4
    plans = jfusion.align([original, noisy], spec, solver=jfusion.Sinkhorn(epsilon=1e-3)).plans
    assert bool(jnp.all(plans["h1"].converged))
    assert int(plans["h1"].iterations[1]) > 0


def test_a_larger_sinkhorn_epsilon_blurs_the_plan():
    model, spec = MLP((32, 10)), mlp_spec(2)
    original = init(model, 0, (20,))
    permuted, _ = jfusion.permute(original, spec, jax.random.key(3))
    sharp = jfusion.align([original, permuted], spec, solver=jfusion.Sinkhorn(epsilon=1e-3)).plans
    blurred = jfusion.align([original, permuted], spec, solver=jfusion.Sinkhorn(epsilon=1.0)).plans
    assert float(jnp.max(sharp["h0"].plan[1])) * 32 > 0.99
    assert float(jnp.max(blurred["h0"].plan[1])) * 32 < 0.9


def test_sinkhorn_that_hits_its_iteration_cap_warns():
    model, spec = MLP((32, 10)), mlp_spec(2)
    models = [init(model, k, (20,)) for k in range(2)]
    solver = jfusion.Sinkhorn(epsilon=1e-4, max_iterations=10)
    with pytest.warns(jfusion.ConvergenceWarning, match=r"group 'h0'.*did not converge for models \[1\].*10 iterations"):
        jfusion.fuse(models, spec, solver=solver).params
    # Under jit nothing can warn: the flags come back with the plans instead.
    plans = jax.jit(lambda ms: jfusion.align(ms, spec, solver=solver).plans)(models)
    assert not bool(plans["h0"].converged[1]) and int(plans["h0"].iterations[1]) == 10


def test_outgoing_weights_and_sweeps_still_recover_a_planted_permutation():
    model, spec = MLP((24, 16, 5)), mlp_spec(3)
    original = init(model, 0, (12,))
    permuted, _ = jfusion.permute(original, spec, jax.random.key(9))
    for alignment in [jfusion.ByWeights(outgoing=True), jfusion.ByWeights(outgoing=True, sweeps=3)]:
        fused = jfusion.fuse([original, permuted], spec, alignment=alignment).params
        assert max_tree_difference(fused, original) <= 1e-5


@pytest.mark.parametrize(
    "metric",
    [
        jfusion.GroundMetric("sqeuclidean"),
        jfusion.GroundMetric("cosine"),
        jfusion.GroundMetric(normalize_supports=True, normalize_cost="median"),
    ],
)
def test_every_ground_metric_recovers_a_planted_permutation(metric):
    model, spec = MLP((24, 16, 5)), mlp_spec(3)
    original = init(model, 0, (12,))
    permuted, _ = jfusion.permute(original, spec, jax.random.key(9))
    fused = jfusion.fuse([original, permuted], spec, metric=metric).params
    assert max_tree_difference(fused, original) <= 1e-5


def test_ground_metrics_match_numpy():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(5, 7)).astype(np.float32), rng.normal(size=(4, 7)).astype(np.float32)
    diff = x[:, None] - y[None]
    sq = (diff**2).sum(-1)
    cos = 1 - (x @ y.T) / np.outer(np.linalg.norm(x, axis=1), np.linalg.norm(y, axis=1))
    np.testing.assert_allclose(jfusion.GroundMetric()(x, y), np.sqrt(sq), rtol=1e-5)
    np.testing.assert_allclose(jfusion.GroundMetric("sqeuclidean")(x, y), sq, rtol=1e-5)
    np.testing.assert_allclose(jfusion.GroundMetric("cosine")(x, y), cos, atol=1e-6)
    np.testing.assert_allclose(
        jfusion.GroundMetric(normalize_cost="max")(x, y), np.sqrt(sq) / np.sqrt(sq).max(), rtol=1e-5
    )


def test_vanilla_average_and_ensemble():
    model = MLP((8, 3))
    a, b = init(model, 1, (5,)), init(model, 2, (5,))
    avg = jfusion.vanilla_average([a, b], model_weights=[1.0, 3.0]).params
    assert max_tree_difference(avg, jax.tree.map(lambda p, q: 0.25 * p + 0.75 * q, a, b)) <= 1e-7
    x = jax.random.normal(jax.random.key(0), (4, 5))
    logits = jfusion.ensemble_apply(model.apply, [a, b], x)
    np.testing.assert_allclose(logits, (model.apply(a, x) + model.apply(b, x)) / 2, atol=1e-6)
    probs = jnp.exp(jfusion.ensemble_apply(model.apply, [a, b], x, average="probabilities"))
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)
    with pytest.raises(jfusion.FusionInputError, match=r"params/Dense_0/bias is \(8,\) in model 0 but \(6,\) in model 1"):
        jfusion.vanilla_average([a, init(MLP((6, 3)), 0, (5,))]).params
