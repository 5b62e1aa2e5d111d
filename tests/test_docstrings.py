"""Every public class under src/affordvla says what it is for: a class without a docstring is named here."""
import ast
from pathlib import Path

import affordvla

PACKAGE = Path(affordvla.__file__).parent


def _public_classes_without_docstring(path: Path, root: Path) -> list[str]:
    """`file:line Class` for each public class in `path` (at any depth) that has no docstring."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    classes = sorted((node for node in ast.walk(tree) if isinstance(node, ast.ClassDef)), key=lambda n: n.lineno)
    return [f"{path.relative_to(root).as_posix()}:{node.lineno} {node.name}" for node in classes
            if not node.name.startswith("_") and ast.get_docstring(node) is None]


def test_the_check_names_public_classes_without_docstring(tmp_path):
    """Nested public classes count too; private ones and documented ones do not."""
    source = tmp_path / "probe.py"
    source.write_text('class Said:\n    """Why."""\n\n    class Inner:\n        pass\n\n\nclass _Private:\n    pass\n'
                      "\n\nclass Bare:\n    x = 1\n")
    assert _public_classes_without_docstring(source, tmp_path) == ["probe.py:4 Inner", "probe.py:12 Bare"]


def test_every_public_class_has_a_docstring():
    missing = [entry for path in sorted(PACKAGE.rglob("*.py"))
               for entry in _public_classes_without_docstring(path, PACKAGE.parent)]
    assert not missing, f"{len(missing)} public classes without a docstring:\n" + "\n".join(missing)
