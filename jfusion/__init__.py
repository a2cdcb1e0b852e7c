"""jfusion: fuse trained neural networks with optimal transport, as one jitted JAX program.

A fusion is, for every neuron group, one transport plan per model plus a weight per fused
neuron: supports (weights or activations) -> costs -> plans ``T_k`` -> transport -> combine.

* OT fusion -- Singh & Jaggi, "Model Fusion via Optimal Transport", NeurIPS 2020:
  :func:`fuse`, :func:`align`.
* Baselines: :func:`vanilla_average`, :func:`ensemble_apply`.
* Layer topology: :class:`Spec`, checked with :func:`check_spec`; :func:`permute` plants
  random permutations.
"""

from jfusion.align import Alignment, align
from jfusion.baselines import ensemble_apply, vanilla_average
from jfusion.check import check_spec, permute
from jfusion.costs import GroundMetric
from jfusion.errors import ConvergenceWarning, FusionInputError, JFusionError, SpecError
from jfusion.fuse import fuse
from jfusion.solvers import Exact, OTResult, Sinkhorn
from jfusion.spec import LeafSpec, Spec
from jfusion.support import Activations, Weights

__all__ = [
    "Activations",
    "Alignment",
    "ConvergenceWarning",
    "Exact",
    "FusionInputError",
    "GroundMetric",
    "JFusionError",
    "LeafSpec",
    "OTResult",
    "Sinkhorn",
    "Spec",
    "SpecError",
    "Weights",
    "align",
    "check_spec",
    "ensemble_apply",
    "fuse",
    "permute",
    "vanilla_average",
]
