"""One engine for every method: the producer protocol, every method in every mode, and oracles.

Every method runs through ``jfusion.core.align``: a table of methods x {eager, jit, vmap,
lax.scan, unrolled (models kept apart), different widths}, each cell checked against a planted
truth (permuted or duplicated neurons) and, for the unrolled path, against the vmapped one.
"""

import ast
import dataclasses
import sys
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jfusion
import jfusion.core.align as engine
from jfusion.core.tree import ModelStack
from jfusion.models import MLP, mlp_spec
from planted import duplicate_neurons, max_tree_difference

ROOT = Path(__file__).resolve().parent.parent
SPEC = mlp_spec(3)
MODEL = MLP((8, 6, 3))
WIDE = MLP((16, 12, 3))
X = jax.random.normal(jax.random.key(7), (40, 5))


def mlp_apply(params, x):
    """The MLP's forward pass with its widths read off the kernels (partial fusion is wider)."""
    layers = params["params"]
    for i in range(len(layers)):
        x = x @ layers[f"Dense_{i}"]["kernel"] + layers[f"Dense_{i}"]["bias"]
        x = jax.nn.relu(x) if i < len(layers) - 1 else x
    return x


def network(seed):
    return MODEL.init(jax.random.key(seed), jnp.ones((1, 5)))


def permuted_copies(seed, num=3):
    """``(original, [original, permuted, permuted, ...])``: fusing must give the original back."""
    original = network(seed)
    copies = [original] + [jfusion.permute(original, SPEC, jax.random.key(100 * seed + k))[0] for k in range(1, num)]
    return original, copies


def stacked(models):
    return jfusion.stack_models(models)


ACTIVATIONS = jfusion.ByActivations.from_module(MODEL)

# name -> (method on models stacked on K, planted problem for a seed, how to compare with the truth)
METHODS = {
    "fuse": (lambda ms: jfusion.fuse(ms, SPEC).params, permuted_copies, "params"),
    "fuse by activations": (
        lambda ms: jfusion.fuse(ms, SPEC, alignment=ACTIVATIONS, inputs=X).params, permuted_copies, "params"
    ),
    "partial fusion": (lambda ms: jfusion.partial_fuse(ms, SPEC, 0.5).params, permuted_copies, "function"),
    "barycenter": (lambda ms: jfusion.barycenter_fuse(ms, SPEC, tolerance=0.0, max_iterations=3).params, permuted_copies, "params"),
    "vanilla": (lambda ms: jfusion.vanilla_average(ms, SPEC).params, lambda s: (network(s), [network(s)] * 3), "params"),
    "prune": (
        lambda ms: jfusion.prune(ms[0] if isinstance(ms, list) else jax.tree.map(lambda x: x[0], ms), SPEC, 0.5).params,
        lambda s: (network(s), [duplicate_neurons(network(s), SPEC, jax.random.key(s))]),
        "function",
    ),
}


def assert_planted(fused, original, compare):
    if compare == "params":
        assert max_tree_difference(fused, original) <= 1e-5
    np.testing.assert_allclose(mlp_apply(fused, X), mlp_apply(original, X), atol=1e-4)


@pytest.mark.parametrize("mode", ["eager", "jit", "vmap", "scan", "unrolled"])
@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_recovers_its_planted_truth_in_every_mode(name, mode, monkeypatch):
    method, planted, compare = METHODS[name]
    problems = [planted(seed) for seed in (1, 2)]
    if mode in ("eager", "jit"):
        run = method if mode == "eager" else jax.jit(method)
        for original, models in problems:
            assert_planted(run(stacked(models)), original, compare)
    elif mode in ("vmap", "scan"):
        batch = jax.tree.map(lambda *xs: jnp.stack(xs), *[stacked(models) for _, models in problems])
        if mode == "vmap":
            fused = jax.vmap(method)(batch)
        else:
            fused = jax.lax.scan(lambda carry, ms: (carry, method(ms)), None, batch)[1]
        for b, (original, _) in enumerate(problems):
            assert_planted(jax.tree.map(lambda x: x[b], fused), original, compare)
    else:
        # The same fusion with the models kept apart (the path models of different widths take).
        original, models = problems[0]
        vectorized = method(stacked(models))
        kept_apart = ModelStack.__init__

        def unstacked(self, params_list, what="params_list", stack=True):
            kept_apart(self, params_list, what, stack=False)

        monkeypatch.setattr(ModelStack, "__init__", unstacked)
        unrolled = method(list(models))
        # Partial fusion's isolated neurons are a tie among equally good matchings here, which
        # the batched and the unbatched assignment may break differently: compare functions.
        assert_planted(unrolled, vectorized, compare)
        assert_planted(unrolled, original, compare)


@pytest.mark.parametrize(
    "name,fuse",
    [
        ("fuse", lambda models: jfusion.fuse(models, SPEC).params),
        ("partial fusion", lambda models: jfusion.partial_fuse(models, SPEC, 0.5).params),
        ("barycenter", lambda models: jfusion.barycenter_fuse(models, SPEC, max_iterations=3).params),
    ],
)
def test_models_of_different_widths_fuse_back_to_the_planted_network(name, fuse):
    """A network and a copy with every neuron duplicated (twice as wide) compute one function."""
    original = network(3)
    doubled = duplicate_neurons(original, SPEC, jax.random.key(4))
    fused = fuse([original, doubled])
    np.testing.assert_allclose(mlp_apply(fused, X), mlp_apply(original, X), atol=1e-4)


@dataclasses.dataclass(frozen=True)
class RandomPlans:
    """A method in 15 lines: every model's neurons sent to a random permutation of the target's."""

    seed: int = 0

    def output_width(self, group, reference_width):
        return reference_width

    def reference_plan(self, group, support):
        return None

    def plan(self, group, support, reference_support, model):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.seed), model), zlib.crc32(group.encode()))
        n = support.shape[0]
        plan = jax.nn.one_hot(jax.random.permutation(key, n), n) / n
        return jfusion.OTResult(plan, jnp.float32(0), jnp.bool_(True), jnp.int32(0))

    def coverage(self, group, received):
        return jnp.ones_like(received)


def test_a_new_method_is_one_producer_through_the_same_engine():
    original = network(5)
    # Model 0 aligned onto a copy of itself by random permutations: the function is kept.
    fused = jfusion.fuse_with(RandomPlans(seed=3), [original], SPEC, target=original)
    np.testing.assert_allclose(mlp_apply(fused.params, X), mlp_apply(original, X), atol=1e-5)
    assert max_tree_difference(fused.params, original) > 0.1  # it did permute
    plan = np.asarray(fused.plans["h0"].plan[0]) * 8
    np.testing.assert_array_equal(np.sort(plan.argmax(axis=1)), np.arange(8))


def test_equal_configuration_objects_do_not_recompile():
    models = stacked(permuted_copies(1)[1])
    others = stacked(permuted_copies(2)[1])
    jfusion.fuse(models, SPEC, solver=jfusion.Sinkhorn(epsilon=0.05), alignment=ACTIVATIONS, inputs=X)
    compiled = engine.fusion_program._cache_size()
    # New but equal objects: a Spec rebuilt from its dict, a new solver, a new module.
    rebuilt = jfusion.ByActivations.from_module(MLP((8, 6, 3)))
    jfusion.fuse(others, jfusion.Spec(SPEC.as_dict()), solver=jfusion.Sinkhorn(epsilon=0.05), alignment=rebuilt, inputs=X + 1.0)
    assert engine.fusion_program._cache_size() == compiled
    jfusion.fuse(others, SPEC, solver=jfusion.Sinkhorn(epsilon=0.06), alignment=rebuilt, inputs=X)
    assert engine.fusion_program._cache_size() == compiled + 1  # another epsilon is another program


@pytest.mark.parametrize("solver", ["exact", "sinkhorn"])
def test_fuse_matches_the_numpy_and_pot_reference_on_random_networks(solver):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from numpy_reference import fuse_layers

    model = MLP((12, 10, 4))
    models = [model.init(jax.random.key(k), jnp.ones((1, 6))) for k in range(3)]
    ours = jfusion.fuse(models, mlp_spec(3), solver=jfusion.Sinkhorn(threshold=1e-7) if solver == "sinkhorn" else "exact").params
    layers = [[(np.asarray(m["params"][f"Dense_{i}"]["kernel"]), np.asarray(m["params"][f"Dense_{i}"]["bias"])) for i in range(3)] for m in models]
    reference = fuse_layers(layers, solver=solver, threshold=1e-7)
    for i, (kernel, bias) in enumerate(reference):
        np.testing.assert_allclose(ours["params"][f"Dense_{i}"]["kernel"], kernel, atol=1e-5)
        np.testing.assert_allclose(ours["params"][f"Dense_{i}"]["bias"], bias, atol=1e-5)


def test_loss_barrier_of_a_known_curve():
    # L(p) = -||p||^2 between a and -a: L(t) = -(1 - 2t)^2 ||a||^2, endpoints -||a||^2, so the
    # barrier is ||a||^2, at t = 1/2.
    a = {"w": jnp.array([1.0, 2.0]), "b": jnp.array([2.0])}
    result = jfusion.loss_barrier(
        lambda p: -sum(jnp.sum(x**2) for x in jax.tree.leaves(p)), a, jax.tree.map(jnp.negative, a), num_points=11
    )
    assert float(result.barrier) == pytest.approx(9.0, rel=1e-6)
    np.testing.assert_allclose(result.lambdas, np.linspace(0, 1, 11), atol=1e-7)
    np.testing.assert_allclose(result.values["loss"], -9.0 * (1 - 2 * np.linspace(0, 1, 11)) ** 2, rtol=1e-5, atol=1e-5)
    assert float(jfusion.loss_barrier(lambda p: jnp.sum(p["w"]), a, a).barrier) == pytest.approx(0.0, abs=1e-6)


def test_the_gradient_in_the_model_weights_matches_finite_differences():
    models = stacked([network(k) for k in range(3)])

    def loss(w):
        return jnp.mean(mlp_apply(jfusion.fuse(models, SPEC, model_weights=w).params, X) ** 2)

    w = jnp.array([1.0, 2.0, 0.5])
    grad = np.asarray(jax.grad(loss)(w))
    step = 1e-2
    numeric = [(loss(w.at[k].add(step)) - loss(w.at[k].add(-step))) / (2 * step) for k in range(3)]
    np.testing.assert_allclose(grad, numeric, rtol=2e-2, atol=1e-4)
    assert np.abs(grad).max() > 1e-3


# A toy recurrence whose group "r" is written by its bias and by a kernel that reads "r" itself:
# h0 = relu(b), h1 = relu(h0 W + b), y = h1 V.
RECURRENT = jfusion.Spec({"w": ("r", "r"), "b": ("r",), "v": ("r", None)})


def recurrent_apply(p):
    h = jax.nn.relu(p["b"])
    return jax.nn.relu(h @ p["w"] + p["b"]) @ p["v"]


def test_prune_honours_sweeps_as_fuse_does():
    rng = np.random.default_rng(0)
    original = {"w": jnp.asarray(rng.normal(size=(2, 2)), jnp.float32), "b": jnp.ones((2,)), "v": jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)}
    doubled = duplicate_neurons(original, RECURRENT, jax.random.key(1))
    # Every neuron has the same bias: one sweep (bias only) cannot tell the two originals
    # apart; the second sweep adds the recurrent kernel's rows, which can.
    merged = jfusion.prune(doubled, RECURRENT, 0.5, alignment=jfusion.ByWeights(sweeps=2)).params
    np.testing.assert_allclose(recurrent_apply(merged), recurrent_apply(original), atol=1e-5)
    blind = jfusion.prune(doubled, RECURRENT, 0.5, alignment=jfusion.ByWeights(sweeps=1)).params
    assert not np.allclose(recurrent_apply(blind), recurrent_apply(original), atol=1e-3)


def test_prune_by_activations_uses_the_models_own_function_as_fuse_does():
    doubled = duplicate_neurons(network(6), SPEC, jax.random.key(2))
    good = jfusion.ByActivations.from_module(WIDE)
    missing = jfusion.ByActivations(lambda v, x: {}, model_fns=(good.fn,))
    with_model_fns = jfusion.prune(doubled, SPEC, 0.5, alignment=missing, inputs=X).params
    plain = jfusion.prune(doubled, SPEC, 0.5, alignment=good, inputs=X).params
    assert max_tree_difference(with_model_fns, plain) == 0.0
    np.testing.assert_allclose(mlp_apply(plain, X), mlp_apply(network(6), X), atol=1e-4)


def test_the_core_imports_neither_methods_nor_workflow_nor_models():
    for path in (ROOT / "src" / "jfusion" / "core").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jfusion"):
                assert node.module.startswith("jfusion.core"), f"{path.name} imports {node.module}"
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("jfusion") or alias.name.startswith("jfusion.core"), path.name
