"""The package's shape, checked: no import cycles (type-only imports count: they are
coupling too), no module reads another's underscore names, no module much over 400 lines
without saying why in its docstring."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "forwarder"
# private names of the standard library we use on purpose, with the reason
ALLOWED_PRIVATE = {
    "_accept": "acceptor.py: socket._accept() skips two enum conversions per accepted socket",
    "_exit": "zygote.py: os._exit(), a forked child must not run its parent's atexit handlers",
}
LONG = 420


def modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        rel = p.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    deps: set[str] = set()
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.ImportFrom):
            if n.level:
                base = pkg.split(".")[: len(pkg.split(".")) - (n.level - 1)]
                target = ".".join(base + ([n.module] if n.module else []))
            else:
                target = n.module or ""
            for cand in [target, *(f"{target}.{a.name}" for a in n.names)]:
                if cand in mods and cand != name:
                    deps.add(cand)
        elif isinstance(n, ast.Import):
            deps |= {a.name for a in n.names if a.name in mods and a.name != name}
    return deps


def test_no_import_cycles() -> None:
    mods = modules()
    graph = {m: imports(m, p, mods) for m, p in mods.items()}
    cycles = []

    def walk(node: str, path: list[str], done: set[str]) -> None:
        for d in sorted(graph[node]):
            if d in path:
                cycles.append(" -> ".join([*path[path.index(d):], d]))
            elif d not in done:
                walk(d, [*path, d], done)
        done.add(node)

    done: set[str] = set()
    for m in sorted(graph):
        if m not in done:
            walk(m, [m], done)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_module_reads_another_objects_private_names() -> None:
    found = []
    for name, path in modules().items():
        for n in ast.walk(ast.parse(path.read_text())):
            if (isinstance(n, ast.Attribute) and n.attr.startswith("_")
                    and not n.attr.startswith("__") and n.attr not in ALLOWED_PRIVATE
                    and not (isinstance(n.value, ast.Name) and n.value.id in ("self", "cls"))):
                found.append(f"{name}:{n.lineno}: .{n.attr}")
    assert not found, "\n".join(found)


def test_long_modules_say_why() -> None:
    long = []
    for name, path in modules().items():
        text = path.read_text()
        doc = ast.get_docstring(ast.parse(text)) or ""
        if text.count("\n") > LONG and "Size:" not in doc:
            long.append(f"{name}: {text.count(chr(10))} lines")
    assert not long, "modules over ~400 lines without a reason in the docstring:\n" + \
        "\n".join(long)
