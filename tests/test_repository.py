"""The repository keeps its promises: CI runs exactly the test command the README gives."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    """The command line of every ```bash block of the README (its last line)."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [block.strip().splitlines()[-1] for block in blocks]


def test_ci_runs_exactly_the_readmes_test_command():
    tests = [c for c in readme_commands() if c.endswith("pytest")]  # one test command
    assert len(tests) == 1
    assert tests[0] in (ROOT / ".ci" / "run").read_text().splitlines()


def test_the_readme_sets_up_and_runs_the_demo_in_one_command():
    set_up = [c for c in readme_commands() if c.startswith("python3 -m venv .venv && ")]
    assert [c for c in set_up if c.endswith("jfusion demo")], set_up


# -- the README's Spec section runs as written ---------------------------------------------


def test_the_readmes_spec_examples_run():
    from flax import nnx

    from jfusion import layers
    from readme import python_blocks

    blocks = python_blocks("### The Spec")
    assert len(blocks) == 3
    namespace: dict = {}
    for i, block in enumerate(blocks):  # one namespace, in order, as a reader runs them
        exec(compile(block, f"README.md (The Spec, block {i + 1})", "exec"), namespace)
    spec, built, traced = (namespace[name] for name in ("spec", "built", "traced"))
    assert traced.groups == ("Conv_0", "Dense_0")  # what the README says they are
    # The hand spec, the builders' and the traced one are the same Spec up to group names.
    rename = {"Conv_0": "c0", "Dense_0": "h0"}

    def renamed(entry):
        return rename.get(entry, entry) if not isinstance(entry, tuple) else tuple(map(renamed, entry))

    assert {p: renamed(a) for p, a in traced.as_dict().items()} == built.as_dict()
    assert namespace["spec"].as_dict() == {
        **layers.dense("hidden", None, "hidden", nnx=True),
        **layers.dense("out", "hidden", None, nnx=True),
    }
    assert isinstance(namespace["fused"], nnx.State)


def test_the_readmes_batchnorm_spec_needs_every_one_of_its_lines():
    import jfusion
    from jfusion.core.tree import flatten
    from readme import python_blocks

    first = python_blocks("### The Spec")[0]
    model_part = first[: first.index("spec = jfusion.Spec(")]
    namespace: dict = {}
    exec(compile(model_part, "README.md (The Spec, block 1)", "exec"), namespace)
    shapes = {p: v.shape for p, v in flatten(namespace["variables"])[0].items()}
    spec = eval(first[first.index("jfusion.Spec(") : first.index("jfusion.check_spec")], namespace)
    assert set(spec.validate(shapes)) == {"c0", "h0"}
    for path in spec.paths:  # e.g. a BatchNorm without its bias or var
        try:
            jfusion.Spec({p: a for p, a in spec.as_dict().items() if p != path}).validate(shapes)
        except jfusion.SpecError as error:
            # A leaf left out is named; leaving out a group's only reader (the Dense
            # kernels) is caught as a group nothing reads when the Spec is built.
            assert path in str(error) or path.endswith("kernel") and "no leaf reads it" in str(error), (path, error)
        else:
            raise AssertionError(f"the README's spec without {path} validated")


def test_the_version_has_one_source_and_the_package_is_typed():
    import tomllib

    import jfusion

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert jfusion.__version__ == project["version"]  # read from the installed metadata
    assert (Path(jfusion.__file__).parent / "py.typed").is_file()
    assert "Typing :: Typed" in project["classifiers"]


def test_a_clone_directory_named_jfusion_beside_a_script_does_not_shadow_the_package(tmp_path):
    import subprocess
    import sys

    import jfusion

    (tmp_path / "jfusion").mkdir()  # a clone's root: a directory with no __init__.py
    (tmp_path / "jfusion" / "README.md").write_text("a clone\n")
    script = tmp_path / "script.py"
    script.write_text("import importlib.util\nprint(importlib.util.find_spec('jfusion').origin)\n")
    found = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, check=True)
    assert found.stdout.strip() == jfusion.__file__
