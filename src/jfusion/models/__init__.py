"""Reference Flax models, the builders of their Specs, a registry of them by name (and of yours by
``package.module:Factory``), and the module that fits a pytree of other widths."""

from jfusion.models.cnn import CNN, cnn_spec
from jfusion.models.mlp import MLP, mlp_spec
from jfusion.models.registry import (
    MODELS,
    ModelConfigError,
    build_model,
    describe,
    from_metadata,
    model_arguments,
    resolve_model,
)
from jfusion.models.resnet import BasicBlock, ResNet, ResNet18, ResNet20, resnet_spec
from jfusion.models.rnn import RecurrentClassifier, rnn_spec
from jfusion.models.text import NnxTextEncoder, TextEncoder, text_encoder_spec
from jfusion.models.vgg import VGG, VGG11, vgg_spec
from jfusion.models.vit import NnxViT, ViT, vit_spec
from jfusion.models.widths import module_for, widths_of

__all__ = [
    "BasicBlock",
    "CNN",
    "MLP",
    "MODELS",
    "ModelConfigError",
    "NnxTextEncoder",
    "NnxViT",
    "RecurrentClassifier",
    "ResNet",
    "ResNet18",
    "ResNet20",
    "TextEncoder",
    "VGG",
    "VGG11",
    "ViT",
    "build_model",
    "cnn_spec",
    "describe",
    "from_metadata",
    "mlp_spec",
    "model_arguments",
    "module_for",
    "resnet_spec",
    "resolve_model",
    "rnn_spec",
    "text_encoder_spec",
    "vgg_spec",
    "vit_spec",
    "widths_of",
]
