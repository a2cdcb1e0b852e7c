"""The identity prior (models sharing an initialisation) and plan_diagnostics."""

import jax
import numpy as np
import pytest

import jfusion
from jfusion.models import MLP, mlp_spec

MODEL, SPEC = MLP((8, 6, 3)), mlp_spec(3)
X = jax.random.normal(jax.random.key(0), (32, 4))
ACTIVATIONS = jfusion.ByActivations.from_module(MODEL)


@pytest.fixture(scope="module")
def models():
    params = MODEL.init(jax.random.key(1), X)
    shuffled, perms = jfusion.permute(params, SPEC, jax.random.key(2))
    return params, shuffled, perms


def _is_identity(plan):
    return np.allclose(plan, np.eye(plan.shape[0]) / plan.shape[0], atol=1e-6)


def test_a_large_identity_prior_keeps_a_shuffled_copy_in_place(models):
    params, shuffled, perms = models
    free = jfusion.align([params, shuffled], SPEC)
    held = jfusion.align([params, shuffled], SPEC, metric=jfusion.GroundMetric(identity_prior=100.0))
    for group, perm in perms.items():
        np.testing.assert_allclose(free.plans[group].plan[1], np.eye(len(perm))[np.asarray(perm)] / len(perm), atol=1e-6)
        assert _is_identity(held.plans[group].plan[1])
    assert jfusion.GroundMetric(identity_prior=0.0) == jfusion.GroundMetric()
    with pytest.raises(ValueError, match="identity_prior must be a finite number >= 0"):
        jfusion.GroundMetric(identity_prior=-1.0)


def test_the_identity_prior_on_rectangular_costs_keeps_indices():
    cost = jfusion.GroundMetric(identity_prior=2.0)(np.ones((3, 2)), np.ones((5, 2)))
    np.testing.assert_allclose(cost, 0.0)  # a zero cost has a zero mean: nothing to add
    metric = jfusion.GroundMetric("sqeuclidean", identity_prior=1.0)
    x, y = np.arange(3.0)[:, None], np.arange(4.0)[:, None]
    base = jfusion.GroundMetric("sqeuclidean")(x, y)
    np.testing.assert_allclose(metric(x, y) - base, float(base.mean()) * (1 - np.eye(3, 4)), rtol=1e-6)


def test_plan_diagnostics_tell_a_real_match_from_the_identity(models):
    params, shuffled, perms = models
    report = jfusion.plan_diagnostics(jfusion.align([params, shuffled], SPEC), [params, shuffled], activations=ACTIVATIONS, inputs=X)
    for group, perm in perms.items():
        d = report[group]
        np.testing.assert_allclose(d.sharpness, [1.0, 1.0], atol=1e-6)
        moved = np.mean(np.asarray(perm) != np.arange(len(perm)))
        np.testing.assert_allclose(d.off_identity, [0.0, moved], atol=1e-6)
        np.testing.assert_allclose(d.matched_correlation, [1.0, 1.0], atol=1e-5)
        assert float(d.identity_correlation[1]) < 0.9
        assert d.no_better_than_identity.tolist() == [True, False]
    # Plans held at the identity by the prior are no better than the identity.
    held = jfusion.align([params, shuffled], SPEC, metric=jfusion.GroundMetric(identity_prior=100.0))
    report = jfusion.plan_diagnostics(held, [params, shuffled], activations=ACTIVATIONS.fn, inputs=X)
    assert all(d.no_better_than_identity.tolist() == [True, True] for d in report.values())
    # Without activations only the plans' shapes; uniform plans are as blurred as can be.
    uniform = {"h0": np.full((2, 8, 8), 1 / 64)}
    d = jfusion.plan_diagnostics(uniform)["h0"]
    np.testing.assert_allclose(d.sharpness, [1 / 8, 1 / 8], rtol=1e-6)
    np.testing.assert_allclose(d.off_identity, [7 / 8, 7 / 8], rtol=1e-6)
    assert d.matched_correlation is None and d.no_better_than_identity is None
    with pytest.raises(jfusion.FusionInputError, match="needs the models"):
        jfusion.plan_diagnostics(held, activations=ACTIVATIONS, inputs=X)
