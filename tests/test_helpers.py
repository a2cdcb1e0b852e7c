"""The helpers users wrote by hand: stacking and unstacking K models, taking model k out of a
stack, and the module of a fused pytree's widths (partial fusion widens every group)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from planted import random_variables

import jfusion
from jfusion.models import CNN, MLP, VGG, RecurrentClassifier, ResNet, mlp_spec


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


MODEL = MLP((6, 5, 3))
MODELS = [random_variables(MODEL, (4,), seed) for seed in range(3)]


def test_unstack_of_stack_is_the_list_and_take_model_is_its_item():
    stacked = jfusion.stack_models(MODELS)
    assert stacked["params"]["Dense_0"]["kernel"].shape == (3, 4, 6)
    unstacked = jfusion.unstack_models(stacked)
    assert len(unstacked) == 3
    for k, model in enumerate(MODELS):
        assert_trees_equal(unstacked[k], model)
        assert_trees_equal(jfusion.take_model(stacked, k), model)
    assert_trees_equal(jfusion.take_model(stacked, -1), MODELS[2])
    assert_trees_equal(jfusion.stack_models(unstacked), stacked)


def test_take_model_keeps_an_nnx_state():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(3, 2, rngs=rngs)
            self.norm = nnx.BatchNorm(2, rngs=rngs)

    states = [nnx.state(Net(nnx.Rngs(seed))) for seed in range(2)]
    stacked = jfusion.stack_models(states)
    one = jfusion.take_model(stacked, 1)
    assert isinstance(one, nnx.State)
    assert_trees_equal(one, states[1])
    assert_trees_equal(jfusion.unstack_models(stacked)[0], states[0])


def test_take_model_refuses_bad_indices_and_unstacked_trees():
    stacked = jfusion.stack_models(MODELS)
    with pytest.raises(jfusion.FusionInputError, match="model 3 is out of range for a stack of 3"):
        jfusion.take_model(stacked, 3)
    with pytest.raises(jfusion.FusionInputError, match="k must be an int"):
        jfusion.take_model(stacked, 0.0)
    with pytest.raises(jfusion.FusionInputError, match="same leading model axis"):
        jfusion.take_model(MODELS[0], 0)  # one model: leaves of different leading sizes


def test_module_for_a_partial_fusion_applies_it():
    # alpha = 1 keeps every neuron: the fused network computes the ensemble's mean logits.
    x = jax.random.normal(jax.random.key(0), (5, 4))
    partial = jfusion.partial_fuse(MODELS[:2], MODEL.spec(), 1.0)
    wide = jfusion.module_for(MODEL, partial.params)
    assert wide == MLP((12, 10, 3))
    assert jfusion.widths_of(partial.params, MODEL.spec()) == {"h0": 12, "h1": 10}
    ensemble = jfusion.ensemble_apply(MODEL.apply, MODELS[:2], x)
    np.testing.assert_allclose(wide.apply(partial.params, x), ensemble, atol=1e-5)


def shapes_of(model, input_shape):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.ones((1, *input_shape))))


@pytest.mark.parametrize(
    "model, wider, input_shape",
    [
        (CNN((4, 6), (8, 10), image_size=8), CNN((5, 9), (12, 10), image_size=8), (8, 8, 1)),
        (VGG((4, "M", 6, "M"), width=0.5, num_classes=3), VGG((3, "M", 7, "M"), num_classes=3), (8, 8, 3)),
        (RecurrentClassifier((5, 6), cell="gru"), RecurrentClassifier((7, 9), cell="gru"), (4, 3)),
        (ResNet((2, 1), (4, 8)), ResNet((2, 1), (6, 12)), (8, 8, 3)),
        (ResNet((1, 1), (4, 8), stem_width=3), ResNet((1, 1), (6, 12), stem_width=5), (8, 8, 3)),
    ],
    ids=["cnn", "vgg", "gru", "resnet", "resnet-stem"],
)
def test_module_for_reads_the_widths_of_every_reference_model(model, wider, input_shape):
    # Shapes alone decide: the variables of the wider model give back the wider model.
    rebuilt = jfusion.module_for(model, shapes_of(wider, input_shape))
    assert jax.tree.map(lambda s: s.shape, shapes_of(rebuilt, input_shape)) == jax.tree.map(
        lambda s: s.shape, shapes_of(wider, input_shape)
    )
    assert rebuilt.spec() == wider.spec()


def test_module_for_your_own_model_takes_a_builder_and_its_spec():
    spec = mlp_spec(3)
    wide = shapes_of(MLP((9, 7, 3)), (4,))
    built = jfusion.module_for(lambda widths: MLP((widths["h0"], widths["h1"], 3)), wide, spec)
    assert built == MLP((9, 7, 3))
    with pytest.raises(TypeError, match="pass the Spec"):
        jfusion.module_for(lambda widths: None, wide)


def test_module_for_refuses_widths_the_model_cannot_have():
    model = ResNet((2, 1), (4, 8))
    widths = {g: w for g, w in jfusion.widths_of(shapes_of(model, (8, 8, 3)), model.spec()).items()}
    with pytest.raises(ValueError, match="'s0.b1' is 5 wide but its stage 's0' is 4"):
        model.with_widths({**widths, "s0.b1": 5})
    with pytest.raises(ValueError, match="has no group 'h7'"):
        MODEL.with_widths({"h7": 3})
    with pytest.raises(jfusion.SpecError):
        jfusion.module_for(MODEL, shapes_of(ResNet((1,), (4,)), (8, 8, 3)))


def test_the_helpers_are_exported_with_docstrings():
    for name in ("stack_models", "unstack_models", "take_model", "module_for", "widths_of"):
        assert name in jfusion.__all__ and getattr(jfusion, name).__doc__
