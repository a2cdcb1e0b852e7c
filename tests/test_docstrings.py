"""The docstrings' examples run: every ``>>>`` line of the public API's main modules.

``pytest --doctest-modules jfusion`` would also import ``jfusion.workflow`` (optional
dependencies), so the chosen modules are run here with :mod:`doctest` itself. The examples
use tiny models, and the fusions share compiled programs where their configurations agree.
"""

import doctest
import importlib

import pytest

MODULES = [
    "jfusion.core.spec",  # Spec and the layer builders (jfusion.layers)
    "jfusion.core.support",  # ByWeights, ByActivations
    "jfusion.core.matching",  # WeightMatching
    "jfusion.check",  # check_spec, permute
    "jfusion.models.vit",  # vit_spec, NnxViT
    "jfusion.models.text",  # text_encoder_spec
    "jfusion.trace",  # trace_spec
    "jfusion.methods.fuse",
    "jfusion.methods.partial",
    "jfusion.methods.barycenter",
    "jfusion.methods.gromov",
    "jfusion.methods.prune",
    "jfusion.methods.baselines",
    "jfusion.methods.repair",
    "jfusion.diagnostics",
    "jfusion.evaluate",  # loss_barrier
]
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    tests = [t for t in doctest.DocTestFinder().find(module) if t.examples]
    assert tests, f"{name} has no docstring examples"
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    report = []
    for test in tests:
        runner.run(test, out=report.append)
    failed, attempted = runner.summarize(verbose=False)
    assert failed == 0, "".join(report)
    assert attempted > 0


def test_the_main_public_api_has_examples_and_references():
    import jfusion

    for name in ["fuse", "partial_fuse", "barycenter_fuse", "prune", "vanilla_average", "trace_spec",
                 "check_spec", "permute", "Spec", "ByWeights", "ByActivations", "repair", "WeightMatching"]:
        doc = getattr(jfusion, name).__doc__
        assert "\n    Examples:\n" in doc and "\n    References:\n" in doc, name
    for name in jfusion.layers.__all__:
        assert "\n    Examples:\n" in getattr(jfusion.layers, name).__doc__, name
