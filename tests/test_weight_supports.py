"""Weight supports are weights: running statistics never enter them; residual streams warn."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from bn_nets import bn_spec, linen_model, nnx_model

import jfusion
from jfusion.core.tree import flatten, running_statistics, unflatten
from jfusion.models import mlp_spec, resnet_spec, rnn_spec


def test_running_statistics_are_found_in_linen_and_nnx_trees():
    _, variables = linen_model(jax.random.key(0))
    assert running_statistics(variables) == {f"batch_stats/bn{i}/{s}" for i in (0, 1) for s in ("mean", "var")}
    _, state = nnx_model(jax.random.key(0))
    assert running_statistics(state) == {f"bn{i}/{s}" for i in (0, 1) for s in ("mean", "var")}
    assert running_statistics({"params": {"w": jnp.ones(2)}}) == frozenset()


def _with_statistics_of(tree, source, scale=1.0):
    """``tree`` with ``source``'s running statistics (times ``scale``)."""
    stats = running_statistics(tree)
    leaves, treedef = flatten(tree)
    other = flatten(source)[0]
    return unflatten(treedef, {p: scale * other[p] if p in stats else x for p, x in leaves.items()})


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_running_statistics_that_disagree_with_the_weights_do_not_change_weight_alignment(api):
    _, variables = (linen_model if api == "linen" else nnx_model)(jax.random.key(1))
    variables = _with_statistics_of(variables, variables, scale=100.0)  # moments far larger than weights
    spec = bn_spec(nnx_paths=api == "nnx")
    permuted, perms = jfusion.permute(variables, spec, jax.random.key(2))
    # The permuted copy keeps the original's statistics in the original order: as supports they
    # would match every neuron to itself (zero distance), the weights say the permutation.
    scrambled = _with_statistics_of(permuted, variables)
    aligned = jfusion.align([variables, scrambled], spec)
    for group, perm in perms.items():
        # Plan row p of the permuted copy sends its neuron p (old neuron perm[p]) onto perm[p].
        expected = np.eye(len(perm))[np.asarray(perm)] / len(perm)
        np.testing.assert_allclose(aligned.plans[group].plan[1], expected, atol=1e-6)
    # The statistics are still transported with their channels.
    back = flatten(jfusion.take_model(aligned.aligned, 1))[0]
    given = flatten(scrambled)[0]
    for path in running_statistics(variables):
        inverse = np.argsort(np.asarray(perms[spec[path].output_group]))
        np.testing.assert_allclose(back[path], np.asarray(given[path])[inverse], rtol=1e-6)


def test_residual_streams_of_the_builders():
    assert resnet_spec((1, 1), (4, 8)).residual_streams == ("s0", "s1")
    assert resnet_spec((1, 1), (4, 8), stem_width=2).residual_streams == ("s0", "s1")
    assert mlp_spec(3).residual_streams == ()
    assert rnn_spec("lstm", 2).residual_streams == ()  # the gates read the same inputs
    assert bn_spec().residual_streams == ()


def test_weight_alignment_of_a_residual_network_warns():
    model = jfusion.models.ResNet((1,), (2,), num_classes=2)
    x = jnp.ones((1, 4, 4, 1))
    variables = model.init(jax.random.key(0), x)
    with pytest.warns(jfusion.ResidualStreamWarning, match=r"residual streams \['s0'\].*ByActivations") as warned:
        jfusion.align([variables, variables], model.spec())
    assert all(w.filename == __file__ for w in warned)
    with warnings.catch_warnings():
        warnings.simplefilter("error", jfusion.ResidualStreamWarning)
        jfusion.vanilla_average([variables, variables], model.spec())  # matches nothing: no advice
