"""Module layering: the dependency runs one way, config -> data -> errors. Nothing under
megatron_minitron/data/ imports megatron_minitron.config (parsed with `ast`, so lazy imports
inside functions count too; imports under `if TYPE_CHECKING:` are type hints only and pass),
and errors.py imports nothing of the package."""

import ast
from pathlib import Path

import pytest

import megatron_minitron

pytestmark = pytest.mark.smoke

PKG = Path(megatron_minitron.__file__).resolve().parent


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_imports(node: ast.AST):
    """Import/ImportFrom nodes of a tree, leaving out the bodies of `if TYPE_CHECKING:`."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for sub in child.orelse:  # the `else:` of an `if TYPE_CHECKING:` does run
                yield from _runtime_imports(ast.Module(body=[sub], type_ignores=[]))
            continue
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        yield from _runtime_imports(child)


def imported_modules(source: str, package: str) -> set:
    """Absolute names a module of `package` imports: `import a.b`, `from a import b` (both
    a and a.b, since b may be a submodule), relative imports resolved against `package`."""
    out = set()
    for node in _runtime_imports(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
            continue
        if node.level:
            parts = package.split(".")
            base = ".".join(parts[:len(parts) - node.level + 1])
            mod = f"{base}.{node.module}" if node.module else base
        else:
            mod = node.module
        out.add(mod)
        out.update(f"{mod}.{alias.name}" for alias in node.names)
    return out


def _hits(names: set, target: str) -> set:
    return {n for n in names if n == target or n.startswith(target + ".")}


def test_detector_sees_every_form_of_import():
    pkg = "megatron_minitron.data"
    for src in ("from ..config import ConfigError", "from .. import config",
                "import megatron_minitron.config", "from megatron_minitron.config import DataConfig",
                "def f():\n    from ..config import DataConfig\n",
                "if TYPE_CHECKING:\n    pass\nelse:\n    from ..config import DataConfig\n"):
        assert _hits(imported_modules(src, pkg), "megatron_minitron.config"), src
    for src in ("from ..errors import ConfigError", "from .blend import parse_blend",
                "from .. import dist", "import configparser",
                "if TYPE_CHECKING:\n    from ..config import DataConfig\n"):
        assert not _hits(imported_modules(src, pkg), "megatron_minitron.config"), src


def test_data_package_does_not_import_config():
    files = sorted((PKG / "data").rglob("*.py"))
    assert files
    bad = {}
    for f in files:
        package = ".".join(f.relative_to(PKG.parent).parent.parts)  # also right for __init__.py
        hits = _hits(imported_modules(f.read_text(), package), "megatron_minitron.config")
        if hits:
            bad[str(f.relative_to(PKG.parent))] = sorted(hits)
    assert not bad, f"data/ must not import config (config -> data -> errors): {bad}"


def test_errors_is_below_everything():
    names = imported_modules((PKG / "errors.py").read_text(), "megatron_minitron")
    assert not _hits(names, "megatron_minitron"), names
    from megatron_minitron import config, errors
    from megatron_minitron.data import DataError
    assert config.ConfigError is errors.ConfigError and issubclass(DataError, errors.ConfigError)
