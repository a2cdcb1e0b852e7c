"""Generalized pruning and barycenter fusion, checked against planted duplicates and permutations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from planted import duplicate_neurons, max_tree_difference

import jfusion
from jfusion.models import MLP, mlp_spec

MODEL, WIDE = MLP((20, 12, 5)), MLP((40, 24, 5))
SPEC = mlp_spec(3)
X = jax.random.normal(jax.random.key(9), (16, 7))


def init(model, seed):
    return model.init(jax.random.key(seed), jnp.ones((1, 7)))


def test_duplicated_neurons_compress_back_to_the_original_by_merging_and_by_barycenter():
    original = init(MODEL, 0)
    doubled = duplicate_neurons(original, SPEC, jax.random.key(3))
    merged = jfusion.prune(doubled, SPEC, 0.5).params
    np.testing.assert_allclose(MODEL.apply(merged, X), MODEL.apply(original, X), atol=1e-5)
    barycenter = jfusion.barycenter_fuse([doubled], SPEC, widths={"h0": 20, "h1": 12})
    np.testing.assert_allclose(MODEL.apply(barycenter.params, X), MODEL.apply(original, X), atol=1e-5)
    assert bool(barycenter.converged) and int(barycenter.iterations) >= 1


def test_deleting_keeps_the_neurons_with_the_largest_incoming_l1_norm():
    params = init(MODEL, 1)
    pruned = jfusion.prune(params, SPEC, {"h0": 8}, method="delete").params
    dense = params["params"]
    incoming = jnp.concatenate([dense["Dense_0"]["kernel"], dense["Dense_0"]["bias"][None]], 0)
    kept = np.sort(np.argsort(-np.abs(np.asarray(incoming)).sum(0))[:8])
    np.testing.assert_array_equal(pruned["params"]["Dense_0"]["kernel"], dense["Dense_0"]["kernel"][:, kept])
    np.testing.assert_array_equal(pruned["params"]["Dense_0"]["bias"], dense["Dense_0"]["bias"][kept])
    np.testing.assert_array_equal(pruned["params"]["Dense_1"]["kernel"], dense["Dense_1"]["kernel"][kept])
    np.testing.assert_array_equal(pruned["params"]["Dense_2"]["kernel"], dense["Dense_2"]["kernel"])


def test_merging_every_neuron_into_its_own_cluster_changes_nothing():
    params = init(MODEL, 2)
    same = jfusion.prune(params, SPEC, 1.0).params
    np.testing.assert_allclose(MODEL.apply(same, X), MODEL.apply(params, X), atol=1e-5)


def test_barycenter_of_permuted_copies_returns_the_network_from_any_start():
    original = init(MODEL, 0)
    copies = [jfusion.permute(original, SPEC, jax.random.key(k))[0] for k in range(4)]
    result = jfusion.barycenter_fuse(copies, SPEC, target=init(MODEL, 42), model_weights=[1.0, 2.0, 3.0, 4.0])
    np.testing.assert_allclose(MODEL.apply(result.params, X), MODEL.apply(original, X), atol=1e-5)
    assert bool(result.converged) and float(result.change) == 0.0


def test_barycenter_into_a_larger_width_and_its_report():
    models = [init(MODEL, k) for k in range(3)]
    wide = jfusion.barycenter_fuse(models, SPEC, target=init(WIDE, 7), max_iterations=30)
    assert wide.params["params"]["Dense_0"]["kernel"].shape == (7, 40)
    assert 1 <= int(wide.iterations) <= 30
    assert bool(wide.converged) == (float(wide.change) <= 1e-5)
    with pytest.warns(jfusion.ConvergenceWarning, match="stopped at max_iterations=1"):
        capped = jfusion.barycenter_fuse(models, SPEC, target=init(WIDE, 7), max_iterations=1)
    assert int(capped.iterations) == 1 and not bool(capped.converged)


def test_one_barycenter_step_from_a_model_is_ot_fusion():
    models = [init(MODEL, k) for k in range(3)]
    step = jfusion.barycenter_fuse(models, SPEC, target=1, max_iterations=1, tolerance=np.inf)
    assert max_tree_difference(step.params, jfusion.fuse(models, SPEC, target=1).params) <= 1e-6


def test_pruning_the_ensemble_network_gives_the_partial_fusion_trade_off():
    models = [init(MODEL, k) for k in range(2)]
    ensemble = jfusion.partial_fuse(models, SPEC, 1.0).params  # block-diagonal, width 2n
    logits = jfusion.ensemble_apply(MODEL.apply, models, X)
    np.testing.assert_allclose(WIDE.apply(jfusion.prune(ensemble, SPEC, 1.0).params, X), logits, atol=1e-5)
    budget = jfusion.prune(ensemble, SPEC, {"h0": 30, "h1": 18}).params
    assert budget["params"]["Dense_1"]["kernel"].shape == (30, 18)
    assert bool(jnp.all(jnp.isfinite(MLP((30, 18, 5)).apply(budget, X))))


def test_bad_widths():
    params = init(MODEL, 0)
    with pytest.raises(jfusion.FusionInputError, match=r"group 'h0': cannot prune 20 neurons to 30"):
        jfusion.prune(params, SPEC, {"h0": 30}).params
    with pytest.raises(jfusion.FusionInputError, match=r"multiplier must be in \(0, 1\]"):
        jfusion.prune(params, SPEC, 1.5).params
    with pytest.raises(jfusion.FusionInputError, match="'merge' or 'delete'"):
        jfusion.prune(params, SPEC, 0.5, method="shrink").params
