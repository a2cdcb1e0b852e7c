"""The auction assignment solver (jfusion.core.auction) behind jfusion.Exact("auction"): optimal, certified, loud when not.

Few compiles: each size's cases are solved in one vmapped call.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

import jfusion
from jfusion.core.auction import auction, certify, levels, quantisation_gap, quantise
from jfusion.core.solvers import _conditioned, resolve_algorithm

RNG = np.random.default_rng(0)
AUCTION = jfusion.Exact("auction")


def cases(n):
    """Random and adversarial costs of size n, by name."""
    w = RNG.normal(size=(n, 5))
    perm = RNG.permutation(n)
    planted = ((w[:, None] - w[perm][None]) ** 2).sum(-1)  # row i's twin is column argsort(perm)[i]
    return {
        "uniform": RNG.random((n, n)),
        "normal_large": 1e6 * RNG.normal(size=(n, n)),
        "constant_rows": np.tile(RNG.random((n, 1)), (1, n)),  # every permutation ties
        "constant_columns": np.tile(RNG.random((1, n)), (n, 1)),  # likewise
        "three_values": RNG.integers(0, 3, (n, n)).astype(float),  # many equal entries
        "huge_range": 10.0 ** RNG.uniform(-19, 19, (n, n)),
        "duplicate_rows": np.repeat(RNG.random((1, n)), n, axis=0) + np.arange(n)[:, None] % 2,
        "planted": planted,
        "all_ties": np.ones((n, n)),
        "non_finite": RNG.random((n, n)) * np.where(np.eye(n, k=n // 2) > 0, np.inf, 1.0),
    }


@functools.cache  # one compile per size and batch shape
def exact_batch(n):
    uniform = jnp.full((n,), 1.0 / n)
    return jax.jit(jax.vmap(lambda c: AUCTION(c, uniform, uniform)))


@pytest.mark.parametrize("n", [1, 2, 7, 64])
def test_the_auction_is_optimal_on_random_and_adversarial_costs(n):
    named = cases(n)
    costs = np.stack(list(named.values())).astype(np.float32)
    out = jax.device_get(exact_batch(n)(jnp.asarray(costs)))
    for k, name in enumerate(named):
        cost, plan = costs[k].astype(np.float64), out.plan[k]
        if name == "non_finite":
            assert not out.converged[k], name
            continue
        # A plan of an assignment: exactly P / n.
        cols = plan.argmax(axis=1)
        np.testing.assert_array_equal(plan, np.eye(n, dtype=np.float32)[cols] / np.float32(n), err_msg=name)
        assert sorted(cols) == list(range(n)), name
        # Optimal for the quantised cost, exactly (scipy on the same integers) ...
        integer = np.asarray(quantise(_conditioned(jnp.asarray(costs[k]))[0])).astype(np.int64)
        rows, best = linear_sum_assignment(integer)
        assert integer[np.arange(n), cols].sum() == integer[rows, best].sum(), name
        # ... hence within the quantisation bound of the float optimum.
        rows, best = linear_sum_assignment(cost)
        gap = cost[np.arange(n), cols].sum() - cost[rows, best].sum()
        spread = cost.max() - cost.min()
        assert -1e-9 * spread <= gap <= quantisation_gap(n) * spread + 1e-9 * spread, (name, gap)
        # Converged: certified, unless the cost cannot decide a matching (constant).
        informative = spread > 0 or n == 1
        assert out.converged[k] == informative, name
        assert (out.iterations[k] > 0) == informative, name
    if n > 1:  # the planted permutation is recovered exactly
        k = list(named).index("planted")
        assert (out.plan[k] > 0).sum() == n and out.converged[k]


def test_vmapped_solves_equal_single_solves():
    n = 7
    costs = jnp.asarray(np.stack(list(cases(n).values())[:-1] * 2)[:10], jnp.float32)  # the shape above
    batched = exact_batch(n)(costs)
    uniform = jnp.full((n,), 1.0 / n)
    single = jax.jit(lambda c: AUCTION(c, uniform, uniform))
    for k in range(4):
        one = single(costs[k])
        np.testing.assert_array_equal(one.plan, batched.plan[k])
        assert int(one.iterations) == int(batched.iterations[k]) and bool(one.converged)


@pytest.mark.parametrize("shape", [(3, 6), (8, 4)])
def test_rectangular_costs_with_integer_width_ratios(shape):
    n, m = shape
    cost = RNG.random(shape).astype(np.float32)
    out = jax.jit(AUCTION)(jnp.asarray(cost), jnp.full((n,), 1 / n), jnp.full((m,), 1 / m))
    plan = np.asarray(out.plan, np.float64)
    np.testing.assert_allclose(plan.sum(1), 1 / n, rtol=1e-6)
    np.testing.assert_allclose(plan.sum(0), 1 / m, rtol=1e-6)
    # The optimum: the assignment on the smaller side replicated max/min times.
    tiled = np.tile(cost, (m // n, 1)) if m > n else np.tile(cost, (1, n // m))
    rows, cols = linear_sum_assignment(tiled.astype(np.float64))
    optimum = tiled[rows, cols].sum() / max(n, m)
    assert bool(out.converged) and int(out.iterations) > 0
    assert optimum - 1e-6 <= float(out.cost) <= optimum + quantisation_gap(max(n, m)) + 1e-6


def test_partial_ot_matches_the_hungarian_version():
    cost = jnp.asarray(RNG.random((6, 8)), jnp.float32)
    (auc, auc_sink), (hun, hun_sink) = (
        jax.jit(lambda c, s=s: s.partial(c, 2))(cost) for s in (AUCTION, jfusion.Exact("hungarian"))
    )
    assert bool(auc.converged) and int(auc.iterations) > 0 and int(hun.iterations) == 0
    np.testing.assert_allclose(float(auc.cost), float(hun.cost), atol=quantisation_gap(12) + 1e-6)
    assert float(auc.plan.sum()) == 4.0 and float(auc_sink.sum()) == float(hun_sink.sum()) == 2.0
    assert set(np.unique(np.asarray(auc.plan))) <= {0.0, 1.0}


def test_the_certificate_fails_loudly_on_broken_input():
    n = 7
    integer = quantise(jnp.asarray(RNG.random((n, n)), jnp.float32))
    solved, check = jax.jit(auction)(integer), jax.jit(certify)
    assert bool(solved.converged) and bool(check(integer, solved.assignment, solved.prices))
    # A corrupted assignment: not a permutation, out of range, or a swap that breaks eps-CS.
    a = np.asarray(solved.assignment)
    for broken in (np.r_[a[1], a[1:]], np.r_[-1, a[1:]], np.r_[a[:-1], n], np.r_[a[1], a[0], a[2:]]):
        assert not bool(check(integer, jnp.asarray(broken, jnp.int32), solved.prices)), broken
    # Prices past 2^30 would not be exact in int32: refused.
    assert not bool(check(integer, solved.assignment, solved.prices.at[0].set(2**30 + 1)))
    # One bidding round cannot finish (an iteration cap of 1): reported, not returned as if
    # optimal, with the rounds it ran.
    uniform = jnp.full((n,), 1.0 / n)
    out = jax.jit(jfusion.Exact("auction", max_iterations=1))(jnp.asarray(RNG.random((n, n)), jnp.float32), uniform, uniform)
    assert not bool(out.converged) and int(out.iterations) == 1


def test_integers_stay_exact():
    for n in (1, 7, 64, 1000, 4096):
        assert (n + 1) * levels(n) <= 2**28 and levels(n) <= 2**24
    assert quantisation_gap(64) < 64 * 1e-6


def test_exact_validates_its_fields():
    with pytest.raises(ValueError, match="Exact.algorithm must be one of"):
        jfusion.Exact(algorithm="simplex")
    with pytest.raises(ValueError, match="Exact.max_iterations must be None or an int >= 1"):
        jfusion.Exact(max_iterations=0)
    assert jfusion.Exact() == jfusion.Exact("auto") and hash(jfusion.Exact("hungarian"))
    # Where the suite runs (the CPU), "auto" is scipy's assignment on the host.
    assert jax.default_backend() != "cpu" or resolve_algorithm("auto") == "scipy"


@pytest.mark.parametrize("algorithm", ["scipy", "hungarian"])
def test_every_exact_algorithm_reaches_the_optimum_under_jit_and_vmap(algorithm):
    """The host and in-graph assignments against scipy called directly, on the adversarial cases."""
    n = 7
    named = cases(n)
    del named["non_finite"]  # no matching to decide: covered by the auction's test above
    costs = np.stack(list(named.values())).astype(np.float32)
    uniform = jnp.full((n,), 1.0 / n)
    solver = jfusion.Exact(algorithm)
    out = jax.device_get(jax.jit(jax.vmap(lambda c: solver(c, uniform, uniform)))(jnp.asarray(costs)))
    for k, name in enumerate(named):
        cost, plan = costs[k].astype(np.float64), out.plan[k]
        cols = plan.argmax(axis=1)
        np.testing.assert_array_equal(plan, np.eye(n, dtype=np.float32)[cols] / np.float32(n), err_msg=name)
        rows, best = linear_sum_assignment(cost)
        spread = cost.max() - cost.min()
        # The solvers see the cost mapped onto [0, 1] in float32: equal optima up to its rounding.
        assert abs(cost[np.arange(n), cols].sum() - cost[rows, best].sum()) <= 1e-5 * spread, name
        assert out.converged[k] == (spread > 0), name
    # Nested batches (seeds x models) reach the host as one array and come back in place.
    nested = jax.jit(jax.vmap(jax.vmap(lambda c: solver(c, uniform, uniform).plan)))(jnp.asarray(costs[:6].reshape(2, 3, n, n)))
    np.testing.assert_array_equal(np.asarray(nested).reshape(6, n, n), out.plan[:6])
