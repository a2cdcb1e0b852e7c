"""Weight matching (Git Re-Basin): planted permutations, where it beats OTFusion's forward pass, jit, the cap, refusals.

Tiny models (widths 4-16) with every leaf random, no training.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from planted import max_tree_difference, permutation_matrix, random_variables

import jfusion
from jfusion.core import align as engine
from jfusion.core.tree import flatten
from jfusion.models import MLP, VGG, RecurrentClassifier, ResNet, mlp_spec

# Coordinate descent is a local method: on a 4-8-8-3 MLP it stopped short of a planted
# permutation in 2 of 20 draws, on 4-16-16-3 in none.
MLP3 = MLP((16, 16, 3))
VGG_BN = VGG(features=(8, "M", 16), batch_norm=True, num_classes=3)
RESNET = ResNet((1, 1), (4, 8), num_classes=3)
ELMAN = RecurrentClassifier((6,), 3, "simple")
# One compiled program per case: tests that reuse a case's alignment reuse its program.

CASES = {
    "cnn_bn": (VGG_BN, VGG_BN.spec(), (8, 8, 3), {"train": False}, jfusion.WeightMatching()),
    "resnet": (RESNET, RESNET.spec(), (8, 8, 3), {"train": False}, jfusion.WeightMatching()),
    "elman": (ELMAN, ELMAN.spec(), (5, 4), {}, jfusion.WeightMatching()),  # recurrent kernel (r0, r0)
}


def objective(reference, aligned, spec):
    """``sum_L <W_L^ref, W_L aligned>`` over the spec's grouped leaves: what matching maximises."""
    ref, other = flatten(reference)[0], flatten(aligned)[0]
    return sum(float(jnp.vdot(ref[leaf.path], other[leaf.path])) for leaf in spec.leaves if leaf.groups)


def assert_plans_are(plans, perms, model=1):
    for group, perm in perms.items():
        plan = np.asarray(plans[group].plan[model]) * len(perm)
        np.testing.assert_array_equal(plan, permutation_matrix(perm).T, err_msg=group)


@pytest.mark.filterwarnings("ignore::jfusion.ResidualStreamWarning")  # planted truth: weight alignment is exact here
@pytest.mark.parametrize("case", CASES)
def test_a_permuted_copy_is_recovered_exactly_and_fuses_to_the_parents_function(case):
    model, spec, shape, kwargs, alignment = CASES[case]
    variables = random_variables(model, shape, seed=0)
    x = jax.random.normal(jax.random.key(1), (4, *shape))
    permuted, perms = jfusion.permute(variables, spec, jax.random.key(2))
    result = jfusion.fuse([variables, permuted], spec, alignment=alignment)
    assert_plans_are(result.plans, perms)
    assert all(bool(r.converged.all()) for r in result.plans.values())
    np.testing.assert_allclose(
        model.apply(result.params, x, **kwargs), model.apply(variables, x, **kwargs), atol=1e-5, rtol=1e-5
    )


def test_a_recurrent_group_climbs_the_objective_itself_and_converges_on_independent_networks():
    # P_g sits on both axes of the recurrent kernel, where the assignment only linearises
    # <H, P H' P^T>: accepted by the linear gain alone, 6 of these 10 pairs cycled to the cap.
    model, spec, shape, _, alignment = CASES["elman"]
    for seed in range(10):
        pair = [random_variables(model, shape, seed=2 * seed), random_variables(model, shape, seed=2 * seed + 1)]
        result = jfusion.align(pair, spec, alignment=alignment)
        assert bool(result.plans["r0"].converged[1]) and int(result.plans["r0"].iterations[1]) <= 5, seed
        assert objective(pair[0], jfusion.take_model(result.aligned, 1), spec) >= objective(pair[0], pair[1], spec) - 1e-5


def test_three_permuted_copies_and_an_nnx_state():
    variables = random_variables(MLP3, (4,), seed=3)
    spec = mlp_spec(3)
    copies = [jfusion.permute(variables, spec, jax.random.key(10 + k)) for k in range(2)]
    result = jfusion.fuse([variables] + [c for c, _ in copies], spec, alignment=jfusion.WeightMatching())
    for k, (_, perms) in enumerate(copies, start=1):
        assert_plans_are(result.plans, perms, model=k)
    x = jax.random.normal(jax.random.key(1), (8, 4))
    np.testing.assert_allclose(MLP3.apply(result.params, x), MLP3.apply(variables, x), atol=1e-5, rtol=1e-5)
    assert result.plans["h0"].plan.shape == (3, 16, 16)

    # Barycenter fusion aligns onto its own estimate (a pytree target) by the same matching.
    barycenter = jfusion.barycenter_fuse([variables, copies[0][0]], spec, alignment=jfusion.WeightMatching())
    assert bool(barycenter.converged) and max_tree_difference(barycenter.params, variables) < 1e-6

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.first, self.second, self.out = nnx.Linear(4, 6, rngs=rngs), nnx.Linear(6, 5, rngs=rngs), nnx.Linear(5, 2, rngs=rngs)

    state = nnx.state(Net(nnx.Rngs(0)))
    nnx_spec = mlp_spec(["first", "second", "out"], prefix="")
    permuted, perms = jfusion.permute(state, nnx_spec, jax.random.key(4))
    aligned = jfusion.align([state, permuted], nnx_spec, alignment=jfusion.WeightMatching())
    assert_plans_are(aligned.plans, perms)
    assert max_tree_difference(jfusion.take_model(aligned.aligned, 1), state) < 1e-6


def test_weight_matching_disambiguates_neurons_whose_incoming_weights_are_twins():
    # h0's neurons come in pairs with the same incoming weights and bias but different
    # outgoing weights: OTFusion's forward pass (incoming supports, one sweep) cannot tell
    # the twins apart; weight matching also compares the outgoing weights.
    variables = random_variables(MLP3, (4,), seed=5)
    spec = mlp_spec(3)
    dense0 = variables["params"]["Dense_0"]
    twins = {"kernel": jnp.repeat(dense0["kernel"][:, ::2], 2, axis=1), "bias": jnp.repeat(dense0["bias"][::2], 2)}
    variables = {"params": {**variables["params"], "Dense_0": twins}}
    x = jax.random.normal(jax.random.key(6), (16, 4))
    parent = MLP3.apply(variables, x)
    permuted, perms = jfusion.permute(variables, spec, jax.random.key(7))
    readings = {}
    for name, alignment in {"forward": jfusion.ByWeights(), "matching": jfusion.WeightMatching()}.items():
        aligned = jfusion.take_model(jfusion.align([variables, permuted], spec, alignment=alignment).aligned, 1)
        fused = jax.tree.map(lambda a, b: (a + b) / 2, variables, aligned)  # what fuse returns
        error = float(jnp.max(jnp.abs(MLP3.apply(fused, x) - parent)))
        readings[name] = (objective(variables, aligned, spec), error)
    best = objective(variables, variables, spec)  # ||W||^2: the true permutation's
    assert readings["matching"][0] == pytest.approx(best, rel=1e-6)
    assert readings["matching"][1] < 1e-5
    assert readings["forward"][0] < best - 0.1, readings
    assert readings["forward"][1] > 1e-2, readings


def test_under_jit_the_second_fusion_does_not_recompile_and_the_cap_is_reported():
    variables = random_variables(MLP3, (4,), seed=8)
    spec = mlp_spec(3)

    @jax.jit
    def fuse(models):
        result = jfusion.fuse(models, spec, alignment=jfusion.WeightMatching(max_iterations=1))
        return result.params, result.plans

    for seed in range(2):
        permuted, perms = jfusion.permute(variables, spec, jax.random.key(20 + seed))
        params, plans = fuse(jfusion.stack_models([variables, permuted]))
        # One pass from the identity changes permutations, so one more is needed to know.
        np.testing.assert_array_equal(plans["h0"].converged, [True, False])
        np.testing.assert_array_equal(plans["h1"].iterations, [0, 1])
    assert fuse._cache_size() == 1
    # What an eager fuse does with the plans it gets back: one warning, at the caller's line.
    with pytest.warns(jfusion.ConvergenceWarning, match=r"max_iterations=1 for models \[1\].*raise WeightMatching") as caught:
        engine.warn_unconverged(plans, jfusion.WeightMatching(max_iterations=1))
    assert len(caught) == 1 and caught[0].filename == __file__


def test_running_statistics_do_not_decide_the_matching():
    model, spec, shape, _, alignment = CASES["cnn_bn"]
    variables = random_variables(model, shape, seed=9)
    permuted, perms = jfusion.permute(variables, spec, jax.random.key(10))
    # The copy's statistics are garbage, far larger than its weights.
    noise = jax.tree.map(lambda s: 100.0 * jax.random.normal(jax.random.key(11), s.shape), permuted["batch_stats"])
    corrupted = {**permuted, "batch_stats": noise}
    assert alignment.exclude == ()  # left out by default: they are data moments, not weights
    assert_plans_are(jfusion.fuse([variables, corrupted], spec, alignment=alignment).plans, perms)


def test_what_weight_matching_cannot_do_is_refused_with_what_to_pass():
    spec = mlp_spec(3)
    variables = random_variables(MLP3, (4,), seed=0)
    matching = jfusion.WeightMatching()
    with pytest.raises(jfusion.FusionInputError, match=r"needs an exact solver.*solver='exact'"):
        jfusion.fuse([variables, variables], spec, alignment=matching, solver=jfusion.Sinkhorn())
    wide = random_variables(MLP((32, 16, 3)), (4,), seed=1)
    with pytest.raises(jfusion.FusionInputError, match=r"group 'h0': model 1 has 32 neurons but the target 16.*ByWeights"):
        jfusion.fuse([variables, wide], spec, alignment=matching)
    with pytest.raises(jfusion.FusionInputError, match=r"PartialPlans.*jfusion.fuse"):
        jfusion.partial_fuse([variables, variables], spec, alpha=0.5, alignment=matching)
    with pytest.raises(jfusion.FusionInputError, match="no ground metric"):
        jfusion.fuse([variables, variables], spec, alignment=matching, metric="cosine")
    with pytest.raises(jfusion.FusionInputError, match=r"'params/Dense_9' is no leaf path"):
        jfusion.fuse([variables, variables], spec, alignment=jfusion.WeightMatching(exclude=("params/Dense_9",)))
    with pytest.raises(jfusion.FusionInputError, match=r"group 'h1': every leaf carrying it"):
        jfusion.fuse([variables, variables], spec, alignment=jfusion.WeightMatching(exclude=("params/Dense_1", "params/Dense_2")))
    for bad in [{"max_iterations": 0}, {"tolerance": -1.0}, {"seed": 0.5}, {"exclude": (1,)}]:
        with pytest.raises(ValueError, match="WeightMatching"):
            jfusion.WeightMatching(**bad)
