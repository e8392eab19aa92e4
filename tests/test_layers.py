"""The layer rules of docs/architecture.md, checked over the import graph: every import statement of every
module (function-level imports included), against the rules block that document holds. The rules a reader
sees are the ones enforced: the test parses them from the document."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"


def parse_rules(text: str) -> dict[str, list[str]]:
    """{layer: [modules it may not import]} from the ```text block under "## Layer rules"."""
    section = text.split("## Layer rules", 1)[1]
    block = re.search(r"```text\n(.*?)```", section, re.S)
    assert block, "docs/architecture.md: no ```text block of rules under '## Layer rules'"
    rules = {}
    for line in block.group(1).splitlines():
        found = re.fullmatch(r"(stpcore(?:\.\w+)*) may not import: (.+)", line.strip())
        assert found, f"docs/architecture.md: a rule line reads {line!r}"
        rules[found.group(1)] = found.group(2).split()
    return rules


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "kernels":
        parts = ["stpcore", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every module an ``import`` or ``from ... import`` in the file names (absolute form)."""
    tree = ast.parse(path.read_text())
    package = module_name(path).rsplit(".", 0 if path.name == "__init__.py" else 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{a.name}" for a in node.names)  # `from stpcore import training`
    return found


def sources() -> list[Path]:
    return sorted([*(ROOT / "stpcore").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")])


def within(name: str, layer: str) -> bool:
    return name == layer or name.startswith(layer + ".")


RULES = parse_rules(DOC.read_text()) if DOC.is_file() else {}


def test_the_rules_cover_every_layer():
    assert DOC.is_file(), "docs/architecture.md is missing"
    assert {"stpcore.kernels", "stpcore.ops", "stpcore.layers", "stpcore.models", "stpcore.training",
            "stpcore.evaluation", "stpcore.inference"} <= set(RULES)


@pytest.mark.parametrize("layer", sorted(RULES))
def test_layer_imports_nothing_it_may_not(layer):
    bad = []
    modules = [p for p in sources() if within(module_name(p), layer)]
    assert modules, f"no module belongs to {layer}"
    for path in modules:
        for name in sorted(imports_of(path)):
            hit = [f for f in RULES[layer] if within(name, f)]
            if hit:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, f"{layer} breaks docs/architecture.md's layer rules:\n" + "\n".join(bad)


def test_only_the_cli_the_demo_and_benchmarks_import_training():
    allowed = ("stpcore.cli", "stpcore.demo", "stpcore.training")
    bad = [f"{p.relative_to(ROOT)}" for p in sources()
           if not any(within(module_name(p), a) for a in allowed)
           and any(within(n, "stpcore.training") for n in imports_of(p))]
    assert not bad, f"these import stpcore.training: {bad}"


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    """The parser itself: a lazy import inside a function counts."""
    probe = ROOT / "stpcore" / "models" / "checkpoints.py"
    assert "stpcore.models.stprivacy" in imports_of(probe)  # imported inside load_anonymizer
