"""Reference Flax models and the builders of their Specs."""

from jfusion.models.cnn import CNN, cnn_spec
from jfusion.models.mlp import MLP, mlp_spec

__all__ = ["CNN", "MLP", "cnn_spec", "mlp_spec"]
