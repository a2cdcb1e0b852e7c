"""The docs site: it builds without a warning, and the tutorial runs as written.

Both are slow (the build imports everything and renders every page; the tutorial trains
four small models). They run where the docs extra is installed (``pip install -e
".[docs]"``): CI's docs job, after the main suite, which skips them.
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from readme import file_python_blocks

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
MISSING = [m for m in ("sphinx", "myst_parser") if importlib.util.find_spec(m) is None]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(MISSING), reason=f"{' and '.join(MISSING)} not installed: pip install -e '.[docs]' (CI's docs job)"),
]


def test_the_docs_build_with_warnings_as_errors(tmp_path):  # ~40 s on 2 busy cores
    # -W: a warning (a broken reference, a malformed docstring) fails; -E: read every source.
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-E", "-q", "-b", "html", str(DOCS), str(tmp_path / "html")]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, f"sphinx-build failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
    assert "WARNING" not in result.stderr and "ERROR" not in result.stderr, result.stderr[-8000:]
    assert (tmp_path / "html" / "api.html").exists()


def test_the_tutorial_runs_as_written():  # trains two linen and two nnx nets (2-3 min on 2 cores)
    pytest.importorskip("sklearn")
    blocks = file_python_blocks(DOCS / "tutorial.md")
    assert len(blocks) >= 7
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/tutorial.md (block {i + 1})", "exec"), namespace)
    assert min(namespace["parents"]) > 0.8  # chance is 0.1
    assert namespace["traced"].groups == ("Conv_0", "Dense_0")
    evaluate, model, test = namespace["evaluate"], namespace["model"], namespace["test"]
    assert evaluate(model, namespace["fused"], *test) > 0.7
    assert evaluate(model, namespace["by_acts"], *test) > 0.7
    half = namespace["half"]["params"]
    assert half["Conv_0"]["kernel"].shape[-1] == 8 and half["Dense_0"]["kernel"].shape == (16 * 8, 32)
    assert namespace["evaluate"](namespace["net"], namespace["fused_state"], *test) > 0.6
