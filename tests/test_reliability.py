"""Bad, unusual and adversarial input: a clear error or a flagged diagnostic, never a silent wrong result."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import jfusion
from jfusion.core.align import warn_unconverged
from jfusion.models import MLP, mlp_spec
from planted import max_tree_difference

SPEC = mlp_spec(3)
MODEL = MLP((6, 6, 3))
X = jax.random.normal(jax.random.key(0), (20, 4))
ACTIVATIONS = jfusion.ByActivations.from_module(MODEL)


def network(seed=0, scale=1.0):
    params = MODEL.init(jax.random.key(seed), jnp.ones((1, 4)))
    return jax.tree.map(lambda x: x * scale + 0.1 * scale, params)  # non-zero biases


def permuted(params, seed=1):
    return jfusion.permute(params, SPEC, jax.random.key(seed))[0]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_activation_inputs_are_refused(bad):
    with pytest.raises(jfusion.FusionInputError, match="inputs has NaN or Inf"):
        jfusion.fuse([network(), network(1)], SPEC, alignment=ACTIVATIONS, inputs=X.at[3, 1].set(bad))


def test_an_empty_activation_batch_is_refused():
    with pytest.raises(jfusion.FusionInputError, match=r"inputs has shape \(0, 4\).*non-empty"):
        jfusion.fuse([network(), network(1)], SPEC, alignment=ACTIVATIONS, inputs=X[:0])


def test_the_exact_solver_flags_a_non_finite_cost_also_under_jit():
    cost = jnp.ones((4, 4)).at[1, 2].set(jnp.nan)
    uniform = jnp.full((4,), 0.25)
    assert not bool(jfusion.Exact()(cost, uniform, uniform).converged)
    assert not bool(jax.jit(jfusion.Exact())(cost, uniform, uniform).converged)
    # A constant cost (supports that do not tell neurons apart) makes the matching arbitrary.
    assert not bool(jfusion.Exact()(jnp.ones((4, 4)), uniform, uniform).converged)
    assert bool(jfusion.Exact()(jnp.ones((4, 4)).at[0, 1].set(0.0), uniform, uniform).converged)
    zeros = jax.tree.map(jnp.zeros_like, network())
    with pytest.warns(jfusion.ConvergenceWarning, match="not finite or constant.*matching is arbitrary"):
        jfusion.fuse([zeros, zeros], SPEC)
    # Traced inputs (no eager check can see them): the flag reaches the caller with the plans.
    nan_model = jax.tree.map(lambda x: x.at[0].set(jnp.nan), network(1))
    plans = jax.jit(lambda ms: jfusion.fuse(ms, SPEC).plans)(jfusion.stack_models([network(), nan_model]))
    np.testing.assert_array_equal(plans["h0"].converged, [True, False])


def test_check_spec_sees_through_freshly_initialised_variables():
    # Swapping the two biases' groups is invisible on zero biases; check_spec perturbs them.
    wrong = jfusion.Spec({**SPEC.as_dict(), "params/Dense_0/bias": ("h1",), "params/Dense_1/bias": ("h0",)})
    variables = MODEL.init(jax.random.key(0), X)
    with pytest.raises(jfusion.SpecError, match="Dense_0/bias|Dense_1/bias"):
        jfusion.check_spec(MODEL.apply, variables, wrong, X)
    jfusion.check_spec(MODEL.apply, variables, SPEC, X)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"epsilon": 0.0}, "epsilon must be a finite number > 0"),
        ({"epsilon": -0.1}, "epsilon must be a finite number > 0"),
        ({"epsilon": float("nan")}, "epsilon must be a finite number > 0"),
        ({"max_iterations": 0}, "max_iterations must be an int >= 1"),
        ({"max_iterations": 2.5}, "max_iterations must be an int >= 1"),
        ({"relative_epsilon": "median"}, "relative_epsilon must be 'mean', 'std' or None"),
        ({"threshold": 0.0}, "threshold must be > 0"),
    ],
)
def test_sinkhorn_settings_are_validated_when_made(kwargs, match):
    with pytest.raises(ValueError, match=match):
        jfusion.Sinkhorn(**kwargs)


@pytest.mark.parametrize("cap", [1, 7, 25])
def test_reported_sinkhorn_iterations_never_exceed_the_cap(cap):
    cost = jax.random.uniform(jax.random.key(1), (8, 8))
    uniform = jnp.full((8,), 1 / 8)
    result = jfusion.Sinkhorn(epsilon=1e-3, max_iterations=cap)(cost, uniform, uniform)
    assert 0 < int(result.iterations) <= cap and not bool(result.converged)


def test_the_exact_solver_refuses_marginals_it_cannot_honour():
    cost = jnp.ones((4, 4))
    with pytest.raises(jfusion.FusionInputError, match="uniform marginals only.*jfusion.Sinkhorn"):
        jfusion.Exact()(cost, jnp.array([0.4, 0.2, 0.2, 0.2]), jnp.full((4,), 0.25))
    with pytest.raises(jfusion.FusionInputError, match=r"marginals of shapes \(3,\) and \(4,\)"):
        jfusion.Exact()(cost, jnp.full((3,), 1 / 3), jnp.full((4,), 0.25))


def test_model_weights_near_the_float32_maximum_do_not_overflow():
    a, b = network(0), network(1)
    huge = jfusion.vanilla_average([a, b], model_weights=[3e38, 3e38]).params
    assert max_tree_difference(huge, jfusion.vanilla_average([a, b]).params) <= 1e-6


@pytest.mark.parametrize("scale", [1e-19, 1e19])
def test_extreme_weight_scales_still_recover_a_planted_permutation(scale):
    original = network(2, scale)
    fused = jfusion.fuse([original, permuted(original)], SPEC).plans
    assert all(bool(np.all(r.converged)) for r in fused.values())
    result = jfusion.fuse([original, permuted(original)], SPEC).params
    assert max_tree_difference(result, original) <= 1e-5 * scale


def test_non_float_leaves_keep_the_targets_value_and_the_dtype_is_the_targets():
    def with_extras(params, step, key_seed):
        return {**params, "state": {"step": jnp.int32(step), "mask": jnp.array([True, step > 1]),
                                     "key": jax.random.key(key_seed)}}

    spec = jfusion.Spec({**SPEC.as_dict(), "state/step": (), "state/mask": (None,), "state/key": ()})
    a, b = with_extras(network(0), 3, 1), with_extras(permuted(network(0)), 5, 2)
    fused = jfusion.fuse([a, b], spec, target=1).params
    assert int(fused["state"]["step"]) == 5 and fused["state"]["step"].dtype == jnp.int32
    np.testing.assert_array_equal(fused["state"]["mask"], [True, True])
    assert jax.random.key_data(fused["state"]["key"]).tolist() == jax.random.key_data(b["state"]["key"]).tolist()
    # Mixed precision: the fused model has the target's dtypes.
    half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), network(0))
    mixed = jfusion.fuse([network(0), half], SPEC, target=1).params
    assert {x.dtype for x in jax.tree.leaves(mixed)} == {jnp.dtype(jnp.bfloat16)}
    with pytest.raises(jfusion.SpecError, match=r"state/count has dtype int32 but carries groups \('h0',\)"):
        ints = {**network(0), "state": {"count": jnp.zeros((6,), jnp.int32)}}
        jfusion.fuse([ints, ints], jfusion.Spec({**SPEC.as_dict(), "state/count": ("h0",)}))


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: jfusion.fuse([{}], SPEC), jfusion.FusionInputError, r"params_list\[0\] has no leaves"),
        (lambda: jfusion.fuse((m for m in [network()]), SPEC), jfusion.FusionInputError, "list\\(...\\) for a generator"),
        (lambda: jfusion.fuse([network()], SPEC, target=True), jfusion.FusionInputError, "not True"),
        (lambda: jfusion.fuse([network()], SPEC, target=0.0), jfusion.FusionInputError, "not 0.0"),
        (lambda: jax.jit(lambda t: jfusion.fuse([network()], SPEC, target=t))(0), jfusion.FusionInputError, "traced value"),
        (lambda: jfusion.fuse([network(), network(1)], SPEC, model_weights=["a", "b"]), jfusion.FusionInputError, "must be numbers"),
        (lambda: jfusion.fuse([network()], SPEC, solver="hungarian"), ValueError, r"unknown solver 'hungarian'; pass one of \['exact', 'sinkhorn'\]"),
        (lambda: jfusion.fuse([network()], SPEC, metric="manhattan"), ValueError, "kind must be euclidean"),
    ],
)
def test_small_mistakes_get_named_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_a_width_zero_group_is_named():
    shapes = {"Dense_0": ((4, 0), (0,)), "Dense_1": ((0, 6), (6,)), "Dense_2": ((6, 3), (3,))}
    empty = {"params": {n: {"kernel": jnp.ones(k), "bias": jnp.ones(b)} for n, (k, b) in shapes.items()}}
    with pytest.raises(jfusion.SpecError, match="group 'h0' has width 0"):
        jfusion.fuse([empty], SPEC)


def test_the_convergence_warning_says_when_the_cause_is_nan():
    nan_model = jax.tree.map(lambda x: x.at[0].set(jnp.nan), network(1))
    # Traced weights: the eager NaN check cannot see them, the plans returned from jit can.
    plans = jax.jit(lambda ms: jfusion.fuse(ms, SPEC, solver="sinkhorn").plans)(jfusion.stack_models([network(), nan_model]))
    with pytest.warns(jfusion.ConvergenceWarning, match=r"plans of models \[1\] are NaN/Inf.*no solver setting helps"):
        warn_unconverged(plans)


def test_gradients_through_sinkhorn_at_the_defaults_match_finite_differences():
    a, b = network(0), network(1)
    direction = jax.tree.map(lambda x: jax.random.normal(jax.random.key(x.size), x.shape), b)

    def loss(t):
        moved = jax.tree.map(lambda x, d: x + t * d, b, direction)  # enters the costs
        return jnp.mean(MODEL.apply(jfusion.fuse([a, moved], SPEC, solver="sinkhorn").params, X) ** 2)

    analytic = float(jax.grad(loss)(0.0))
    # Small enough that the loss's curvature does not bias the central difference (at 1e-2 it
    # is off by 20 % in some directions), large enough for float32.
    step = 1e-3
    numeric = float((loss(step) - loss(-step)) / (2 * step))
    assert np.isfinite(analytic) and abs(analytic) > 1e-4
    assert analytic == pytest.approx(numeric, rel=5e-2, abs=1e-4)


MISTAKES = ["none", "missing leaf", "renamed group", "wrong view", "extra leaf"]


@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    width=st.integers(1, 5),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]),
    scale=st.sampled_from([1e-6, 1.0, 1e6]),
    solver=st.sampled_from(["exact", "sinkhorn"]),
    mistake=st.sampled_from(MISTAKES),
    seed=st.integers(0, 1000),
)
@example(width=1, dtype=jnp.float16, scale=1e6, solver="exact", mistake="none", seed=0)  # the overflow CI once drew
def test_fuzz_every_cell_is_a_clear_error_or_the_planted_truth(width, dtype, scale, solver, mistake, seed):
    model = MLP((width, width, 2))
    original = jax.tree.map(lambda x: (x * scale + 0.1 * scale).astype(dtype), model.init(jax.random.key(seed), jnp.ones((1, 3))))
    spec = mlp_spec(3)
    axes = spec.as_dict()
    if mistake == "missing leaf":
        del axes["params/Dense_1/bias"]
    elif mistake == "renamed group":
        axes["params/Dense_1/kernel"] = ("h0", "h2")
    elif mistake == "wrong view":
        axes["params/Dense_1/kernel"] = ((2, "h0"), "h1")
    elif mistake == "extra leaf":
        axes["params/Dense_9/kernel"] = ("h1", None)
    copy = jfusion.permute(jax.tree.map(lambda x: x.astype(jnp.float32), original), spec, jax.random.key(seed + 1))[0]
    copy = jax.tree.map(lambda x: x.astype(dtype), copy)
    finite = all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(original))
    try:
        result = jfusion.fuse([original, copy], jfusion.Spec(axes), solver=jfusion.Sinkhorn(epsilon=1e-3) if solver == "sinkhorn" else "exact")
    except (jfusion.JFusionError, ValueError, TypeError) as err:
        # float16 overflows at 65504, so a 1e6 scale plants Inf in the models themselves
        assert mistake != "none" or not finite, err
        assert any(part in str(err) for part in ("params/", "group", "view")), err
        return
    assert mistake == "none" and finite
    if solver == "exact":
        tolerance = scale * (1e-2 if dtype != jnp.float32 else 1e-5)
        assert max_tree_difference(result.params, original) <= tolerance
        assert all(result.params["params"][k]["kernel"].dtype == dtype for k in result.params["params"])
    else:  # entropic plans blur; either converged close to the truth, or flagged
        converged = all(bool(np.all(r.converged)) for r in result.plans.values())
        assert not converged or max_tree_difference(result.params, original) <= 0.2 * scale + 1e-3
