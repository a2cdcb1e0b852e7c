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
