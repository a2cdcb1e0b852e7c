"""Models by name, so a checkpoint can say which module (and Spec) its arrays belong to.

A model is described by its name and its constructor arguments,
``{"model": "resnet20", "kwargs": {"num_classes": 10, "width": 2}}`` (:func:`describe`),
which is JSON and goes into a checkpoint's metadata. :func:`from_metadata` rebuilds the
module from it, and ``module.spec()`` its Spec. For the reference models every argument is
recorded, defaults included, so a checkpoint keeps meaning the same model if a default
changes later.

A name is either a reference model's (``mlpnet`` -- OTFusion's MLPNet, 784-400-200-100-10
on MNIST --, ``mlp``, ``cnn``, ``vgg11``, ``vgg11_bn``, ``resnet18``, ``resnet20``, ``rnn``, ``vit``, ``vit_nnx``;
see :data:`MODELS`) or a reference to your own code, ``"package.module:Factory"``: an
importable callable (a function, or a module class with defaults for every field) that
returns a ``flax.linen`` Module, or an ``nnx.Module`` when it takes ``rngs``.
:func:`jfusion.models.resolve_model` turns either into the callable, and every function here goes through
it. For your own models only the arguments you give are recorded (the factory's defaults
are its own business), and they must be JSON.

Rebuilding a model from metadata that names ``package.module:Factory`` *imports that
module and calls the factory*, with the recorded arguments: as with unpickling, only load
checkpoints you trust.
"""

from __future__ import annotations

import importlib
import inspect
import json
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
from flax import nnx

from jfusion.core.errors import JFusionError
from jfusion.models.cnn import CNN
from jfusion.models.mlp import MLP
from jfusion.models.resnet import ResNet, ResNet18, ResNet20
from jfusion.models.rnn import CELL_KINDS, RecurrentClassifier
from jfusion.models.vgg import VGG, VGG11
from jfusion.models.vit import NnxViT, ViT


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


def _vit(*, patch: int = 7, dim: int = 32, heads: int = 4, blocks: int = 2, mlp: int = 64, num_classes: int = 10) -> ViT:
    if dim % heads:
        raise ModelConfigError(f"a vit's dim ({dim}) must be divisible by its heads ({heads})")
    return ViT(patch, dim, heads, blocks, mlp, num_classes)


def _vit_nnx(
    *,
    image_size: int = 28,
    channels: int = 1,
    patch: int = 7,
    dim: int = 32,
    heads: int = 4,
    blocks: int = 2,
    mlp: int = 64,
    num_classes: int = 10,
    rngs: nnx.Rngs,
) -> NnxViT:
    if dim % heads:
        raise ModelConfigError(f"a vit's dim ({dim}) must be divisible by its heads ({heads})")
    if image_size % patch:
        raise ModelConfigError(f"a vit's patch ({patch}) must divide its image_size ({image_size})")
    return NnxViT(
        image_size=image_size, channels=channels, patch=patch, dim=dim, heads=heads, blocks=blocks,
        mlp=mlp, num_classes=num_classes, rngs=rngs,
    )


#: The reference models by name, ``{name: builder}``; ``builder(**kwargs)`` returns the
#: module. Builders take keyword-only arguments, all with defaults (so
#: :func:`jfusion.models.describe` can record every one); sequences arrive as tuples.
MODELS: Mapping[str, Callable[..., nn.Module | nnx.Module]] = {
    "mlpnet": _mlpnet,  # OTFusion's MLPNet: 400-200-100-num_classes
    "mlp": _mlp,  # the given layer widths, the last being the classes
    "cnn": _cnn,  # conv stack, flatten, dense head; image_size fixes the flatten (and the Spec)
    "vgg11": _vgg(False),  # for CIFAR-size images, with a width multiplier
    "vgg11_bn": _vgg(True),
    "resnet18": _resnet(ResNet18),  # CIFAR ResNets with BatchNorm, integer width multiplier
    "resnet20": _resnet(ResNet20),
    "rnn": _rnn,  # recurrent layers (Elman, LSTM or GRU) reading images row by row, Dense readout
    "vit": _vit,  # a pre-LN Vision Transformer on square patches, stock Flax attention (Heads groups)
    "vit_nnx": _vit_nnx,  # the same in flax.nnx (built with rngs; images of image_size x image_size)
}


def is_reference(name: str) -> bool:
    """Whether ``name`` refers to user code (``"package.module:Factory"``), not the registry."""
    return ":" in name


def resolve_model(name: str) -> Callable[..., Any]:
    """The callable that builds model ``name``: a registry builder, or the imported factory.

    ``name`` is one of :data:`jfusion.models.registry.MODELS` or ``"package.module:Factory"`` (``Factory`` may be a
    dotted path inside the module, ``"pkg.mod:Zoo.small"``). The module is imported with
    ``importlib.import_module``, so it must be on ``sys.path`` (the ``jfusion`` command
    also looks in the current directory).

    Raises:
      ModelConfigError: an unknown registry name, a malformed reference, a module that
        cannot be imported (its exception is named), a missing attribute, or an attribute
        that is not callable.
    """
    if not isinstance(name, str):
        raise ModelConfigError(f"a model name is a string, not {type(name).__name__}")
    if not is_reference(name):
        if name not in MODELS:
            raise ModelConfigError(
                f"unknown model {name!r}; known models: {', '.join(MODELS)} "
                f"(or your own as package.module:Factory)"
            )
        return MODELS[name]
    module_name, _, attribute = name.partition(":")
    if not module_name or not attribute or ":" in attribute:
        raise ModelConfigError(f"model {name!r}: expected package.module:Factory")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as err:  # whatever importing the user's module raises
        reason = " ".join(f"{type(err).__name__}: {err}".split())
        raise ModelConfigError(f"model {name!r}: cannot import {module_name!r} ({reason})") from err
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ModelConfigError(f"model {name!r}: {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ModelConfigError(
            f"model {name!r}: {attribute} is not callable (type {type(target).__name__}); it must be a "
            f"function or class that returns a flax module"
        )
    return target


# Parameters of a factory that are not model arguments: linen's dataclass fields every
# Module has, and nnx's random streams (passed by whoever builds the model).
_NOT_ARGUMENTS = ("parent", "name", "rngs")


def _signature(name: str, factory: Callable[..., Any]) -> inspect.Signature | None:
    try:
        if isinstance(factory, type):
            # A class's __init__: nnx's metaclass hides it behind __call__(*args, **kwargs).
            signature = inspect.signature(factory.__init__)
            return signature.replace(parameters=list(signature.parameters.values())[1:])
        return inspect.signature(factory)
    except (TypeError, ValueError):  # some builtins and C extensions have none
        return None


def takes_rngs(name: str) -> bool:
    """Whether model ``name``'s factory takes ``rngs`` (an nnx model built from seeds)."""
    signature = _signature(name, resolve_model(name))
    return signature is not None and "rngs" in signature.parameters


def model_arguments(name: str) -> dict[str, Any]:
    """The constructor arguments of model ``name`` and their defaults.

    For ``package.module:Factory`` these are the factory's parameters except ``rngs`` (and
    linen's ``parent`` and ``name``); a required one has ``inspect.Parameter.empty`` as its
    default. The error for an unknown name lists the known names.
    """
    factory = resolve_model(name)
    signature = _signature(name, factory)
    if signature is None:
        return {}
    return {
        arg: p.default
        for arg, p in signature.parameters.items()
        if arg not in _NOT_ARGUMENTS and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


def _takes_any_keyword(name: str) -> bool:
    signature = _signature(name, resolve_model(name))
    return signature is None or any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values())


def _json_value(value: Any) -> Any:
    # JSON has lists, not tuples; modules need tuples to be hashable (jit static arguments).
    return [_json_value(v) for v in value] if isinstance(value, (list, tuple)) else value


def _module_value(value: Any) -> Any:
    return tuple(_module_value(v) for v in value) if isinstance(value, (list, tuple)) else value


def _full_kwargs(name: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``kwargs`` checked against what model ``name`` takes; the registry's defaults added."""
    defaults = model_arguments(name)
    unknown = sorted(set(kwargs) - set(defaults))
    if unknown and not (is_reference(name) and _takes_any_keyword(name)):
        raise ModelConfigError(
            f"model {name!r} takes no argument {', '.join(map(repr, unknown))}; "
            f"it takes {', '.join(defaults) or 'none'}"
        )
    return dict(kwargs) if is_reference(name) else {**defaults, **kwargs}


def build_model(name: str, **kwargs: Any) -> nn.Module | nnx.Module:
    """The module model ``name`` builds with ``kwargs``.

    Lists (as JSON gives them) are turned into tuples, so the module is hashable: a ``jit``
    static argument, e.g. of ``jfusion.workflow.train.train_models`` and activation alignment.
    A factory that takes ``rngs`` (an nnx model) gets ``rngs=nnx.Rngs(0)`` unless ``kwargs``
    has ``rngs``.

    Raises:
      ModelConfigError: see :func:`jfusion.models.resolve_model`; arguments the model does not take; a
        factory that raises (its exception is named) or returns something that is not a
        ``flax.linen.Module`` or ``nnx.Module`` instance.
    """
    rngs = kwargs.pop("rngs", None)
    full = {k: _module_value(v) for k, v in _full_kwargs(name, kwargs).items()}
    factory = resolve_model(name)
    if takes_rngs(name):
        full["rngs"] = nnx.Rngs(0) if rngs is None else rngs
    if not is_reference(name):
        return factory(**full)
    try:
        module = factory(**full)
    except Exception as err:  # the user's code: say what it raised, in one line
        reason = " ".join(f"{type(err).__name__}: {err}".split())
        raise ModelConfigError(f"model {name!r}: calling it with {sorted(full)} raised {reason}") from err
    if not isinstance(module, (nn.Module, nnx.Module)):
        what = f"the class {module.__name__}" if isinstance(module, type) else f"an object of type {type(module).__name__}"
        raise ModelConfigError(
            f"model {name!r} returned {what}, not a flax.linen.Module or nnx.Module instance"
        )
    return module


def describe(name: str, **kwargs: Any) -> dict[str, Any]:
    """``{"model": name, "kwargs": {...}}``: JSON-able; for a registry model every argument
    (defaults included), for ``package.module:Factory`` the arguments given.

    Raises :class:`ModelConfigError` for an unknown name or argument, or arguments that are
    not JSON, so a description that is written can always be read back.
    """
    full = {k: _json_value(v) for k, v in _full_kwargs(name, kwargs).items()}
    try:
        json.dumps(full, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ModelConfigError(f"model {name!r}: its arguments must be JSON to be recorded ({err})") from err
    return {"model": name, "kwargs": full}


def from_metadata(metadata: Mapping[str, Any] | None, **extra: Any) -> nn.Module | nnx.Module:
    """Rebuild the module a :func:`describe` dict (e.g. a checkpoint's metadata) names.

    ``extra`` goes to the factory too (``rngs=`` for an nnx model). A ``package.module:Factory``
    name imports and calls that code (see the module docstring).
    """
    if not metadata or "model" not in metadata:
        raise ModelConfigError(
            f"the metadata names no model (expected {{'model': name, 'kwargs': {{...}}}}, as "
            f"jfusion.models.registry.describe writes it); got {dict(metadata or {})}"
        )
    return build_model(metadata["model"], **metadata.get("kwargs", {}), **extra)
