"""Documentation travels with the code: every ``*.md`` file that a docstring (in aoi_jax/, train.py,
evaluate.py, benchmarks/, configs/), the README or a page of docs/ names exists in the repository."""

import ast
import pathlib
import re


ROOT = pathlib.Path(__file__).resolve().parents[1]
# a path ending in .md, not part of a URL (a web page may name files of other repositories)
MD = re.compile(r"(?<![\w./:-])((?:[\w-]+/)*[\w.-]+\.md)\b")


def docstrings(path: pathlib.Path):
    """(line, text) of every module, class and function docstring of a Python file."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            text = ast.get_docstring(node, clean=False)
            if text:
                yield (node.body[0].lineno, text)


def sources():
    """(where, text) of each docstring of the Python files and of each Markdown page that users read."""
    files = sorted((ROOT / "aoi_jax").rglob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))
    files += sorted((ROOT / "configs").glob("*.py")) + [ROOT / "train.py", ROOT / "evaluate.py"]
    for path in files:
        for line, text in docstrings(path):
            yield f"{path.relative_to(ROOT)}:{line}", text
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        yield str(path.relative_to(ROOT)), path.read_text()


def references(text: str) -> list[str]:
    return [m.group(1) for m in MD.finditer(text)]


def test_reference_pattern():
    text = ("see docs/semantics.md section 5 and reference-semantics.md; README.md, (docs/data.md) and "
            "https://github.com/org/repo/blob/main/README.md or github.com/a/b/notes.md")
    assert references(text) == ["docs/semantics.md", "reference-semantics.md", "README.md", "docs/data.md"]


def test_every_cited_markdown_file_exists():
    """A name is resolved from the repository root (``docs/semantics.md``, ``README.md``)."""
    missing = [f"{where}: {name}" for where, text in sources() for name in references(text)
               if not (ROOT / name).is_file()]
    assert not missing, "references to Markdown files that are not in the repository:\n" + "\n".join(missing)


def test_the_docs_keep_the_section_numbers_docstrings_cite():
    """docs/semantics.md has sections 1-10 and the six defects of section 9; docs/data.md sections 3.1-3.6."""
    semantics = (ROOT / "docs" / "semantics.md").read_text()
    assert re.findall(r"^## (\d+)\. ", semantics, re.M) == [str(i) for i in range(1, 11)]
    defects = semantics.split("## 9. ", 1)[1].split("## 10. ", 1)[0]
    assert re.findall(r"^(\d)\. ", defects, re.M) == [str(i) for i in range(1, 7)]
    data = (ROOT / "docs" / "data.md").read_text()
    assert re.findall(r"^### (3\.\d+) ", data, re.M)[:6] == [f"3.{i}" for i in range(1, 7)]
