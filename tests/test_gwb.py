"""Gromov-Wasserstein barycenter fusion of recurrent networks: planted truths and brute force."""

import itertools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from planted import duplicate_neurons, max_tree_difference, random_variables

import jfusion
from jfusion.core.gromov import fused_gw_gradient, fused_gw_objective
from jfusion.core.support import RelationalSupport
from jfusion.models import MLP, RecurrentClassifier

SEQUENCE = (4, 3)  # steps, features
X = jax.random.normal(jax.random.key(1), (8, *SEQUENCE))
# alpha=1: the couplings come from the hidden-to-hidden weights alone.
RECURRENT_ONLY = jfusion.GromovWassersteinPlans(alpha=1.0, max_iterations=30, sinkhorn_iterations=20)
FUSED = jfusion.GromovWassersteinPlans(max_iterations=30, sinkhorn_iterations=20)


def recurrent(cell, seed, hidden=6):
    model = RecurrentClassifier((hidden,), num_classes=3, cell=cell)
    return model, random_variables(model, SEQUENCE, seed, scale=0.5)


def dense_objective(plan, cost, a, b, alpha):
    """``E(T)`` through the (n, n, m, m) tensor ``||A_ij - B_kl||^2``: the definition."""
    squared = jnp.sum(jnp.square(a[:, :, None, None, :] - b[None, None, :, :, :]), axis=-1)
    return (1 - alpha) * jnp.sum(cost * plan) + alpha * jnp.einsum("ijkl,ik,jl->", squared, plan, plan)


def asymmetric_relation(rng, n, channels=1):
    """Mostly antisymmetric: a gradient that assumes symmetric costs gets its cross term's sign wrong."""
    k = rng.normal(size=(n, n, channels))
    return k - k.transpose(1, 0, 2) + 0.3 * rng.normal(size=(n, n, channels))


def test_gradient_for_asymmetric_relations_is_jax_grad_of_the_definition():
    rng = np.random.default_rng(0)
    a, b = asymmetric_relation(rng, 5, 2), asymmetric_relation(rng, 4, 2)
    plan, cost = rng.uniform(size=(5, 4)), rng.uniform(size=(5, 4))
    a, b, plan, cost = (jnp.asarray(x, jnp.float32) for x in (a, b, plan, cost))
    expected, gradient, objective, dense = jax.jit(
        lambda *args: (jax.grad(dense_objective)(*args, 0.3), fused_gw_gradient(*args, 0.3),
                       fused_gw_objective(*args, 0.3), dense_objective(*args, 0.3))
    )(plan, cost, a, b)
    np.testing.assert_allclose(gradient, expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(objective, dense, rtol=1e-5)
    # The symmetric-cost formula (Peyre et al. 2016's L x T, doubled: one cross term) is not it.
    a2, b2 = jnp.sum(a**2, -1), jnp.sum(b**2, -1)
    cross = jnp.einsum("ijr,jl,klr->ik", a, plan, b)
    one_sided = 0.7 * cost + 0.3 * 2 * ((a2 @ plan.sum(1))[:, None] + (b2 @ plan.sum(0))[None, :] - 2 * cross)
    assert np.abs(np.asarray(one_sided - expected)).max() > 0.1


def test_hard_gw_plan_is_the_brute_force_minimiser_over_all_permutations():
    n = 5
    perms = np.array(list(itertools.permutations(range(n))))  # 120
    features = jnp.zeros((n, 1), jnp.float32)  # alpha=1: the linear term has no weight
    solve = jax.jit(
        lambda a, b: RECURRENT_ONLY.plan("r0", RelationalSupport(features, a), RelationalSupport(features, b), jnp.int32(0))
    )
    for seed in range(10):
        rng = np.random.default_rng(seed)
        a = asymmetric_relation(rng, n)
        shuffle = rng.permutation(n)
        b = a[shuffle][:, shuffle] + rng.normal(size=(n, n, 1))  # noisy: the planted match need not be optimal
        # sum_ij ||A_ij - B_s(i)s(j)||^2 for every permutation s (neuron i of the model -> s(i)).
        objective = np.sum((a[None] - b[perms[:, :, None], perms[:, None, :]]) ** 2, axis=(1, 2, 3))
        best = perms[np.argmin(objective)]
        result = solve(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
        np.testing.assert_array_equal(np.asarray(result.plan) * n, np.eye(n)[best], err_msg=f"seed {seed}")
        assert bool(result.converged), seed


def test_no_four_index_tensor_is_ever_built():
    n = m = 6
    support = RelationalSupport(jnp.ones((n, 3)), jnp.ones((n, n, 4)))
    jaxpr = jax.make_jaxpr(lambda s, r: FUSED.plan("r0", s, r, jnp.int32(0)))(support, support)

    def sizes(jaxpr):
        for eqn in jaxpr.eqns:
            yield from (int(np.prod(v.aval.shape)) for v in eqn.outvars if hasattr(v.aval, "shape"))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from sizes(sub)

    assert max(sizes(jaxpr.jaxpr)) < n * m * n * m


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_permuted_hidden_units_are_recovered_from_the_recurrent_weights(cell):
    model, _ = recurrent(cell, 0)
    spec, apply = model.spec(), jax.jit(model.apply)
    for seed in range(2):  # one compiled program
        _, original = recurrent(cell, seed)
        permuted, _ = jfusion.permute(original, spec, jax.random.key(10 + seed))
        fused = jfusion.barycenter_fuse([original, permuted], spec, target=1, producer=RECURRENT_ONLY)
        # Onto the permuted copy: its order, the original's weights.
        assert max_tree_difference(fused.params, permuted) < 1e-5, (cell, seed)
        np.testing.assert_allclose(apply(fused.params, X), apply(original, X), atol=1e-5)
        assert bool(fused.plans["r0"].converged.all()) and bool(fused.converged)


def test_duplicated_hidden_units_fuse_back_into_the_original_width():
    model, original = recurrent("lstm", 3, hidden=5)
    wide = RecurrentClassifier((10,), num_classes=3, cell="lstm")
    spec, apply = model.spec(), jax.jit(model.apply)
    doubled = duplicate_neurons(original, spec, jax.random.key(5))  # copies, outgoing halved, shuffled
    np.testing.assert_allclose(jax.jit(wide.apply)(doubled, X), apply(original, X), atol=1e-5)
    target, _ = jfusion.permute(original, spec, jax.random.key(6))
    fused = jfusion.barycenter_fuse([doubled], spec, target=target, producer=RECURRENT_ONLY)
    assert max_tree_difference(fused.params, target) < 1e-5
    np.testing.assert_allclose(apply(fused.params, X), apply(original, X), atol=1e-5)
    plan = np.asarray(fused.plans["r0"].plan[0])
    assert plan.shape == (10, 5) and np.all((plan > 0).sum(axis=0) == 2)  # two copies per unit
    # Per unit of mass read, a copy feeds the others as its parent did: GW distance 0.
    assert abs(float(fused.plans["r0"].cost[0])) < 1e-6


def test_three_permuted_copies_fuse_back_into_the_original():
    model, original = recurrent("gru", 4)
    spec = model.spec()
    copies = [jfusion.permute(original, spec, jax.random.key(k))[0] for k in (1, 2)]
    fused = jfusion.barycenter_fuse([copies[0], original, copies[1]], spec, target=1, producer=FUSED)
    assert max_tree_difference(fused.params, original) < 1e-5
    assert fused.plans["r0"].plan.shape == (3, 6, 6)


def test_a_capped_solver_reports_no_convergence_and_groups_without_recurrence_use_linear_ot():
    rng = np.random.default_rng(1)
    support = RelationalSupport(jnp.asarray(rng.normal(size=(6, 3)), jnp.float32), jnp.asarray(rng.normal(size=(6, 6, 2)), jnp.float32))
    capped = jfusion.GromovWassersteinPlans(max_iterations=1, sinkhorn_iterations=20, hard=False)
    result = jax.jit(lambda s: capped.plan("r0", s, s, jnp.int32(0)))(support)
    assert not bool(result.converged) and int(result.iterations) == 1
    np.testing.assert_allclose(result.plan.sum(axis=0), np.full(6, 1 / 6), atol=1e-6)  # a coupling, soft
    # An MLP has no recurrent leaves: GWB's plans are OT fusion's.
    mlp, x = MLP((6, 3)), jnp.ones((1, 4))
    params = mlp.init(jax.random.key(0), x)
    shuffled, _ = jfusion.permute(params, mlp.spec(), jax.random.key(1))
    fused = jfusion.fuse_with(FUSED, [params, shuffled], mlp.spec()).params
    assert max_tree_difference(fused, params) < 1e-6


def test_errors_name_the_group_and_the_sizes():
    model, original = recurrent("gru", 0, hidden=6)
    narrow = recurrent("gru", 0, hidden=4)[1]
    with pytest.raises(jfusion.FusionInputError, match=r"group 'r0'.*n=6.*m=4.*hard=False"):
        jfusion.fuse_with(FUSED, [original], model.spec(), target=narrow)
    with pytest.raises(jfusion.FusionInputError, match="give them to it instead"):
        jfusion.barycenter_fuse([original], model.spec(), solver="sinkhorn", producer=FUSED)
    with pytest.raises(ValueError, match="alpha"):
        jfusion.GromovWassersteinPlans(alpha=1.5)
