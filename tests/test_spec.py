import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn
from flax import nnx

import jfusion
from jfusion.models import CNN, MLP, cnn_spec, mlp_spec
from jfusion.core.tree import flatten


def shapes_of(tree):
    return {p: np.shape(x) for p, x in flatten(tree)[0].items()}


def test_groups_are_in_topological_order_whatever_the_dict_order():
    spec = jfusion.Spec(
        {
            "params/Dense_2/kernel": ("h1", None),
            "params/Dense_1/kernel": ("h0", "h1"),
            "params/Dense_0/kernel": (None, "h0"),
        }
    )
    assert spec.groups == ("h0", "h1")
    assert [leaf.path for leaf in spec.writers("h1")] == ["params/Dense_1/kernel"]
    assert [leaf.path for leaf in spec.readers("h1")] == ["params/Dense_2/kernel"]


def test_view_dims_output_and_input_groups():
    leaf = jfusion.Spec({"k": ((49, "c"), "f"), "c": (None, "c"), "f": ("f",), "out": ("f", None)})["k"]
    assert leaf.dims == (49, "c", "f")
    assert leaf.output_group == "f" and leaf.input_groups == ("c",)
    assert leaf.view_shape((49 * 8, 16), {"c": 8, "f": 16}) == (49, 8, 16)
    assert leaf.shape_for((49 * 8, 16), {"c": 8, "f": 16}, {"c": 4, "f": 16}) == (49 * 4, 16)


def test_validate_reads_widths_including_groups_only_known_from_views():
    spec = cnn_spec(2, 2, 49)
    variables = CNN((8, 16), (32, 10)).init(jax.random.key(0), jnp.ones((1, 28, 28, 1)))
    assert spec.validate(shapes_of(variables)) == {"c0": 8, "c1": 16, "f0": 32}


def test_a_view_with_an_inferred_dim_gives_the_group_its_size():
    spec = jfusion.Spec({"w": ((None, "g"), None), "b": (None, "g")})
    assert spec.validate({"w": (6 * 7, 3), "b": (5, 7)}) == {"g": 7}
    with pytest.raises(jfusion.SpecError, match=r"w axis 0 .*size 40.*not divisible|w: axis 0 has size 40"):
        spec.validate({"w": (40, 3), "b": (5, 7)})


def test_missing_path_names_the_path():
    spec = mlp_spec(3)
    shapes = shapes_of(MLP((4, 5, 2)).init(jax.random.key(0), jnp.ones((1, 3))))
    del shapes["params/Dense_1/bias"]
    with pytest.raises(jfusion.SpecError, match=r"params/Dense_1/bias.*no such leaves"):
        spec.validate(shapes, "model 1")


def test_unlabelled_leaf_is_an_error_that_says_how_to_declare_it():
    spec = mlp_spec(2, bias=False)
    shapes = shapes_of(MLP((4, 2)).init(jax.random.key(0), jnp.ones((1, 3))))
    with pytest.raises(jfusion.SpecError, match=r"Dense_0/bias.*not in the spec.*None per axis"):
        spec.validate(shapes)


def test_wrong_axis_count_names_path_and_shapes():
    spec = jfusion.Spec({"params/w": (None, "h"), "params/b": ("h",), "params/out": ("h", None)})
    with pytest.raises(jfusion.SpecError, match=r"params/w has 3 axes \(shape \(2, 3, 4\)\).*labels 2"):
        spec.validate({"params/w": (2, 3, 4), "params/b": (4,), "params/out": (4, 2)})


def test_one_group_with_two_sizes_names_both_leaves_axes_and_sizes():
    spec = mlp_spec(3)
    shapes = shapes_of(MLP((4, 5, 2)).init(jax.random.key(0), jnp.ones((1, 3))))
    shapes["params/Dense_0/bias"] = (7,)
    with pytest.raises(jfusion.SpecError) as err:
        spec.validate(shapes, "model 0")
    message = str(err.value)
    for part in ["model 0", "params/Dense_0/bias axis 0", "size 7", "'h0'", "params/Dense_0/kernel axis 1", "size 4"]:
        assert part in message


def test_malformed_specs_are_rejected_when_built():
    with pytest.raises(jfusion.SpecError, match="no leaf writes it"):
        jfusion.Spec({"a": ("h", None)})
    with pytest.raises(jfusion.SpecError, match="cycle"):
        jfusion.Spec({"a": ("g", "h"), "b": ("h", "g")})
    with pytest.raises(jfusion.SpecError, match="more than one inferred"):
        jfusion.Spec({"a": ((None, None), "h")})


def test_a_group_nothing_reads_is_rejected_and_named():
    # A typo on a bias: "h0" is written by the kernel, "hO" by the bias alone.
    axes = {**mlp_spec(2).as_dict(), "params/Dense_0/bias": ("hO",)}
    with pytest.raises(jfusion.SpecError, match=r"group 'hO' is written by \['params/Dense_0/bias'\] but no leaf reads it"):
        jfusion.Spec(axes)


@pytest.mark.parametrize("axes", ["h0", None, 3])
def test_axes_that_are_not_a_tuple_are_rejected_with_the_fix(axes):
    with pytest.raises(jfusion.SpecError, match=r"params/Dense_0/bias: axes must be a tuple"):
        jfusion.Spec({**mlp_spec(2).as_dict(), "params/Dense_0/bias": axes})


def test_groups_and_lookups_are_computed_once():
    from jfusion.models import ResNet18

    spec = ResNet18().spec()
    assert spec.groups is spec.groups  # a stored tuple, not recomputed per access
    assert spec["params/stem_conv/kernel"] is spec.leaves[spec.paths.index("params/stem_conv/kernel")]
    assert "groups in order" in repr(spec) and "params/stem_conv/kernel" in repr(spec)


def test_spec_is_hashable_and_equal_by_value():
    assert hash(mlp_spec(3)) == hash(mlp_spec(3))
    assert mlp_spec(3) == jfusion.Spec(mlp_spec(3).as_dict())


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.first = nnx.Linear(6, 5, rngs=rngs)
        self.second = nnx.Linear(5, 4, rngs=rngs)
        self.out = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.second(nnx.relu(self.first(x)))))


def test_nnx_state_paths_validate_permute_and_fuse():
    graphdef, state = nnx.split(NnxMLP(nnx.Rngs(0)))
    spec = mlp_spec(["first", "second", "out"], prefix="")
    assert spec.validate(shapes_of(state)) == {"h0": 5, "h1": 4}

    def apply(s, x):
        return nnx.merge(graphdef, s)(x)

    x = jax.random.normal(jax.random.key(1), (8, 6))
    jfusion.check_spec(apply, state, spec, x)
    permuted, _ = jfusion.permute(state, spec, jax.random.key(2))
    fused = jfusion.fuse([state, permuted], spec).params
    assert type(fused) is type(state)
    np.testing.assert_allclose(apply(fused, x), apply(state, x), atol=1e-5)


def test_check_spec_catches_a_flatten_labelled_without_its_view():
    model = CNN((4, 6), (8, 3))
    variables = model.init(jax.random.key(0), jnp.ones((1, 12, 12, 1)))
    x = jax.random.normal(jax.random.key(1), (2, 12, 12, 1))
    good = cnn_spec(2, 2, 9)
    jfusion.check_spec(model.apply, variables, good, x)
    # Treat the flattened (9 * 6) axis as ungrouped and make conv 1's group end there.
    axes = good.as_dict()
    axes["params/Dense_0/kernel"] = (None, "f0")
    axes["params/Conv_1/kernel"] = (None, None, "c0", "c1")
    with pytest.raises(jfusion.SpecError, match=r"group 'c1'.*params/Conv_1/kernel"):
        jfusion.check_spec(model.apply, variables, jfusion.Spec(axes), x)


class SplitHidden(nn.Module):
    """One Dense layer whose 16 outputs are two groups laid end to end (6 and 10), read by two layers."""

    @nn.compact
    def __call__(self, x):
        a, b = jnp.split(nn.relu(nn.Dense(16, name="hidden")(x)), [6], axis=-1)
        return nn.Dense(3, name="from_a")(a) + nn.Dense(3, name="from_b")(jnp.tanh(b))


CONCAT_SPEC = jfusion.Spec({
    "params/hidden/kernel": (None, jfusion.Concat("a", "b")),
    "params/hidden/bias": (jfusion.Concat("a", "b"),),
    **jfusion.layers.dense("from_a", "a", None),
    **jfusion.layers.dense("from_b", "b", None),
})


def test_concat_blocks_are_leaves_of_their_own_permuted_and_recovered_apart():
    model, x = SplitHidden(), jax.random.normal(jax.random.key(0), (32, 6))
    params = model.init(jax.random.key(1), x)
    spec = CONCAT_SPEC
    assert spec.paths[:2] == ("params/hidden/kernel[0]", "params/hidden/kernel[1]")
    assert spec.part_of("params/hidden/bias[1]") == ("params/hidden/bias", 1)
    with pytest.raises(KeyError, match=r"has a Concat axis, so the spec holds its blocks as the leaves \['params/hidden/kernel\[0\]'"):
        spec["params/hidden/kernel"]
    assert spec.validate(shapes_of(params)) == {"a": 6, "b": 10}  # the blocks are sized by their groups
    assert jfusion.Spec(spec.as_dict()) == spec and hash(jfusion.Spec(spec)) == hash(spec)
    # split / join round trip, with a leading model axis too
    leaves = flatten(params)[0]
    parts = spec.split(leaves)
    assert list(parts) == [q for p in leaves for q in spec.part_paths(p)]  # the parts where the leaf was
    assert spec.part_paths("params/hidden/bias") == ("params/hidden/bias[0]", "params/hidden/bias[1]")
    np.testing.assert_array_equal(parts["params/hidden/kernel[1]"], leaves["params/hidden/kernel"][:, 6:])
    joined = spec.join(parts)
    assert list(joined) == list(leaves) and all(np.array_equal(joined[p], leaves[p]) for p in leaves)
    stacked = flatten(jfusion.stack_models([params, params]))[0]
    assert spec.split(stacked, {"a": 6, "b": 10})["params/hidden/bias[0]"].shape == (2, 6)
    # a and b are permuted independently; fusion recovers both, by weights and by activations
    jfusion.check_spec(model.apply, params, spec, x)
    shuffled, perms = jfusion.permute(params, spec, jax.random.key(3))
    assert not np.array_equal(perms["a"], perms["b"])
    np.testing.assert_allclose(model.apply(shuffled, x), model.apply(params, x), atol=1e-5)
    by_activations = jfusion.ByActivations.from_module(model, points=spec)
    for result in (
        jfusion.fuse([params, shuffled], spec, solver="exact"),
        jfusion.fuse([params, shuffled], spec, solver="exact", alignment=by_activations, inputs=x),
        jfusion.partial_fuse([params, shuffled], spec, alpha=0.0),
    ):
        for g in ("a", "b"):
            np.testing.assert_array_equal(np.asarray(result.plans[g].plan[1]).argmax(axis=1), perms[g])
        jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, atol=1e-5), result.params, params)
    # by activations, each group is its block of the layer's outputs
    hidden = x @ params["params"]["hidden"]["kernel"] + params["params"]["hidden"]["bias"]
    acts = by_activations.fn(params, x)
    np.testing.assert_allclose(acts["a"], hidden[:, :6], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(acts["b"], hidden[:, 6:], rtol=1e-5, atol=1e-6)
    # into a narrower target: the blocks take the target's widths (a pruned copy of the model)
    narrow = jfusion.prune(params, spec, {"a": 3, "b": 5}, method="merge").params
    assert narrow["params"]["hidden"]["kernel"].shape == (6, 8)
    fused = jfusion.fuse([narrow, jfusion.permute(narrow, spec, jax.random.key(4))[0]], spec, solver="exact").params
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, atol=1e-5), fused, narrow)
    with pytest.raises(jfusion.SpecError, match=r"module 'hidden' writes it as blocks .* of a Concat axis"):
        jfusion.repair(params, [params, shuffled], spec, x, model=model)


def test_concat_labels_are_checked_with_the_leaf_axis_and_sizes():
    with pytest.raises(jfusion.SpecError, match="at least two blocks"):
        jfusion.Concat("a")
    with pytest.raises(jfusion.SpecError, match=r"block \(None, 'a'\) has no size of its own"):
        jfusion.Concat("a", (None, "a"))
    with pytest.raises(jfusion.SpecError, match="nests a Concat"):
        jfusion.Concat("a", jfusion.Concat("b", "c"))
    with pytest.raises(jfusion.SpecError, match=r"w: axes \[0, 1\] are both Concat"):
        jfusion.Spec({"w": (jfusion.Concat("a", "b"), jfusion.Concat("a", "b")), "r": ("a", "b")})
    shapes = {"params/hidden/kernel": (6, 15), "params/hidden/bias": (15,), "params/from_a/kernel": (6, 3),
              "params/from_a/bias": (3,), "params/from_b/kernel": (10, 3), "params/from_b/bias": (3,)}
    with pytest.raises(jfusion.SpecError, match=r"model 1: params/hidden/kernel axis 1 \(Concat\('a', 'b'\)\) has size 15, but its blocks' sizes \[6, 10\] add up to 16"):
        CONCAT_SPEC.validate(shapes, "model 1")
    with pytest.raises(jfusion.SpecError, match=r"params/hidden/bias axis 0 .* has size 16, but its blocks' sizes \[6, 10\] add up to 16|params/hidden/kernel axis 1"):
        CONCAT_SPEC.validate({**shapes, "params/hidden/bias": (16,)})
    # blocks sized by each other: the one group known elsewhere fixes the other's width
    half = jfusion.Spec({"w": (None, jfusion.Concat("a", "b")), "u": ("a", None), "v": ("b", "c"), "o": ("c", None)})
    assert half.validate({"w": (2, 9), "u": (4, 1), "v": (5, 3), "o": (3, 1)}) == {"a": 4, "b": 5, "c": 3}
    with pytest.raises(jfusion.SpecError, match=r"the spec labels \['params/hidden/bias'\] but the pytree has no such leaves"):
        CONCAT_SPEC.validate({"params/hidden/kernel": (6, 16), "params/from_a/kernel": (8, 3),
                              "params/from_a/bias": (3,), "params/from_b/kernel": (8, 3), "params/from_b/bias": (3,)})
