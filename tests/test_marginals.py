"""Importance marginals, unbalanced OT and OTFusion's ground-metric options (issue 13).

Tiny MLPs (4 -> 8 -> 3, one hidden group h0) and no training: each fusion here is one small
program, and the solver checks call the solver on a cost directly.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jfusion
from jfusion.core.plans import importance_measure
from jfusion.models import MLP, mlp_spec

SPEC = mlp_spec(2)
X = jax.random.normal(jax.random.key(2), (16, 4))
SINKHORN = jfusion.Sinkhorn(epsilon=1e-3)


def dominant_network():
    """An MLP whose hidden neurons 2 and 5 carry 10x the incoming weights of the others."""
    params = MLP((8, 3)).init(jax.random.key(0), X)
    kernel = params["params"]["Dense_0"]["kernel"]
    params["params"]["Dense_0"]["kernel"] = kernel.at[:, jnp.array([2, 5])].multiply(10.0)
    return params


def h0_rows(params) -> np.ndarray:
    """Group h0's weight supports: each hidden neuron's incoming kernel column and bias."""
    layer = params["params"]["Dense_0"]
    return np.concatenate([np.asarray(layer["kernel"]).T, np.asarray(layer["bias"])[:, None]], axis=1)


def l1_masses(params) -> np.ndarray:
    norms = np.abs(h0_rows(params)).sum(axis=1)
    return norms / norms.sum()


@pytest.fixture(scope="module")
def importance_fusion():
    """A dominant-neuron network fused with a shuffled copy of itself, l1 importance, Sinkhorn."""
    params = dominant_network()
    shuffled, perms = jfusion.permute(params, SPEC, jax.random.key(1))
    fused = jfusion.fuse([params, shuffled], SPEC, solver=SINKHORN, importance="l1")
    return params, shuffled, np.asarray(perms["h0"]), fused


def test_l1_importance_plans_have_the_importances_as_marginals(importance_fusion):
    params, shuffled, _, fused = importance_fusion
    plan = np.asarray(fused.plans["h0"].plan[1])
    masses = l1_masses(params)
    assert masses[[2, 5]].sum() > 0.5  # the dominant neurons hold most of the mass
    np.testing.assert_allclose(plan.sum(axis=1), l1_masses(shuffled), atol=1e-4)  # the model's side
    np.testing.assert_allclose(plan.sum(axis=0), masses, atol=1e-4)  # the reference's side
    assert np.abs(plan.sum(axis=0) - 1 / 8).max() > 0.1  # not the uniform marginals
    assert bool(fused.plans["h0"].converged.all())


def test_a_shuffled_copy_is_recovered_with_importance_and_small_epsilon(importance_fusion):
    params, shuffled, perm, fused = importance_fusion
    plan = np.asarray(fused.plans["h0"].plan[1])
    np.testing.assert_array_equal(plan.argmax(axis=1), perm)  # shuffled neuron q is neuron perm[q]
    model = MLP((8, 3))
    np.testing.assert_allclose(model.apply(fused.params, X), model.apply(params, X), atol=1e-4)
    for path in ("Dense_0", "Dense_1"):
        np.testing.assert_allclose(fused.params["params"][path]["kernel"], params["params"][path]["kernel"], atol=1e-4)
    # align takes the same importance (and runs the same program).
    aligned = jfusion.align([params, shuffled], SPEC, solver=SINKHORN, importance="l1").aligned
    np.testing.assert_allclose(aligned["params"]["Dense_0"]["kernel"][1], params["params"]["Dense_0"]["kernel"], atol=1e-4)


def test_barycenter_fusion_takes_importance_marginals(importance_fusion):
    params, shuffled, _, _ = importance_fusion
    result = jfusion.barycenter_fuse([params, shuffled], SPEC, solver=SINKHORN, importance="l1", max_iterations=3)
    np.testing.assert_allclose(np.asarray(result.plans["h0"].plan[1]).sum(axis=0), l1_masses(params), atol=1e-4)
    np.testing.assert_allclose(result.params["params"]["Dense_0"]["kernel"], params["params"]["Dense_0"]["kernel"], atol=1e-4)


def test_importance_measures_follow_the_norms_and_keep_zero_neurons_positive():
    rows = jnp.array([[3.0, -4.0], [0.0, 0.0], [1.0, 0.0]])
    np.testing.assert_allclose(importance_measure(rows, "l1"), np.array([7.0, 0.0, 1.0]) / 8.0, atol=1e-7)
    np.testing.assert_allclose(importance_measure(rows, "l2"), np.array([5.0, 0.0, 1.0]) / 6.0, atol=1e-7)
    np.testing.assert_allclose(importance_measure(rows, "uniform"), np.full(3, 1 / 3))
    assert float(importance_measure(rows, "l1")[1]) > 0  # a zero support keeps a tiny mass
    # Scale-free, and inside float32 for huge weights.
    np.testing.assert_allclose(importance_measure(rows * 1e19, "l2"), importance_measure(rows, "l2"), rtol=1e-6)
    np.testing.assert_allclose(importance_measure(jnp.zeros((4, 2)), "l1"), np.full(4, 0.25))


def test_activation_importance_is_the_norm_of_the_activations():
    params = dominant_network()
    shuffled, _ = jfusion.permute(params, SPEC, jax.random.key(1))
    alignment = jfusion.ByActivations.from_module(MLP((8, 3)))
    fused = jfusion.fuse([params, shuffled], SPEC, solver=SINKHORN, importance="l2", alignment=alignment, inputs=X)
    pre = X @ params["params"]["Dense_0"]["kernel"] + params["params"]["Dense_0"]["bias"]
    norms = np.linalg.norm(np.asarray(pre), axis=0)
    np.testing.assert_allclose(np.asarray(fused.plans["h0"].plan[1]).sum(axis=0), norms / norms.sum(), atol=1e-4)


def test_fuse_matches_the_numpy_and_pot_reference_with_importance():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from numpy_reference import fuse_layers

    models = [dominant_network(), MLP((8, 3)).init(jax.random.key(7), X)]
    # float32 Sinkhorn meets importance marginals to 1e-5, not to the 1e-7 of the uniform
    # oracle (tests/test_engine.py); the weights then agree to ~2e-5 (the largest are ~3.5).
    solver = jfusion.Sinkhorn(threshold=1e-5)
    ours = jfusion.fuse(models, SPEC, solver=solver, importance="l1").params
    layers = [[(np.asarray(m["params"][f"Dense_{i}"]["kernel"]), np.asarray(m["params"][f"Dense_{i}"]["bias"])) for i in range(2)] for m in models]
    reference = fuse_layers(layers, solver="sinkhorn", threshold=1e-5, importance="l1")
    uniform = fuse_layers(layers, solver="sinkhorn", threshold=1e-5)
    for i, (kernel, bias) in enumerate(reference):
        np.testing.assert_allclose(ours["params"][f"Dense_{i}"]["kernel"], kernel, atol=5e-5)
        np.testing.assert_allclose(ours["params"][f"Dense_{i}"]["bias"], bias, atol=5e-5)
    assert np.abs(reference[0][0] - uniform[0][0]).max() > 1e-2  # importance changed the fusion


def test_exact_refuses_importance_before_tracing_also_under_jit():
    params = dominant_network()
    stacked = jfusion.stack_models([params, params])
    message = r"importance='l1' gives non-uniform marginals.*pass solver=jfusion\.Sinkhorn\(\)"
    with pytest.raises(jfusion.FusionInputError, match=message):
        jfusion.fuse(stacked, SPEC, importance="l1")
    with pytest.raises(jfusion.FusionInputError, match=message):
        jax.jit(lambda p: jfusion.fuse(p, SPEC, solver=jfusion.Exact(), importance="l1").params)(stacked)
    with pytest.raises(jfusion.FusionInputError, match="importance='l2'"):
        jfusion.barycenter_fuse(stacked, SPEC, importance="l2")
    with pytest.raises(jfusion.FusionInputError, match="importance='l1'"):
        jfusion.align(stacked, SPEC, importance="l1")
    with pytest.raises(jfusion.FusionInputError, match=r"importance must be one of \('uniform', 'l1', 'l2'\), got 'l3'"):
        jfusion.BalancedPlans(SINKHORN, importance="l3")


def extra_neuron_costs():
    """Costs between a model of 7 neurons and a reference of 6: the model's first 6 neurons
    are a shuffle of the reference's, its 7th is like none of them."""
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(6, 5))
    model = np.concatenate([reference[rng.permutation(6)], np.full((1, 5), 0.5)])
    return jfusion.GroundMetric()(jnp.asarray(model, jnp.float32), jnp.asarray(reference, jnp.float32))


def test_unbalanced_ot_sends_less_and_less_from_a_neuron_without_counterpart():
    cost = extra_neuron_costs()
    a, b = jnp.full((7,), 1 / 7), jnp.full((6,), 1 / 6)
    taus = (1.0, 0.99, 0.95, 0.9, 0.7)
    # One program for all five solves (each tau is a static setting).
    results = jax.jit(lambda c: [jfusion.Sinkhorn(tau_a=t, tau_b=t)(c, a, b) for t in taus])(cost)
    shares = []
    for result in results:
        plan = np.asarray(result.plan)
        assert bool(result.converged) and np.isfinite(plan).all()
        shares.append(plan.sum(axis=1)[-1] / plan.sum())
    assert shares[0] == pytest.approx(1 / 7, abs=1e-4)  # balanced: its full mass
    assert all(later < earlier for earlier, later in zip(shares, shares[1:])), shares
    assert shares[-1] < 1e-6


def with_extra_neuron(shared, other, value: float):
    """``shared``'s hidden neurons plus one whose incoming weights and bias are all ``value``
    (outgoing weights from ``other``)."""
    layer = shared["params"]["Dense_0"]
    return {"params": {
        "Dense_0": {
            "kernel": jnp.concatenate([layer["kernel"], jnp.full((4, 1), value)], axis=1),
            "bias": jnp.concatenate([layer["bias"], jnp.array([value])]),
        },
        "Dense_1": {
            "kernel": jnp.concatenate([shared["params"]["Dense_1"]["kernel"], other["params"]["Dense_1"]["kernel"][-1:]]),
            "bias": shared["params"]["Dense_1"]["bias"],
        },
    }}


def test_an_unbalanced_fusion_leaves_neurons_without_counterpart_unmixed():
    shared = MLP((6, 3)).init(jax.random.key(0), X)
    other = MLP((7, 3)).init(jax.random.key(1), X)
    # Six neurons in common (shuffled in the model); each side has one the other lacks.
    reference = with_extra_neuron(shared, other, -4.0)
    model, _ = jfusion.permute(with_extra_neuron(shared, other, 4.0), SPEC, jax.random.key(3))
    fused = jfusion.fuse([reference, model], SPEC, solver=jfusion.Sinkhorn(tau_a=0.5, tau_b=0.5))
    plan = np.asarray(fused.plans["h0"].plan[1])
    received = plan.sum(axis=0)
    assert received[-1] == 0 and received[:-1].min() > 0.1  # the reference's extra slot: nothing
    # Matched neurons are the reference's own, and the slot only the reference fills keeps its
    # neuron instead of averaging it with zeros: the fused first layer is the reference's.
    for leaf in ("kernel", "bias"):
        np.testing.assert_allclose(fused.params["params"]["Dense_0"][leaf], reference["params"]["Dense_0"][leaf], atol=1e-5)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(fused.params))


def test_partial_ot_stays_balanced_with_an_unbalanced_solver():
    # Sink-point partial OT needs its marginals met: every neuron's unit mass is either
    # matched or sent to the sink, and 6 - 2 units are matched.
    result, sink = jax.jit(lambda c: jfusion.Sinkhorn(tau_a=0.5, tau_b=0.5).partial(c, 2))(extra_neuron_costs()[:6])
    plan = np.asarray(result.plan)
    np.testing.assert_allclose(plan.sum(axis=1) + np.asarray(sink), np.ones(6), atol=1e-3)
    assert plan.sum() == pytest.approx(4.0, abs=1e-3)


def test_coverage_leaves_a_slot_to_the_models_that_reach_it():
    received = jnp.array([[0.2, 0.3, 0.5], [0.4, 0.0, 0.6]])
    np.testing.assert_array_equal(jfusion.BalancedPlans(SINKHORN).coverage("h0", received), [[1, 1, 1], [1, 0, 1]])


def test_log_normalisation_and_clipping_transform_the_costs_as_documented():
    rng = np.random.default_rng(3)
    x, y = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in ((5, 3), (4, 3)))
    raw = np.asarray(jfusion.GroundMetric()(x, y))
    np.testing.assert_allclose(jfusion.GroundMetric(normalize_cost="log")(x, y), np.log1p(raw), rtol=1e-6)
    ordered = np.sort(raw, axis=None)
    low, high = float(ordered[4]), float(ordered[-5])  # 4 costs below, 4 above
    clipped = np.asarray(jfusion.GroundMetric(clip_min=low, clip_max=high)(x, y))
    np.testing.assert_allclose(clipped, np.clip(raw, low, high), rtol=1e-6)
    assert np.isclose(clipped, high, rtol=1e-6).sum() == 5 and np.isclose(clipped, low, rtol=1e-6).sum() == 5
    # Clipping comes after the normalisation, as in OTFusion: bounds in the log cost's units.
    both = jfusion.GroundMetric(normalize_cost="log", clip_max=0.5)(x, y)
    np.testing.assert_allclose(both, np.minimum(np.log1p(raw), 0.5), rtol=1e-6)


def test_log_normalisation_can_change_an_exact_plan():
    # Squared distances on a line: the raw cost prefers the crossing pairs (4 + 4 < 0 + 16),
    # log(1 + C) the straight ones (log 1 + log 17 < 2 log 5).
    x = jnp.array([[0.0], [-2.0]])
    y = jnp.array([[0.0], [2.0]])
    a = b = jnp.full((2,), 0.5)
    raw = jfusion.GroundMetric("sqeuclidean")(x, y)
    assert np.asarray(raw).tolist() == [[0.0, 4.0], [4.0, 16.0]]
    logged = jfusion.GroundMetric("sqeuclidean", normalize_cost="log")(x, y)
    plans = jax.jit(lambda *costs: [jfusion.Exact()(c, a, b).plan for c in costs])(raw, logged)
    assert [np.asarray(p).argmax(axis=1).tolist() for p in plans] == [[1, 0], [0, 1]]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: jfusion.Sinkhorn(tau_a=0.0), r"Sinkhorn\.tau_a must be a number in \(0, 1\]"),
        (lambda: jfusion.Sinkhorn(tau_b=1.5), r"Sinkhorn\.tau_b must be a number in \(0, 1\]"),
        (lambda: jfusion.Sinkhorn(tau_a="0.5"), r"Sinkhorn\.tau_a must be a number"),
        (lambda: jfusion.GroundMetric(normalize_cost="log2"), "normalize_cost must be None, max, mean, median or log"),
        (lambda: jfusion.GroundMetric(clip_max=float("nan")), "clip_max must be None or a finite number"),
        (lambda: jfusion.GroundMetric(clip_min=2.0, clip_max=1.0), "clip_min=2.0 is larger than clip_max=1.0"),
    ],
    ids=["tau-zero", "tau-above-one", "tau-string", "normalize", "clip-nan", "clip-order"],
)
def test_invalid_settings_raise_clear_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()
