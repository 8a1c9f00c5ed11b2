"""The table of modalities keeps its promise: nothing outside ``modalities.py`` branches on a modality's name.

Every module of the package is parsed; a comparison (``==``, ``!=``, ``in``, ``not in``), an ``.index(...)``
call or a ``match`` case that involves a string constant naming a modality of the table is a branch on a name.
What the code needs to know about a modality belongs in the table (an attribute of its entry, or a function of
``modalities.py``). The few hits that are not about modalities are allowed below, each with its reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from cfmae_cli import modalities as table

PACKAGE = Path(__file__).resolve().parents[1] / "cfmae_cli"

#: (module, source of the expression) → why it is not a branch on a modality
ALLOWED = {
    ("cli/label.py", 'settings.get("depth") == "classical"'):
        "the labeller's settings name the depth backend to run, keyed by the folder it writes",
    ("cli/label.py", 'settings.get("depth") == "depth-anything"'):
        "the labeller's settings name the depth backend to run, keyed by the folder it writes",
    ("cli/visualise.py", 'masking not in ("random", "semantic", "instance", "progressive")'):
        "masking strategies named like the maps that guide them, not modalities",
    ("config_stored.py", '"depth" in args'):
        "timm's model_args.depth, the encoder's number of blocks",
}


def _names_in(node: ast.AST, names: set[str]) -> bool:
    return any(isinstance(c, ast.Constant) and c.value in names for c in ast.walk(node))


def name_branches(source: str, names: set[str]) -> list[tuple[int, str]]:
    """(line, source) of each comparison, ``.index(...)`` call or match case on a constant of ``names``."""
    tree = ast.parse(source)
    hits: list[ast.AST] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and _names_in(node, names):
            hits.append(node)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "index"
              and any(_names_in(arg, names) for arg in node.args)):
            hits.append(node)
        elif isinstance(node, ast.match_case) and _names_in(node.pattern, names):
            hits.append(node.pattern)
    return sorted((getattr(n, "lineno", 0), ast.get_source_segment(source, n) or "") for n in hits)


def package_branches() -> list[tuple[str, int, str]]:
    names = set(table.names())
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "modalities.py" and path.parent == PACKAGE:
            continue
        module = path.relative_to(PACKAGE).as_posix()
        out += [(module, line, text) for line, text in name_branches(path.read_text(encoding="utf-8"), names)]
    return out


def test_nothing_outside_the_table_branches_on_a_modality_name() -> None:
    found = [(m, line, text) for m, line, text in package_branches() if (m, text) not in ALLOWED]
    assert not found, "branches on a modality's name (put what they need in modalities.py):\n" + \
        "\n".join(f"cfmae_cli/{m}:{line}: {text}" for m, line, text in found)


def test_every_allowed_entry_is_still_there() -> None:
    """An entry whose code is gone (or changed) leaves the list, so that the list stays short and true."""
    present = {(m, text) for m, _, text in package_branches()}
    assert not set(ALLOWED) - present, f"stale entries: {sorted(set(ALLOWED) - present)}"


@pytest.mark.parametrize("code", ['if name == "rgb": pass', 'if "depth" not in mods: pass',
                                  'x = mods.index("semantic")', 'match m:\n    case "instance": pass',
                                  'ok = kind != "instance" and n > 0'])
def test_the_scan_finds_each_kind_of_branch(code: str) -> None:
    assert len(name_branches(code, set(table.names()))) == 1


@pytest.mark.parametrize("code", ['x = batch["rgb"]', 'd = {"depth": 1}', 'if name == "random": pass',
                                  'i = mods.index(table.embedding_modality())'])
def test_the_scan_lets_lookups_and_other_strings_be(code: str) -> None:
    assert name_branches(code, set(table.names())) == []
