"""Bad input gets an error naming the leaf path, the axis, and the expected and found sizes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jfusion
from jfusion.models import MLP, mlp_spec
from planted import max_tree_difference

SPEC = mlp_spec(3)


def init(features, seed=0, inputs=6):
    return MLP(features).init(jax.random.key(seed), jnp.ones((1, inputs)))


def test_mismatched_tree_structures():
    with pytest.raises(jfusion.FusionInputError, match=r"params_list\[1\] has a different tree structure.*Dense_2"):
        jfusion.fuse([init((5, 4, 3)), init((5, 3))], SPEC).params


def test_no_models():
    with pytest.raises(jfusion.FusionInputError, match=r"empty.*K >= 1"):
        jfusion.fuse([], SPEC).params
    stacked = jax.tree.map(lambda x: x[None][:0], init((5, 4, 3)))
    with pytest.raises(jfusion.FusionInputError, match="model axis of size 0"):
        jfusion.fuse(stacked, SPEC).params


def test_stacked_input_with_ragged_model_axis():
    stacked = jax.tree.map(lambda x: jnp.stack([x, x]), init((5, 4, 3)))
    stacked["params"]["Dense_1"]["bias"] = stacked["params"]["Dense_1"]["bias"][:1]
    with pytest.raises(jfusion.FusionInputError, match=r"2 models on axis 0 but 'params/Dense_1/bias' has 1"):
        jfusion.fuse(stacked, SPEC).params


def test_spec_that_does_not_fit_names_the_model_path_axis_and_sizes():
    wrong = jfusion.Spec({**SPEC.as_dict(), "params/Dense_1/bias": ("h0",)})
    with pytest.raises(jfusion.SpecError, match=r"model 0: params/Dense_1/bias axis 0 gives group 'h0' size 4, but params/Dense_0/kernel axis 1 gives it size 5"):
        jfusion.fuse([init((5, 4, 3)), init((5, 4, 3), 1)], wrong).params
    with pytest.raises(jfusion.SpecError, match=r"labels \['params/Dense_9/kernel'\] but the pytree has no such leaves"):
        jfusion.fuse([init((5, 4, 3))], jfusion.Spec({**SPEC.as_dict(), "params/Dense_9/kernel": ("h1", None)})).params
    # A plain dict is a Spec; anything else is named.
    assert max_tree_difference(jfusion.fuse([init((5, 4, 3))], SPEC.as_dict()).params, init((5, 4, 3))) == 0.0
    with pytest.raises(TypeError, match="spec must be a jfusion.Spec or a dict"):
        jfusion.fuse([init((5, 4, 3))], list(SPEC.as_dict()))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_weights_name_the_model_and_leaf(bad):
    broken = init((5, 4, 3), 1)
    broken["params"]["Dense_1"]["kernel"] = broken["params"]["Dense_1"]["kernel"].at[2, 3].set(bad)
    with pytest.raises(jfusion.FusionInputError, match=r"model 1: leaf params/Dense_1/kernel has NaN or Inf values \(first at index \[2, 3\]\)"):
        jfusion.fuse([init((5, 4, 3)), broken], SPEC).params
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), init((5, 4, 3)), broken)
    with pytest.raises(jfusion.FusionInputError, match=r"model 1: leaf params/Dense_1/kernel"):
        jfusion.fuse(stacked, SPEC).params


def test_exact_solver_on_a_width_ratio_it_cannot_do_suggests_sinkhorn():
    with pytest.raises(jfusion.FusionInputError, match=r"group 'h0'.*n=6 source and m=4 target.*Sinkhorn"):
        jfusion.fuse([init((6, 4, 3))], SPEC, target=init((4, 4, 3))).params
    # The same fusion is fine with Sinkhorn.
    fused = jfusion.fuse([init((6, 4, 3))], SPEC, target=init((4, 4, 3)), solver=jfusion.Sinkhorn()).params
    assert fused["params"]["Dense_0"]["kernel"].shape == (6, 4)


def test_ungrouped_axes_must_agree():
    with pytest.raises(jfusion.FusionInputError, match=r"model 1: params/Dense_0/kernel axis 0 has size 7, which maps to 7 in the target, but the target has 6"):
        jfusion.fuse([init((5, 4, 3)), init((5, 4, 3), inputs=7)], SPEC).params


def test_bad_weights_and_target():
    models = [init((5, 4, 3)), init((5, 4, 3), 1)]
    with pytest.raises(jfusion.FusionInputError, match=r"weights has shape \(3,\); expected \(2,\)"):
        jfusion.fuse(models, SPEC, model_weights=[1.0, 1.0, 1.0]).params
    with pytest.raises(jfusion.FusionInputError, match="non-negative"):
        jfusion.fuse(models, SPEC, model_weights=[1.0, -1.0]).params
    with pytest.raises(jfusion.FusionInputError, match="target=2 is not a model index for K=2"):
        jfusion.fuse(models, SPEC, target=2).params
    with pytest.raises(jfusion.FusionInputError, match="target has a different tree"):
        jfusion.fuse(models, SPEC, target=init((5, 3))).params


def test_activation_alignment_needs_inputs_and_a_source():
    models = [init((5, 4, 3)), init((5, 4, 3), 1)]
    with pytest.raises(ValueError, match=r"Activations\(fn\)"):
        jfusion.fuse(models, SPEC, alignment="activations").params
    with pytest.raises(jfusion.FusionInputError, match="needs inputs=x"):
        jfusion.fuse(models, SPEC, alignment=jfusion.ByActivations(lambda v, x: {})).params


class SowsNothing(nn.Module):
    """An MLP of the same leaves as ``MLP((5, 4, 3))`` that sows nothing."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(5, name="Dense_0")(x))
        x = nn.relu(nn.Dense(4, name="Dense_1")(x))
        return nn.Dense(3, name="Dense_2")(x)


class NnxSowsNothing(nnx.Module):
    def __init__(self, rngs):
        self.first = nnx.Linear(6, 5, rngs=rngs)
        self.out = nnx.Linear(5, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.first(x)))


def test_activation_alignment_on_a_model_that_sows_nothing_says_what_to_do():
    x = jnp.ones((4, 6))
    model = SowsNothing()
    models = [model.init(jax.random.key(k), x) for k in (0, 1)]
    with pytest.raises(jfusion.SpecError) as raised:
        jfusion.fuse(models, SPEC, alignment=jfusion.ByActivations.from_module(model), inputs=x).params
    message = str(raised.value)
    assert "returned no activations at all: the model sows none" in message
    assert "ByActivations.from_module(model, points=...)" in message and "points=spec" in message
    assert "self.sow('activations', 'h0', x)" in message and "self.sow(nnx.Intermediate, 'h0', x)" in message
    # Both remedies work: points= on the same model, or a model that sows.
    jfusion.fuse(models, SPEC, alignment=jfusion.ByActivations.from_module(model, points=SPEC), inputs=x).params
    jfusion.fuse(models, SPEC, alignment=jfusion.ByActivations.from_module(MLP((5, 4, 3))), inputs=x).params

    module = NnxSowsNothing(nnx.Rngs(0))
    states = [nnx.state(module), nnx.state(NnxSowsNothing(nnx.Rngs(1)))]
    spec = mlp_spec(["first", "out"], prefix="")
    with pytest.raises(jfusion.SpecError, match=r"no activations at all.*points=spec.*nnx.Intermediate"):
        jfusion.fuse(states, spec, alignment=jfusion.ByActivations.from_module(module), inputs=x).params


def test_activations_missing_for_one_group_name_the_ones_returned():
    models = [init((5, 4, 3)), init((5, 4, 3), 1)]
    only_h0 = jfusion.ByActivations(lambda v, x: {"h0": jnp.ones((x.shape[0], 5))})
    with pytest.raises(jfusion.SpecError, match=r"group 'h1': .*activations for \['h0'\] but none for 'h1'.*points="):
        jfusion.fuse(models, SPEC, alignment=only_h0, inputs=jnp.ones((4, 6))).params
