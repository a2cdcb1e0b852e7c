"""Structured (attention head) groups: planted permutations of a ViT recovered exactly."""

import functools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from flax import nnx

from planted import assert_same_groups

import jfusion
from jfusion.core.plans import head_plans
from jfusion.core.tree import flatten, unflatten
from jfusion.models.text import NnxTextEncoder, TextEncoder
from jfusion.models.vit import NnxViT, ViT, vit_spec

SEED = 1  # a draw that swaps the two heads and moves dims inside every head


@pytest.fixture(scope="module")
def vit():
    """A tiny ViT (d=8, 2 heads of 4, 1 block, 4 patches), a batch and one jitted apply."""
    model = ViT(patch=7, dim=8, heads=2, blocks=1, mlp=16)
    x = jax.random.normal(jax.random.key(0), (4, 14, 14))
    params = jax.jit(model.init)(jax.random.key(1), x)
    return model, jax.jit(model.apply), params, x


def plan_permutation(plan):
    """``perm`` with row ``q`` of the plan sending all its mass to column ``perm[q]``."""
    plan = np.asarray(plan)
    perm = plan.argmax(axis=1)
    np.testing.assert_allclose(plan[np.arange(len(perm)), perm], 1.0 / len(perm), rtol=1e-6)
    return perm


def test_vit_spec_is_checked_and_planted_permutations_are_recovered_by_weights(vit):
    model, apply, params, x = vit
    assert vit_spec(2).units == ("r", "b0", "b0.mlp", "b1", "b1.mlp")
    assert vit_spec(2).heads == (("b0", ("b0.qk", "b0.vo")), ("b1", ("b1.qk", "b1.vo")))
    spec = model.spec()
    jfusion.check_spec(apply, params, spec, x)  # it perturbs init's constant LayerNorm and biases

    shuffled, perms = jfusion.permute(params, spec, jax.random.key(SEED))
    assert sorted(perms) == sorted(spec.groups + ("b0",))
    assert perms["b0"].tolist() == [1, 0]  # the heads really move, and so do the dims inside them
    for g in ("b0.qk", "b0.vo"):
        inside = np.asarray(perms[g]).reshape(2, 4) % 4
        assert all((row != np.arange(4)).any() for row in inside)
    np.testing.assert_allclose(apply(shuffled, x), apply(params, x), atol=1e-5)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jfusion.ResidualStreamWarning)
        fused = jfusion.fuse([params, shuffled], spec, solver="exact")
    for group, perm in perms.items():  # heads plans (H x H) and every group's flat plan
        np.testing.assert_array_equal(plan_permutation(fused.plans[group].plan[1]), np.asarray(perm), err_msg=group)
    np.testing.assert_allclose(apply(fused.params, x), apply(params, x), atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), fused.params, params)


def test_planted_permutations_are_recovered_by_activations(vit):
    model, apply, params, x = vit
    spec = model.spec()
    shuffled, perms = jfusion.permute(params, spec, jax.random.key(SEED))
    alignment = jfusion.ByActivations.from_module(model, points=spec)  # q and k per head: samples of b0.qk
    fused = jfusion.fuse([params, shuffled], spec, solver="exact", alignment=alignment, inputs=x)
    for group, perm in perms.items():
        np.testing.assert_array_equal(plan_permutation(fused.plans[group].plan[1]), np.asarray(perm), err_msg=group)
    np.testing.assert_allclose(apply(fused.params, x), apply(params, x), atol=1e-5)


def assert_recovered(fused, perms, reference, shuffled, apply, x):
    """The planted permutations keep the function (the spec is right), and every one (heads and
    flat members) is the fused plan: the reference's weights and function again."""
    np.testing.assert_allclose(apply(shuffled, x), apply(reference, x), atol=1e-5)
    for group, perm in perms.items():
        np.testing.assert_array_equal(plan_permutation(fused.plans[group].plan[1]), np.asarray(perm), err_msg=group)
    np.testing.assert_allclose(apply(fused.params, x), apply(reference, x), atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), fused.params, reference)


def random_state(module, seed):
    """The module's nnx state with every leaf random, so that no leaf's permutation goes unseen."""
    leaves, treedef = flatten(nnx.state(module))
    rng = np.random.default_rng(seed)
    return unflatten(treedef, {p: jnp.asarray(rng.normal(size=x.shape) * 0.5, jnp.float32) for p, x in leaves.items()})


def test_nnx_vit_planted_permutations_are_recovered_by_weights_and_by_activations():
    model = NnxViT(image_size=14, patch=7, dim=8, heads=2, blocks=1, mlp=16, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (4, 14, 14))
    graphdef, state = nnx.split(model)
    state = random_state(model, 0)
    apply = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    spec = model.spec()
    assert spec.units == vit_spec(1).units and spec.heads == vit_spec(1).heads
    shuffled, perms = jfusion.permute(state, spec, jax.random.key(SEED))
    assert perms["b0"].tolist() == [1, 0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jfusion.ResidualStreamWarning)
        assert_recovered(jfusion.fuse([state, shuffled], spec, solver="exact"), perms, state, shuffled, apply, x)
    alignment = jfusion.ByActivations.from_module(model, points=spec)  # q, k, v per head: (B, N, H, hd) flattened
    assert {g: layout for g, _, *layout in alignment.fn.points} == {"r": [1, 1], "b0.qk": [2, 1], "b0.vo": [2, 1], "b0.mlp": [1, 1]}
    fused = jfusion.fuse([state, shuffled], spec, solver="exact", alignment=alignment, inputs=x)
    assert_recovered(fused, perms, state, shuffled, apply, x)


def test_text_encoder_planted_permutations_are_recovered_through_the_token_embedding():
    model = TextEncoder(vocab=11, length=6, dim=8, heads=2, blocks=1, mlp=16)
    tokens = jax.random.randint(jax.random.key(0), (4, 5), 0, 11)  # shorter than length: the first rows
    params = jax.jit(model.init)(jax.random.key(1), tokens)
    spec = model.spec()
    assert spec["params/embed/embedding"].axes == (None, "r") and spec.units == ("r", "b0", "b0.mlp")
    shuffled, perms = jfusion.permute(params, spec, jax.random.key(SEED))
    assert perms["b0"].tolist() == [1, 0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jfusion.ResidualStreamWarning)
        fused = jfusion.fuse([params, shuffled], spec, solver="exact")
    assert_recovered(fused, perms, params, shuffled, jax.jit(model.apply), tokens)
    # The nnx encoder shares the blocks: its state's leaves are the nnx spec's, with the same widths.
    nnx_model = NnxTextEncoder(vocab=11, length=6, dim=8, heads=2, blocks=1, mlp=16, rngs=nnx.Rngs(0))
    shapes = {p: x.shape for p, x in flatten(nnx.state(nnx_model))[0].items()}
    assert nnx_model.spec().validate(shapes) == spec.validate({p: x.shape for p, x in flatten(params)[0].items()})


class FusedAttention(nn.Module):
    """Self-attention with one Dense projection ``qkv`` to q, k and v (``(d, 3 H hd)``) and a Dense ``out``."""

    heads: int

    @nn.compact
    def __call__(self, x):
        b, n, d = x.shape
        q, k, v = jnp.moveaxis(nn.Dense(3 * d, name="qkv")(x).reshape(b, n, 3, self.heads, -1), 2, 0)
        return nn.Dense(d, name="out")(nn.dot_product_attention(q, k, v).reshape(b, n, d))


class FusedQKV(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(x.shape[-1], name="embed")(x)
        return nn.Dense(3, name="head")(x + FusedAttention(2, name="attn")(x)).mean(axis=1)


def test_fused_qkv_planted_permutations_are_recovered():
    model, x = FusedQKV(), jax.random.normal(jax.random.key(0), (4, 5, 8))
    params = jax.jit(model.init)(jax.random.key(1), x)
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params)  # no zero biases
    spec = jfusion.Spec({
        **jfusion.layers.dense("embed", None, "r"),
        **jfusion.layers.fused_attention("attn", "r", "b0", 2),
        **jfusion.layers.dense("head", "r", None),
    })
    assert spec.heads == (("b0", ("b0.qk", "b0.vo")),)
    # The queries and keys take one permutation inside each head, the values another.
    shuffled, perms = jfusion.permute(params, spec, jax.random.key(SEED))
    inside = {g: np.asarray(perms[g]).reshape(2, 4) % 4 for g in ("b0.qk", "b0.vo")}
    assert perms["b0"].tolist() == [1, 0] and (inside["b0.qk"] != inside["b0.vo"]).any()
    assert all((row != np.arange(4)).any() for rows in inside.values() for row in rows)
    alignment = jfusion.ByActivations.from_module(model, points=spec)
    third, third_perms = jfusion.permute(params, spec, jax.random.key(SEED + 1))  # K = 3 models
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jfusion.ResidualStreamWarning)
        for aligned_by in ("weights", alignment):
            fused = jfusion.fuse([params, shuffled, third], spec, solver="exact", alignment=aligned_by, inputs=x)
            assert_recovered(fused, perms, params, shuffled, jax.jit(model.apply), x)
            for group, perm in third_perms.items():
                np.testing.assert_array_equal(plan_permutation(fused.plans[group].plan[2]), np.asarray(perm), err_msg=group)
    # By activations, the projection's q and k blocks are samples of qk, its v block of vo.
    acts = alignment.fn(params, x)
    stream = x @ params["params"]["embed"]["kernel"] + params["params"]["embed"]["bias"]
    qkv = (stream @ params["params"]["attn"]["qkv"]["kernel"] + params["params"]["attn"]["qkv"]["bias"]).reshape(-1, 3, 8)
    np.testing.assert_allclose(acts["b0.qk"], jnp.concatenate([qkv[:, 0], qkv[:, 1]]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(acts["b0.vo"], qkv[:, 2], rtol=1e-5, atol=1e-6)
    # trace_spec finds the same layout. Its union-find alone gives q, k and v one member (the
    # blocks of one reshaped axis are one class); its check splits them as attention allows.
    coarse = jfusion.trace_spec(model.apply, params, x, check=False)
    assert coarse["params/attn/qkv/kernel"].axes == ("attn/out", (3, jfusion.Heads("attn/qkv", 2), "attn/qkv.1"))
    traced = jfusion.trace_spec(model.apply, params, x)
    assert_same_groups(traced, spec)
    qk, vo = ((jfusion.Heads("attn/qkv", 2), name) for name in ("attn/qkv.1:0+1", "attn/qkv.1"))
    assert traced.as_dict()["params/attn/qkv/kernel"] == ("attn/out", jfusion.Concat(qk, qk, vo))


def test_a_permutation_that_splits_a_head_is_caught(vit):
    model, apply, params, x = vit
    # Dims swapped across heads, as a one-level plan on the flat (H * hd) axis may do.
    leaves, treedef = jfusion.core.tree.flatten(params)
    spec = model.spec()
    widths = spec.validate({p: np.shape(v) for p, v in leaves.items()})
    split = jnp.array([4, 1, 2, 3, 0, 5, 6, 7])  # dim 0 of head 0 <-> dim 0 of head 1
    moved = jfusion.core.transport.permute_groups(leaves, spec, {"b0.qk": split}, widths)
    assert not np.allclose(apply(jfusion.core.tree.unflatten(treedef, moved), x), apply(params, x), atol=1e-4)


def test_two_level_plan_recovers_head_order_and_keeps_heads_whole():
    heads, hd, d = 3, 4, 5
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, heads, hd, d)).astype(np.float32)  # members qk and vo
    two_level = jax.jit(functools.partial(head_plans, jfusion.Exact(), jfusion.GroundMetric(), "b0"))

    # Planted: the reference is the model with heads reordered and dims shuffled inside each.
    order = np.array([2, 0, 1])
    inside = np.stack([[rng.permutation(hd) for _ in range(heads)] for _ in range(2)])
    y = np.stack([x[m][order][np.arange(heads)[:, None], inside[m]] for m in range(2)])
    out = two_level(tuple(x), tuple(y))
    np.testing.assert_array_equal(plan_permutation(out.heads.plan)[order], np.arange(heads))
    for m in range(2):
        expected = np.argsort((order[:, None] * hd + inside[m]).reshape(-1))
        np.testing.assert_array_equal(plan_permutation(out.members[m].plan), expected)

    # Unrelated models: the flat (one-level) plan splits heads and gives q/k and v/o
    # different head orders; the two-level plan keeps every head whole, with one order.
    y = rng.normal(size=(2, heads, hd, d)).astype(np.float32)
    out = two_level(tuple(x), tuple(y))
    head_order = plan_permutation(out.heads.plan)
    split = False
    for m in range(2):
        structured = plan_permutation(out.members[m].plan).reshape(heads, hd) // hd
        np.testing.assert_array_equal(structured, np.broadcast_to(head_order[:, None], (heads, hd)))
        cost = np.linalg.norm(x[m].reshape(-1, 1, d) - y[m].reshape(1, -1, d), axis=-1)
        rows, flat = scipy.optimize.linear_sum_assignment(cost)  # the one-level plan
        split |= bool((np.ptp(flat.reshape(heads, hd) // hd, axis=1) > 0).any())
        # The flat plan is a relaxation of the structured one: never dearer.
        assert cost[rows, flat].sum() / (heads * hd) <= float(out.members[m].cost) + 1e-5
    assert split


def test_heads_labels_are_validated():
    with pytest.raises(jfusion.SpecError, match=r"k: axis 1 is Heads\('b'\), which must be followed by the dim of a group"):
        jfusion.Spec({"k": ("r", jfusion.Heads("b"), None), "r": (None, "r"), "o": ("r", None)})
    with pytest.raises(jfusion.SpecError, match="group 'g' follows no Heads .* it follows Heads\\('b'\\)"):
        jfusion.Spec({"e": (None, "r"), "k": ("r", jfusion.Heads("b"), "g"), "o": ("g", "r"), "h": ("r", None)})
    # Heads inside a view (a Dense kernel of H * hd outputs) is the same flattened member group.
    view = jfusion.Spec({"e": (None, "r"), "q": ("r", (jfusion.Heads("b", 2), "b.qk")), "k": ("r", (jfusion.Heads("b"), "b.qk")), "o": ("r", None)})
    assert view.validate({"e": (3, 8), "q": (8, 8), "k": (8, 8), "o": (8, 2)}) == {"r": 8, "b": 2, "b.qk": 8}
    assert view["q"].view_shape((8, 8), {"r": 8, "b": 2, "b.qk": 8}) == (8, 8)
    # Blocks of one axis with labels of their own (a concatenation) are no view: a clear error.
    blocks = ((jfusion.Heads("b", 2), "b.qk"), (jfusion.Heads("b", 2), "b.qk"), (jfusion.Heads("b", 2), "b.vo"))
    with pytest.raises(jfusion.SpecError, match=r"qkv/kernel: axis 1 view .* nests a tuple .*fused_attention"):
        jfusion.Spec({"e": (None, "r"), "qkv/kernel": ("r", blocks), "o": ((jfusion.Heads("b", 2), "b.vo"), "r")})
    # A spec without heads: units are its groups, nothing else changes.
    plain = jfusion.models.mlp_spec(3)
    assert plain.units == plain.groups and plain.heads == ()


def test_heads_need_a_producer_that_solves_them(vit):
    model, _, params, x = vit
    with pytest.raises(jfusion.FusionInputError, match="WeightMatching does not solve structured groups"), warnings.catch_warnings():
        warnings.simplefilter("ignore", jfusion.ResidualStreamWarning)
        jfusion.fuse([params, params], model.spec(), alignment=jfusion.WeightMatching())


def planted(params, spec, perms):
    """``params`` with the groups of ``perms`` permuted (flattened member perms keep or move heads)."""
    leaves, treedef = jfusion.core.tree.flatten(params)
    widths = spec.validate({p: np.shape(v) for p, v in leaves.items()})
    moved = jfusion.core.transport.permute_groups(leaves, spec, {g: jnp.asarray(p) for g, p in perms.items()}, widths)
    return jfusion.core.tree.unflatten(treedef, moved)


def test_in_order_heads_cannot_undo_a_head_permutation_but_recover_dims_inside_heads(vit):
    model, apply, params, x = vit
    spec = model.spec()
    shuffled, perms = jfusion.permute(params, spec, jax.random.key(SEED))  # heads swapped
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jfusion.ResidualStreamWarning)
        fused = jfusion.fuse([params, shuffled], spec, heads="in_order")
    np.testing.assert_array_equal(plan_permutation(fused.plans["b0"].plan[1]), [0, 1])
    for g in ("b0.qk", "b0.vo"):  # head h stays head h, so the planted swap is not undone
        assert (plan_permutation(fused.plans[g].plan[1]) // 4 == np.repeat([0, 1], 4)).all(), g
        assert (plan_permutation(fused.plans[g].plan[1]) != np.asarray(perms[g])).any(), g
    for g in ("r", "b0.mlp"):  # groups outside the attention are still found
        np.testing.assert_array_equal(plan_permutation(fused.plans[g].plan[1]), np.asarray(perms[g]), err_msg=g)
    assert not np.allclose(apply(fused.params, x), apply(params, x), atol=1e-3)

    # Heads left in place, dims moved inside each head: in-order matching recovers everything.
    inside = {g: (np.arange(2)[:, None] * 4 + np.asarray(perms[g]).reshape(2, 4) % 4).reshape(-1) for g in ("b0.qk", "b0.vo")}
    kept_heads = {"r": perms["r"], "b0.mlp": perms["b0.mlp"], **inside}
    moved = planted(params, spec, kept_heads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jfusion.ResidualStreamWarning)
        fused = jfusion.fuse([params, moved], spec, heads="in_order")
    for group, perm in kept_heads.items():
        np.testing.assert_array_equal(plan_permutation(fused.plans[group].plan[1]), perm, err_msg=group)
    np.testing.assert_allclose(apply(fused.params, x), apply(params, x), atol=1e-5)


def test_flat_head_plans_find_a_permuted_copy_and_report_the_mass_moved_between_heads(vit):
    model, apply, params, x = vit
    spec = model.spec()
    shuffled, perms = jfusion.permute(params, spec, jax.random.key(SEED))
    alignment = jfusion.ByActivations.from_module(model, points=spec)
    fused = jfusion.fuse([params, shuffled], spec, heads="flat", alignment=alignment, inputs=x)
    for group, perm in perms.items():  # b0: the mass of each head's dims, here whole heads swapped
        np.testing.assert_array_equal(plan_permutation(fused.plans[group].plan[1]), np.asarray(perm), err_msg=group)
    np.testing.assert_allclose(apply(fused.params, x), apply(params, x), atol=1e-5)


def test_identity_groups_keep_the_identity_and_the_rest_is_recovered(vit):
    model, apply, params, x = vit
    spec = model.spec()
    _, perms = jfusion.permute(params, spec, jax.random.key(SEED))
    for kept, unpermuted in ((("r",), ("r",)), (("b0",), ("b0.qk", "b0.vo"))):
        moved_perms = {g: p for g, p in perms.items() if g not in unpermuted and g != "b0"}
        moved = planted(params, spec, moved_perms)
        with warnings.catch_warnings():
            # the only residual stream is kept, so weight alignment has nothing to warn about
            warnings.simplefilter("error" if kept == ("r",) else "ignore", jfusion.ResidualStreamWarning)
            fused = jfusion.fuse([params, moved], spec, identity_groups=kept)
        for group in spec.groups:
            expected = moved_perms.get(group, np.arange(fused.plans[group].plan.shape[-1]))
            np.testing.assert_array_equal(plan_permutation(fused.plans[group].plan[1]), expected, err_msg=f"{kept}: {group}")
        np.testing.assert_allclose(apply(fused.params, x), apply(params, x), atol=1e-5, err_msg=str(kept))

    # The residual stream permuted but kept: the copy is not mapped back.
    shuffled, _ = jfusion.permute(params, spec, jax.random.key(SEED))
    fused = jfusion.fuse([params, shuffled], spec, identity_groups=["r"])
    np.testing.assert_array_equal(plan_permutation(fused.plans["r"].plan[1]), np.arange(8))
    assert not np.allclose(apply(fused.params, x), apply(params, x), atol=1e-3)


def test_head_matching_and_identity_groups_are_validated(vit):
    model, _, params, _ = vit
    spec = model.spec()
    with pytest.raises(jfusion.SpecError, match=r"identity_groups: the spec has no group 'res'; its groups are \['r', 'b0', 'b0.mlp'\]"):
        jfusion.fuse([params, params], spec, identity_groups=("res",))
    with pytest.raises(jfusion.SpecError, match=r"'b0.vo' is a member of Heads\('b0'\).*name 'b0'"):
        jfusion.fuse([params, params], spec, identity_groups=("b0.vo",))
    with pytest.raises(jfusion.FusionInputError, match=r"heads must be one of \('matched', 'in_order', 'flat'\), got 'inorder'"):
        jfusion.fuse([params, params], spec, heads="inorder")
    with pytest.raises(jfusion.FusionInputError, match="identity_groups must be a sequence of group names, got 'r'"):
        jfusion.BalancedPlans(identity_groups="r")
    with pytest.raises(jfusion.FusionInputError, match=r"identity_groups=\['r'\] with WeightMatching"):
        jfusion.fuse([params, params], spec, identity_groups=("r",), alignment=jfusion.WeightMatching())


class HeadCountAttention(nn.Module):
    """A stream of 8, one stock attention layer of ``heads`` heads of 4 (q/k/v width ``4 heads``)."""

    heads: int

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(8, name="embed")(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_features=4 * self.heads, name="attn")(x, x)
        return nn.Dense(3, name="head")(x.mean(axis=1))


def duplicated_heads(params):
    """Every head twice (q, k, v copied, the output projection's rows halved): the same function."""

    def double(path, leaf):
        keys = [p.key for p in path]
        if "attn" not in keys or keys[-2:] == ["out", "bias"]:
            return leaf
        if keys[-2] == "out":
            return jnp.repeat(leaf, 2, axis=0) / 2
        return jnp.repeat(leaf, 2, axis=1 if keys[-1] == "kernel" else 0)

    return jax.tree_util.tree_map_with_path(double, params)


@pytest.mark.filterwarnings("ignore::jfusion.ResidualStreamWarning")
@pytest.mark.parametrize("solver", ["exact", jfusion.Sinkhorn(epsilon=1e-3)], ids=["exact", "sinkhorn"])
def test_heads_of_a_wider_model_fuse_into_fewer_heads(solver):
    spec = jfusion.Spec({**jfusion.layers.dense("embed", None, "r"), **jfusion.layers.attention("attn", "r", "b0"),
                         **jfusion.layers.dense("head", "r", None)})
    x = jax.random.normal(jax.random.key(0), (4, 5, 6))
    small, big = HeadCountAttention(2), HeadCountAttention(4)
    params = small.init(jax.random.key(1), x)
    doubled, perms = jfusion.permute(duplicated_heads(params), spec, jax.random.key(SEED))
    assert np.asarray(perms["b0"]).tolist() != [0, 1, 2, 3]
    np.testing.assert_allclose(big.apply(doubled, x), small.apply(params, x), atol=1e-5)
    # Into the 2-head target alone, and with it (the unrolled path of models of other widths).
    for models in ([doubled], [params, doubled]):
        fused = jfusion.fuse(models, spec, target=params if len(models) == 1 else 0, solver=solver)
        heads = np.asarray(fused.plans["b0"].plan[-1])
        assert heads.shape == (4, 2)
        np.testing.assert_allclose(heads.sum(axis=1), 0.25, atol=1e-4)
        # Both copies of a head go to the head they copy.
        np.testing.assert_array_equal(heads.argmax(axis=1), np.asarray(perms["b0"]) // 2)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), fused.params, params)
