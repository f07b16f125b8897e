"""The package's layers, read from the imports: tensor <- zoo <- io <- engine <- families <- recipe, demo <- cli.

A module may import from its own layer or a lower one; families (inspect, adapt, merge, compress, data,
align, elastic) share one layer. Top-level modules (errors, registry, configfile) are the foundation."""
import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "weightlab"
RANK = {"tensor": 0, "zoo": 0.5, "io": 1, "engine": 2, "inspect": 3, "adapt": 3, "merge": 3, "compress": 3,
        "data": 3, "align": 3, "elastic": 3, "recipe": 4, "demo": 4, "cli": 5}


def _imports(path: Path):
    """(line, top-level package imported, imported names) for every import of weightlab code in ``path``."""
    rel = path.relative_to(SRC).parts
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level > 0:
            pkg = list(rel[:-1])
            mod = pkg[:len(pkg) - (node.level - 1)] + (node.module.split(".") if node.module else [])
        elif node.module and node.module.split(".")[0] == "weightlab":
            mod = node.module.split(".")[1:]
        else:
            continue
        names = [a.name for a in node.names]
        yield node.lineno, (mod[0] if mod else names[0]), mod, names


def test_imports_point_down_only():
    bad = []
    for p in sorted(SRC.rglob("*.py")):
        top = p.relative_to(SRC).parts[0]
        if top not in RANK:
            continue
        for line, tgt, _, _ in _imports(p):
            if tgt in RANK and tgt != top and RANK[tgt] >= RANK[top]:
                bad.append(f"{p.relative_to(SRC)}:{line} ({top}) imports {tgt}")
    assert not bad, "\n".join(bad)


def test_no_private_names_across_packages():
    bad = []
    for p in sorted(SRC.rglob("*.py")):
        top = p.relative_to(SRC).parts[0]
        for line, tgt, mod, names in _imports(p):
            if tgt != top and any(n.startswith("_") and not n.startswith("__") for n in names + mod[1:]):
                bad.append(f"{p.relative_to(SRC)}:{line} imports {'.'.join(mod)}: {names}")
    assert not bad, "\n".join(bad)
