"""Reference models by name, so a checkpoint can say which module (and Spec) its arrays belong to.

A model is described by its registry name and its constructor arguments,
``{"model": "resnet20", "kwargs": {"num_classes": 10, "width": 2}}`` (:func:`describe`),
which is JSON and goes into a checkpoint's metadata. :func:`from_metadata` rebuilds the
module from it, and ``module.spec()`` its Spec. Every argument is recorded, defaults
included, so a checkpoint keeps meaning the same model if a default changes later.

Names: ``mlpnet`` (OTFusion's MLPNet, 784-400-200-100-10 on MNIST), ``mlp``, ``cnn``,
``vgg11``, ``vgg11_bn``, ``resnet18``, ``resnet20``, ``rnn``; see :data:`MODELS`.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn

from jfusion.core.errors import JFusionError
from jfusion.models.cnn import CNN
from jfusion.models.mlp import MLP
from jfusion.models.resnet import ResNet, ResNet18, ResNet20
from jfusion.models.rnn import CELL_KINDS, RecurrentClassifier
from jfusion.models.vgg import VGG, VGG11


class ModelConfigError(JFusionError):
    """An unknown model name, or constructor arguments the named model does not take."""


def _mlpnet(*, num_classes: int = 10) -> MLP:
    return MLP((400, 200, 100, num_classes))


def _mlp(*, features: Sequence[int] = (64, 64, 10), use_bias: bool = True) -> MLP:
    return MLP(features, use_bias=use_bias)


def _cnn(
    *,
    conv_features: Sequence[int] = (32, 64),
    dense_features: Sequence[int] = (128, 10),
    image_size: int | Sequence[int] | None = None,
) -> CNN:
    return CNN(conv_features, dense_features, image_size)


def _vgg(batch_norm: bool) -> Callable[..., VGG]:
    def build(*, num_classes: int = 10, width: float = 1.0, use_bias: bool = True) -> VGG:
        return VGG(VGG11, batch_norm=batch_norm, num_classes=num_classes, use_bias=use_bias, width=width)

    return build


def _resnet(constructor: Callable[..., ResNet]) -> Callable[..., ResNet]:
    def build(*, num_classes: int = 10, width: int = 1) -> ResNet:
        # The width multiplies channel counts, which must stay integers.
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ModelConfigError(f"a ResNet's width is a positive integer multiplier, not {width!r}")
        return constructor(num_classes=num_classes, width=width)

    return build


def _rnn(*, hidden: Sequence[int] = (64,), num_classes: int = 10, cell: str = "lstm") -> RecurrentClassifier:
    if cell not in CELL_KINDS:
        raise ModelConfigError(f"an rnn's cell is one of {CELL_KINDS}, not {cell!r}")
    return RecurrentClassifier(hidden, num_classes, cell)


#: The reference models by name, ``{name: builder}``; ``builder(**kwargs)`` returns the
#: module. Builders take keyword-only arguments, all with defaults (so
#: :func:`jfusion.models.describe` can record every one); sequences arrive as tuples.
MODELS: Mapping[str, Callable[..., nn.Module]] = {
    "mlpnet": _mlpnet,  # OTFusion's MLPNet: 400-200-100-num_classes
    "mlp": _mlp,  # the given layer widths, the last being the classes
    "cnn": _cnn,  # conv stack, flatten, dense head; image_size fixes the flatten (and the Spec)
    "vgg11": _vgg(False),  # for CIFAR-size images, with a width multiplier
    "vgg11_bn": _vgg(True),
    "resnet18": _resnet(ResNet18),  # CIFAR ResNets with BatchNorm, integer width multiplier
    "resnet20": _resnet(ResNet20),
    "rnn": _rnn,  # recurrent layers (Elman, LSTM or GRU) reading images row by row, Dense readout
}


def model_arguments(name: str) -> dict[str, Any]:
    """The constructor arguments of model ``name`` and their defaults; the error lists the known names."""
    if name not in MODELS:
        raise ModelConfigError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    return {arg: p.default for arg, p in inspect.signature(MODELS[name]).parameters.items()}


def _json_value(value: Any) -> Any:
    # JSON has lists, not tuples; modules need tuples to be hashable (jit static arguments).
    return [_json_value(v) for v in value] if isinstance(value, (list, tuple)) else value


def _module_value(value: Any) -> Any:
    return tuple(_module_value(v) for v in value) if isinstance(value, (list, tuple)) else value


def _full_kwargs(name: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    defaults = model_arguments(name)
    unknown = sorted(set(kwargs) - set(defaults))
    if unknown:
        raise ModelConfigError(
            f"model {name!r} takes no argument {', '.join(map(repr, unknown))}; "
            f"it takes {', '.join(defaults) or 'none'}"
        )
    return {**defaults, **kwargs}


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """The module registered as ``name``, built with ``kwargs``.

    Lists (as JSON gives them) are turned into tuples, so the module is hashable: a ``jit``
    static argument, e.g. of ``jfusion.workflow.train.train_models`` and activation alignment.
    """
    full = _full_kwargs(name, kwargs)
    return MODELS[name](**{k: _module_value(v) for k, v in full.items()})


def describe(name: str, **kwargs: Any) -> dict[str, Any]:
    """``{"model": name, "kwargs": {...}}``: JSON-able, every argument (defaults included).

    Raises :class:`ModelConfigError` for an unknown name or argument, so a description that
    is written can always be rebuilt.
    """
    full = _full_kwargs(name, kwargs)
    return {"model": name, "kwargs": {k: _json_value(v) for k, v in full.items()}}


def from_metadata(metadata: Mapping[str, Any] | None) -> nn.Module:
    """Rebuild the module a :func:`describe` dict (e.g. a checkpoint's metadata) names."""
    if not metadata or "model" not in metadata:
        raise ModelConfigError(
            f"the metadata names no model (expected {{'model': name, 'kwargs': {{...}}}}, as "
            f"jfusion.models.registry.describe writes it); got {dict(metadata or {})}"
        )
    return build_model(metadata["model"], **metadata.get("kwargs", {}))
