"""REPAIR / RESCALE (Jordan et al. 2023) on planted truths: distortions a per-channel affine map
undoes are undone exactly, every repaired channel meets its target statistics, and a correct
fusion is left as it is. Tiny models and one batch; each program is compiled once per case."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from bn_nets import bn_spec, images, linen_model, nnx_model

import jfusion
from jfusion.core.tree import flatten, unflatten
from jfusion.models import MLP, mlp_spec

MODEL, SPEC = MLP((8, 6, 3)), mlp_spec(3)  # 4 -> 8 (h0) -> 6 (h1) -> 3
X = jax.random.normal(jax.random.key(0), (48, 4))


def sown(params, model=MODEL, x=X):
    """Each group's pre-activations, as the reference MLP sows them (independent of repair's capture)."""
    _, state = model.apply(params, x, mutable=["activations"])
    return {g: np.asarray(v[0], np.float64).reshape(-1, v[0].shape[-1]) for g, v in state["activations"].items()}


def moments(values):
    return {g: (v.mean(0), v.std(0)) for g, v in values.items()}


@pytest.fixture(scope="module")
def mlp():
    params = MODEL.init(jax.random.key(1), X)
    permuted, _ = jfusion.permute(params, SPEC, jax.random.key(2))
    return params, jfusion.align([params, permuted], SPEC)


def _channel_affine(params, key, shift=True):
    """Every hidden layer's output channels scaled by random positive factors (and shifted),
    with nothing compensating: a distortion one affine map per channel undoes."""
    leaves, treedef = flatten(params)
    out = dict(leaves)
    for i, key in enumerate(jax.random.split(key, 2)):
        a = jax.random.uniform(key, (leaves[f"params/Dense_{i}/bias"].shape[0],), minval=0.3, maxval=3.0)
        d = jax.random.normal(jax.random.fold_in(key, 1), a.shape) if shift else 0.0
        out[f"params/Dense_{i}/kernel"] = leaves[f"params/Dense_{i}/kernel"] * a
        out[f"params/Dense_{i}/bias"] = leaves[f"params/Dense_{i}/bias"] * a + d
    return unflatten(treedef, out)


def _assert_close_trees(a, b, atol):
    for (path, x), y in zip(flatten(a)[0].items(), flatten(b)[0].values()):
        np.testing.assert_allclose(x, y, atol=atol, err_msg=path)


@pytest.mark.parametrize("mode", ["repair", "rescale"])
def test_a_per_channel_affine_distortion_is_undone_exactly(mlp, mode):
    params, alignment = mlp
    distorted = _channel_affine(params, jax.random.key(3), shift=mode == "repair")
    assert not np.allclose(MODEL.apply(distorted, X), MODEL.apply(params, X), atol=1e-2)
    result = jfusion.repair(distorted, alignment, SPEC, X, model=MODEL, mode=mode)
    _assert_close_trees(result.params, params, atol=2e-5)
    np.testing.assert_allclose(MODEL.apply(result.params, X), MODEL.apply(params, X), atol=1e-5)
    # The targets are the parents' statistics (both parents compute the same channels here).
    for group, (mean, std) in moments(sown(params)).items():
        np.testing.assert_allclose(result.target_std[f"Dense_{group[1]}"], std, rtol=1e-5)
        np.testing.assert_allclose(result.target_mean[f"Dense_{group[1]}"], mean, rtol=1e-5, atol=1e-6)


def test_every_channel_meets_the_interpolated_parent_statistics():
    # A parent whose h0 channels are rescaled with the next layer compensating computes the same
    # function with other statistics; the naive average of the two is not a per-channel affine
    # distortion of either (h1 reads h0 through rows scaled by (1 + 1/a) / 2), so only the
    # statistics can be restored -- exactly, to the weighted interpolation of the parents'.
    params = MODEL.init(jax.random.key(4), X)
    leaves, treedef = flatten(params)
    a = jax.random.uniform(jax.random.key(5), (8,), minval=0.2, maxval=5.0)
    rescaled = unflatten(treedef, {
        **leaves,
        "params/Dense_0/kernel": leaves["params/Dense_0/kernel"] * a,
        "params/Dense_0/bias": leaves["params/Dense_0/bias"] * a,
        "params/Dense_1/kernel": leaves["params/Dense_1/kernel"] / a[:, None],
    })
    np.testing.assert_allclose(MODEL.apply(rescaled, X), MODEL.apply(params, X), rtol=1e-4, atol=1e-5)
    w = jnp.array([0.3, 0.7])
    fused = jfusion.vanilla_average([params, rescaled], SPEC, model_weights=w).params
    parents = [moments(sown(params)), moments(sown(rescaled))]
    targets = {g: [0.3 * parents[0][g][i] + 0.7 * parents[1][g][i] for i in (0, 1)] for g in ("h0", "h1")}
    assert not np.allclose(moments(sown(fused))["h1"][1], targets["h1"][1], rtol=1e-2)
    result = jfusion.repair(fused, [params, rescaled], SPEC, X, model=MODEL, model_weights=w)
    for group, (mean, std) in moments(sown(result.params)).items():
        np.testing.assert_allclose(mean, targets[group][0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(std, targets[group][1], rtol=1e-4)
        np.testing.assert_allclose(result.target_std[f"Dense_{group[1]}"], targets[group][1], rtol=1e-5)
    # h0 of the naive average is (0.3 + 0.7 a) times the original: already on target.
    np.testing.assert_allclose(result.scales["Dense_0"], 1.0, rtol=1e-4)


def test_repair_of_a_correct_fusion_is_the_identity(mlp):
    params, alignment = mlp
    fused = jfusion.fuse(jfusion.unstack_models(alignment.aligned), SPEC).params
    result = jfusion.repair(fused, alignment.aligned, SPEC, X, model=MODEL)
    _assert_close_trees(result.params, fused, atol=1e-5)
    for module, scale in result.scales.items():
        np.testing.assert_allclose(scale, 1.0, rtol=1e-5, err_msg=module)
    # Pure: it composes with jit (the module order is read from the trace either way).
    jitted = jax.jit(lambda f, p: jfusion.repair(f, p, SPEC, X, model=MODEL).params)(fused, alignment.aligned)
    _assert_close_trees(jitted, result.params, atol=1e-6)


def _distorted_norms(variables, key, nnx_paths):
    """Every BatchNorm's scale multiplied by positive factors and its bias shifted."""
    leaves, treedef = flatten(variables)
    out = dict(leaves)
    prefix = "" if nnx_paths else "params/"
    for i, key in enumerate(jax.random.split(key, 2)):
        scale, bias = f"{prefix}bn{i}/scale", f"{prefix}bn{i}/bias"
        out[scale] = leaves[scale] * jax.random.uniform(key, leaves[scale].shape, minval=0.3, maxval=3.0)
        out[bias] = leaves[bias] + jax.random.normal(jax.random.fold_in(key, 1), leaves[bias].shape)
    return unflatten(treedef, out)


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_batch_norm_networks_are_repaired_through_the_norms(api):
    nnx_paths = api == "nnx"
    model, variables = (nnx_model if nnx_paths else linen_model)(jax.random.key(6))
    spec, x = bn_spec(nnx_paths), images(jax.random.key(7), 16)
    parents = jfusion.stack_models([variables, variables])  # aligned parents, stacked on K
    distorted = _distorted_norms(variables, jax.random.key(9), nnx_paths)
    result = jfusion.repair(distorted, parents, spec, x, model=model)
    assert set(result.scales) == {"bn0", "bn1"}  # the norms, not the convs before them
    # The norms' affine parameters come back; kernels and running statistics are untouched.
    _assert_close_trees(result.params, variables, atol=5e-5)
    untouched = [p for p in flatten(variables)[0] if "/bn" not in f"/{p}" or p.endswith(("mean", "var"))]
    for path in untouched:
        np.testing.assert_array_equal(flatten(result.params)[0][path], flatten(distorted)[0][path], err_msg=path)
    # A correct fusion stays as it is.
    again = jfusion.repair(result.params, parents, spec, x, model=model)
    _assert_close_trees(again.params, result.params, atol=1e-5)


def test_repair_names_what_it_cannot_do(mlp):
    params, alignment = mlp
    plain = MLP((8, 6, 3), use_bias=False)
    variables = plain.init(jax.random.key(10), X)
    plain_spec = mlp_spec(3, bias=False)
    with pytest.raises(jfusion.SpecError, match=r"group 'h0': module 'Dense_0' has no bias.*mode='rescale'"):
        jfusion.repair(variables, [variables], plain_spec, X, model=plain)
    with pytest.raises(jfusion.SpecError, match=r"groups \['nope'\]"):
        jfusion.repair(params, alignment, SPEC, X, model=MODEL, points={"nope": "Dense_0"})
    with pytest.raises(ValueError, match="mode must be"):
        jfusion.repair(params, alignment, SPEC, X, model=MODEL, mode="reset")


def test_a_residual_network_meets_its_targets_in_one_pass():
    # A stream's writers sit at every depth (stem, each block's bn2, the shortcut's norm), so the
    # modules are repaired in the order their outputs depend on each other, not by group.
    model = jfusion.models.ResNet((1, 1), (4, 8), num_classes=3)
    x = jax.random.normal(jax.random.key(11), (16, 8, 8, 1))
    parents = [model.init(jax.random.key(k), x) for k in (12, 13)]
    fused = jfusion.vanilla_average(parents, model.spec()).params
    result = jfusion.repair(fused, parents, model.spec(), x, model=model)

    def norm_outputs(variables):
        _, state = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
        out = {}
        for module in result.scales:
            node = state["intermediates"]
            for name in module.split("/"):
                node = node[name]
            out[module] = np.asarray(node["__call__"][0]).reshape(-1, node["__call__"][0].shape[-1])
        return out

    assert sorted(result.scales) == sorted(
        ["stem_bn", "stage0_block0/bn1", "stage0_block0/bn2", "stage1_block0/bn1", "stage1_block0/bn2", "stage1_block0/proj_bn"]
    )
    before, after = norm_outputs(fused), norm_outputs(result.params)
    targets = [norm_outputs(p) for p in parents]
    for module, y in after.items():
        std = (targets[0][module].std(0) + targets[1][module].std(0)) / 2
        mean = (targets[0][module].mean(0) + targets[1][module].mean(0)) / 2
        np.testing.assert_allclose(y.std(0), std, rtol=1e-4, err_msg=module)
        np.testing.assert_allclose(y.mean(0), mean, rtol=1e-4, atol=1e-5, err_msg=module)
    assert not np.allclose(before["stage1_block0/bn2"].std(0), after["stage1_block0/bn2"].std(0), rtol=1e-2)
