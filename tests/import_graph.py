"""The import graph of ditlab's source, read with `ast`: every `import ditlab...` and
`from ... import ...`, also those inside functions (the lazy imports a command makes when it runs)."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def module_file(name: str) -> Path | None:
    path = SRC.joinpath(*name.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def imported_names(path: Path, prefix: str = "ditlab") -> set[str]:
    """Modules `path` imports whose name starts with `prefix` ("" for all); for `from m import n`
    both m and m.n, since n may be a module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith(prefix)}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(prefix) and not node.level:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return found
