"""The whole alignment-and-average pass is one XLA program that composes with jit, scan, vmap."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jfusion
from jfusion.models import MLP, mlp_spec

MODEL = MLP((24, 16, 5))
SPEC = mlp_spec(3)


def stacked_models(num, seed=0):
    keys = jax.random.split(jax.random.key(seed), num)
    return jax.vmap(lambda k: MODEL.init(k, jnp.ones((1, 12))))(keys)


@pytest.mark.parametrize(
    "solver", [jfusion.Exact("hungarian"), jfusion.Sinkhorn(), jfusion.Exact("scipy")], ids=["hungarian", "sinkhorn", "scipy"]
)
def test_jitted_fuse_lowers_to_one_program_that_vmaps_over_models(solver):
    fuse = jax.jit(functools.partial(jfusion.fuse, spec=SPEC, solver=solver))
    texts = {num: fuse.lower(stacked_models(num)).as_text() for num in (2, 8)}
    # vmapped, not unrolled: the solver loops (or host calls) appear as often for 8 models as for 2.
    loops = {num: text.count("stablehlo.while") for num, text in texts.items()}
    callbacks = {num: text.count("callback") for num, text in texts.items()}
    if solver == jfusion.Exact("scipy"):
        # One host call per group solves every model's assignment; no loop is compiled.
        assert callbacks[2] == callbacks[8] > 0 and loops[2] == loops[8] == 0
    else:
        assert callbacks[2] == callbacks[8] == 0 and loops[2] == loops[8] > 0


def test_jitted_fuse_returns_its_plans_so_non_convergence_is_visible_under_jit():
    models = stacked_models(3)
    capped = jfusion.Sinkhorn(epsilon=1e-3, max_iterations=20)
    fuse = jax.jit(functools.partial(jfusion.fuse, spec=SPEC, solver=capped))
    fused, plans = fuse(models)
    assert set(plans) == set(SPEC.groups)
    # Nothing can warn inside jit: the flags say it. Model 0 is the target (its plan the identity).
    np.testing.assert_array_equal(plans["h0"].converged, [True, False, False])
    np.testing.assert_array_equal(plans["h0"].iterations, [0, 20, 20])
    with pytest.warns(jfusion.ConvergenceWarning) as warned:
        eager = jfusion.fuse(models, SPEC, solver=capped).params
    assert {"'h0':", "'h1':"} <= {str(w.message).split()[1] for w in warned}
    assert all(w.filename == __file__ for w in warned)  # the warning points at the caller's line
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), fused, eager)
    exact_plans = jfusion.fuse(models, SPEC).plans
    assert all(np.asarray(r.converged).all() for r in exact_plans.values())
    assert exact_plans["h0"].plan.shape == (3, 24, 24)


def test_fuse_inside_lax_scan_matches_a_python_loop():
    """A federated loop: each round fuses the clients, then clients drift from the fused model."""

    def round_step(clients, key):
        fused = jfusion.fuse(clients, SPEC).params
        drift = jax.tree.map(lambda x: 0.05 * jax.random.normal(key, (4, *x.shape)), fused)
        return jax.tree.map(lambda f, d: f[None] + d, fused, drift), fused

    keys = jax.random.split(jax.random.key(3), 3)
    clients = stacked_models(4)
    final, history = jax.jit(lambda c: jax.lax.scan(round_step, c, keys))(clients)
    loop_clients, loop_history = clients, []
    for key in keys:
        loop_clients, fused = round_step(loop_clients, key)
        loop_history.append(fused)
    for scanned, looped in zip(jax.tree.leaves(history), zip(*map(jax.tree.leaves, loop_history))):
        np.testing.assert_allclose(scanned, np.stack(looped), atol=1e-5)
    np.testing.assert_allclose(
        final["params"]["Dense_0"]["kernel"], loop_clients["params"]["Dense_0"]["kernel"], atol=1e-5
    )


def test_many_fusions_at_once_under_vmap():
    problems = jax.tree.map(lambda *xs: jnp.stack(xs), *[stacked_models(3, seed) for seed in range(4)])
    batched = jax.vmap(lambda models: jfusion.fuse(models, SPEC, target=2).params)(problems)
    for b in range(4):
        one = jfusion.fuse(jax.tree.map(lambda x: x[b], problems), SPEC, target=2).params
        for x, y in zip(jax.tree.leaves(batched), jax.tree.leaves(one)):
            np.testing.assert_allclose(x[b], y, atol=1e-6)


def test_fuse_is_differentiable_in_the_model_weights():
    models = stacked_models(3)
    x = jax.random.normal(jax.random.key(0), (8, 12))

    def loss(weights):
        return jnp.sum(MODEL.apply(jfusion.fuse(models, SPEC, model_weights=weights).params, x) ** 2)

    grad = jax.grad(loss)(jnp.ones(3))
    assert grad.shape == (3,) and bool(jnp.all(jnp.isfinite(grad))) and float(jnp.abs(grad).sum()) > 0
