"""Models defined outside jfusion, as a user's own package would: the command line reaches them
as ``user_models:Factory`` (this directory is on sys.path under pytest)."""

import flax.linen as nn
from flax import nnx


class Tiny(nn.Module):
    """A two-layer linen MLP with no ``spec()`` method and no sown activations."""

    hidden: int = 16
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(self.num_classes, name="readout")(nn.relu(nn.Dense(self.hidden, name="hidden")(x)))


def tiny(hidden: int = 16, num_classes: int = 10) -> Tiny:
    """A factory function, as ``--model user_models:tiny`` names it."""
    return Tiny(hidden=hidden, num_classes=num_classes)


class TinyNnx(nnx.Module):
    """The same network in nnx, with BatchNorm; built from ``rngs``."""

    def __init__(self, *, rngs: nnx.Rngs, hidden: int = 12, num_classes: int = 10):
        self.hidden = nnx.Linear(64, hidden, rngs=rngs)
        self.norm = nnx.BatchNorm(hidden, rngs=rngs)
        self.readout = nnx.Linear(hidden, num_classes, rngs=rngs)

    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        return self.readout(nnx.relu(self.norm(self.hidden(x))))


class WithDropout(nnx.Module):
    """An nnx model that keeps a random stream in its state (the command line refuses it)."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(64, 8, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)
        self.readout = nnx.Linear(8, 10, rngs=rngs)

    def __call__(self, x):
        return self.readout(self.drop(nnx.relu(self.hidden(x.reshape((x.shape[0], -1))))))


def needs_depth(depth: int) -> Tiny:
    """A factory with a required argument no flag sets."""
    return Tiny(hidden=depth)


def returns_a_number() -> int:
    return 3


def raises() -> Tiny:
    raise RuntimeError("this factory is broken")


NOT_CALLABLE = 42
