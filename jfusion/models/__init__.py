"""Reference Flax models and the builders of their Specs."""

from jfusion.models.cnn import CNN, cnn_spec
from jfusion.models.mlp import MLP, mlp_spec
from jfusion.models.resnet import BasicBlock, ResNet, ResNet18, ResNet20, resnet_spec
from jfusion.models.vgg import VGG, VGG11, vgg_spec

__all__ = [
    "BasicBlock",
    "CNN",
    "MLP",
    "ResNet",
    "ResNet18",
    "ResNet20",
    "VGG",
    "VGG11",
    "cnn_spec",
    "mlp_spec",
    "resnet_spec",
    "vgg_spec",
]
