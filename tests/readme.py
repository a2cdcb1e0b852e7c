"""The README's and the docs' code blocks, for the tests that run them."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def section(heading: str) -> str:
    """The README's text from the line ``heading`` (e.g. ``"### The Spec"``) to the next
    heading of the same or a higher level (``#`` lines inside code blocks are not headings)."""
    level = len(heading) - len(heading.lstrip("#"))
    lines, inside, fenced = [], False, False
    for line in README.read_text().splitlines(keepends=True):
        if not fenced and re.match(rf"#{{1,{level}}} ", line):
            if inside:
                break
            inside = line.rstrip("\n") == heading
        if line.startswith("```"):
            fenced = not fenced
        if inside:
            lines.append(line)
    if not lines:
        raise ValueError(f"README.md has no heading {heading!r}")
    return "".join(lines)


def python_blocks(heading: str) -> list[str]:
    """The ```python blocks of a README section, in order."""
    return re.findall(r"```python\n(.*?)```", section(heading), flags=re.S)


def file_python_blocks(path: Path) -> list[str]:
    """The ```python blocks of a markdown file, in order."""
    return re.findall(r"```python\n(.*?)```", Path(path).read_text(), flags=re.S)
