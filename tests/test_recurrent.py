"""Recurrent networks: hidden units carried by the hidden-to-hidden kernels on both axes."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from planted import duplicate_neurons, max_tree_difference, random_variables

import jfusion
from jfusion.models import RecurrentClassifier, build_model, rnn_spec

CELLS = ["simple", "lstm", "gru"]
SEQUENCE = (7, 5)  # steps, features
X = jax.random.normal(jax.random.key(1), (16, *SEQUENCE))


def model_and_variables(cell, seed, hidden=(24, 16)):
    model = RecurrentClassifier(hidden, num_classes=5, cell=cell)
    # Random biases and scale 0.5: saturating gates (or all-zero biases) would let a wrong
    # label go unnoticed.
    return model, random_variables(model, SEQUENCE, seed, scale=0.5)


@pytest.mark.parametrize("cell", CELLS)
def test_spec_labels_every_gate_and_survives_permutations(cell):
    model, variables = model_and_variables(cell, 0)
    jfusion.check_spec(model.apply, variables, model.spec(), X)
    wrong = dict((leaf.path, leaf.axes) for leaf in model.spec().leaves)
    square = next(p for p, axes in wrong.items() if axes == ("r0", "r0"))
    wrong[square] = (None, "r0")  # a hidden-to-hidden kernel whose input axis is forgotten
    with pytest.raises(jfusion.SpecError, match=re.escape(square)):
        jfusion.check_spec(model.apply, variables, jfusion.Spec(wrong), X)


@pytest.mark.parametrize("cell", CELLS)
def test_planted_permutations_are_recovered_by_weights_and_by_activations(cell):
    model, _ = model_and_variables(cell, 0)
    spec = model.spec()
    methods = {
        "weights": jfusion.ByWeights(),
        "weights, 2 sweeps": jfusion.ByWeights(sweeps=2),
        "activations": jfusion.ByActivations.from_module(model),
    }
    # Compiled once per method, run on every seed.
    fusions = {
        name: jax.jit(lambda a, b, alignment=alignment: jfusion.fuse([a, b], spec, alignment=alignment, inputs=X).params)
        for name, alignment in methods.items()
    }
    apply = jax.jit(model.apply)
    for seed in range(10):
        _, original = model_and_variables(cell, seed)
        permuted, perms = jfusion.permute(original, spec, jax.random.key(100 + seed))
        assert any((np.asarray(p) != np.arange(len(p))).any() for p in perms.values())
        np.testing.assert_allclose(apply(permuted, X), apply(original, X), atol=1e-5)
        for name, fuse in fusions.items():
            assert max_tree_difference(fuse(original, permuted), original) < 1e-5, (cell, seed, name)


@pytest.mark.parametrize("cell", ["simple", "lstm"])
def test_duplicated_hidden_units_fuse_back_into_the_original_widths(cell):
    model, original = model_and_variables(cell, 3)
    wide = RecurrentClassifier((48, 32), num_classes=5, cell=cell)
    spec = model.spec()
    doubled = duplicate_neurons(original, spec, jax.random.key(5))
    np.testing.assert_allclose(wide.apply(doubled, X), model.apply(original, X), atol=1e-5)
    for alignment in (jfusion.ByWeights(sweeps=2), jfusion.ByActivations.from_module(wide, target_module=model)):
        # The wide model fused into the original's widths: each pair of copies merges back.
        compressed = jfusion.fuse([doubled], spec, alignment=alignment, inputs=X, target=original).params
        assert max_tree_difference(compressed, original) < 1e-5
    # Two models of different widths together.
    fused = jfusion.fuse([original, doubled], spec, alignment=jfusion.ByWeights(sweeps=2), model_weights=[0.3, 0.7]).params
    assert max_tree_difference(fused, original) < 1e-5


def test_k_permuted_copies_of_an_lstm_fuse_back_with_model_weights():
    model, original = model_and_variables("lstm", 4)
    spec = model.spec()
    copies = [original] + [jfusion.permute(original, spec, jax.random.key(k))[0] for k in range(1, 4)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *copies)
    fused = jax.jit(lambda m: jfusion.fuse(m, spec, alignment=jfusion.ByWeights(sweeps=2), model_weights=[4, 3, 2, 1]).params)(stacked)
    assert max_tree_difference(fused, original) < 1e-5


def test_registry_builds_the_rnn_and_its_spec_reads_images_row_by_row():
    model = build_model("rnn", hidden=[32], cell="gru")
    variables = model.init(jax.random.key(0), jnp.ones((1, 28, 28, 1)))
    assert model.spec() == rnn_spec("gru", 1)
    assert variables["params"]["Recurrent_0"]["iz"]["kernel"].shape == (28, 32)  # a row is a step
    with pytest.raises(jfusion.models.ModelConfigError, match="cell"):
        build_model("rnn", cell="transformer")
