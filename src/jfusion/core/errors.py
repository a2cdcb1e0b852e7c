"""The errors and warnings jfusion raises.

Every message names the leaf path, the axis, and the expected and found sizes where
those exist, because a wrong layer-topology spec is the most common failure of a
fusion pipeline and must be found from the message alone.
"""

from __future__ import annotations


class JFusionError(ValueError):
    """Base class of jfusion's errors."""


class SpecError(JFusionError):
    """A Spec does not fit a parameter pytree, or does not describe the model's function."""


class FusionInputError(JFusionError):
    """The models, weights or solver given to a fusion cannot be fused as asked."""


class ConvergenceWarning(UserWarning):
    """An iterative solver stopped at its iteration cap before reaching its tolerance."""


class ResidualStreamWarning(UserWarning):
    """Weight alignment of a model with residual streams (:attr:`jfusion.Spec.residual_streams`).

    A stream's map is solved from its first writers' weights (the stem, the projection
    shortcuts), which after a short training run are still close to their random
    initialisation, so the matching can be no better than chance; activation alignment
    compares what the neurons compute instead.
    """
