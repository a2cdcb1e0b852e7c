"""Tiny BatchNorm CNNs (linen and nnx) and their Specs, for the repair and weight-support tests.

``conv0 -> bn0 -> relu -> conv1 -> bn1 -> relu -> mean over positions -> head``: groups ``c0``
and ``c1``, 4 and 6 channels, on 6x6 images with 2 channels.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

import jfusion
from jfusion import layers
from jfusion.core.tree import flatten, running_statistics, unflatten

WIDTHS = (4, 6)
CHANNELS = 2


class LinenBN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        for i, width in enumerate(WIDTHS):
            x = nn.Conv(width, (3, 3), name=f"conv{i}")(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name=f"bn{i}")(x)
            x = nn.relu(x)
        return nn.Dense(3, name="head")(jnp.mean(x, axis=(1, 2)))


class NnxBN(nnx.Module):
    def __init__(self, rngs):
        self.conv0 = nnx.Conv(CHANNELS, WIDTHS[0], (3, 3), rngs=rngs)
        self.bn0 = nnx.BatchNorm(WIDTHS[0], momentum=0.9, rngs=rngs)
        self.conv1 = nnx.Conv(WIDTHS[0], WIDTHS[1], (3, 3), rngs=rngs)
        self.bn1 = nnx.BatchNorm(WIDTHS[1], momentum=0.9, rngs=rngs)
        self.head = nnx.Linear(WIDTHS[1], 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn0(self.conv0(x)))
        x = nnx.relu(self.bn1(self.conv1(x)))
        return self.head(jnp.mean(x, axis=(1, 2)))


def bn_spec(nnx_paths: bool = False) -> jfusion.Spec:
    groups = ("c0", "c1")
    entries = {}
    for i, group in enumerate(groups):
        entries.update(layers.conv(f"conv{i}", groups[i - 1] if i else None, group, nnx=nnx_paths))
        entries.update(layers.batch_norm(f"bn{i}", group, nnx=nnx_paths))
    entries.update(layers.dense("head", groups[-1], None, nnx=nnx_paths))
    return jfusion.Spec(entries)


def images(key, n=8):
    return jax.random.normal(key, (n, 6, 6, CHANNELS))


def with_random_statistics(variables, key):
    """``variables`` with random running means and positive variances (a trained-looking BN)."""
    stats = running_statistics(variables)
    leaves, treedef = flatten(variables)
    keys = dict(zip(stats, jax.random.split(key, len(stats))))
    new = {
        p: (jax.random.uniform(keys[p], x.shape, minval=0.5, maxval=2.0) if p.endswith("var") else jax.random.normal(keys[p], x.shape))
        if p in stats
        else x
        for p, x in leaves.items()
    }
    return unflatten(treedef, new)


def linen_model(key):
    model = LinenBN()
    variables = model.init(key, images(key, 1))
    return model, with_random_statistics(variables, jax.random.fold_in(key, 1))


def nnx_model(key):
    module = NnxBN(nnx.Rngs(int(jax.random.randint(key, (), 0, 2**30))))
    graphdef, state = nnx.split(module)
    return graphdef, with_random_statistics(state, jax.random.fold_in(key, 1))
