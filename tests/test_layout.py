"""The package's import arrows point one way: each layer imports only the layers below it, and no
two modules import each other, directly or through others (imports inside functions included)."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "asl_cli"
# lowest first; a module may import its own layer's modules and any layer listed before it
LAYERS = [
    ("errors", "allocator"),
    ("ops",),
    ("nn",),
    ("zoo",),
    ("config", "inference", "export"),
    ("data",),
    ("train",),
    ("experiments",),
    ("cli", "__main__"),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The asl_cli modules `path` imports (relative or absolute), as dotted names under asl_cli."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    package = [p for p in package if p]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "asl_cli":
                target = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:  # `from . import x` may name a submodule
                sub = ".".join(target + [alias.name])
                out.add(sub if resolve(sub) else ".".join(target))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "asl_cli":
                    out.add(".".join(alias.name.split(".")[1:]))
    return {m for m in out if m and resolve(m)} - {name}


def resolve(dotted: str) -> bool:
    p = PKG.joinpath(*dotted.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def layer_of(dotted: str) -> int:
    top = dotted.split(".")[0]
    return next(i for i, names in enumerate(LAYERS) if top in names)


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in PKG.rglob("*.py") if module_name(p)}


def test_every_module_has_a_layer():
    for name in graph():
        layer_of(name)


def test_imports_point_down():
    wrong = [f"{a} -> {b}" for a, targets in graph().items() for b in targets if layer_of(b) > layer_of(a)]
    assert wrong == []


def test_no_import_cycles():
    g = graph()
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    assert cycles == []
