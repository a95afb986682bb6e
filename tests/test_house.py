"""The house rules, checked on every run: typed, layered, no hidden cycles, a light package import.

- mypy, configured in pyproject.toml, finds no error in the package;
- import-linter keeps the layers contract of pyproject.toml (each layer imports only those below);
- no module imports from the package inside a function, the way a cycle is hidden from both;
- `import changefeed` loads no web framework, server or database driver: the gunicorn master
  reads the package before gevent patches anything, and a host application pays for what it uses.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "changefeed"
BIN = Path(sys.executable).parent  # the virtualenv's tools, beside its python
HEAVY = ("flask", "gevent", "sqlite3", "psycopg", "prometheus_client")


def run_tool(*command):
    """Run one of the virtualenv's tools from the repository root; return its exit code and output."""
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout + done.stderr


def mypy_cache_dir(request, tmp_path_factory):
    """Where mypy keeps what it learned: under pytest's cache (ignored by git), or a scratch folder without one."""
    cache = getattr(request.config, "cache", None)  # None under `-p no:cacheprovider`
    return cache.mkdir("mypy") if cache is not None else tmp_path_factory.mktemp("mypy")


def test_mypy_finds_no_error_in_the_package(request, tmp_path_factory):
    code, output = run_tool(str(BIN / "mypy"), "--cache-dir", str(mypy_cache_dir(request, tmp_path_factory)))
    assert code == 0, f"mypy (files and options in pyproject.toml) reports:\n{output}"
    assert "Success: no issues found" in output, output


def test_the_layers_contract_is_kept():
    code, output = run_tool(str(BIN / "lint-imports"), "--no-cache")
    assert code == 0 and "BROKEN" not in output, f"lint-imports reports:\n{output}"
    assert "KEPT" in output, output


def package_imports_inside_functions(path):
    """The imports of the package itself (absolute or relative) that `path` makes inside a function body."""
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            if in_function and isinstance(child, ast.Import):
                found.extend((child.lineno, alias.name) for alias in child.names
                             if alias.name.partition(".")[0] == "changefeed")
            elif in_function and isinstance(child, ast.ImportFrom):
                if child.level or (child.module or "").partition(".")[0] == "changefeed":
                    found.append((child.lineno, "." * child.level + (child.module or "")))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text(), str(path)), False)
    return found


# The imports of the package deferred into a function on purpose, each for a reason that is not a cycle
# (import-linter reads imports inside functions too, so the layers contract still sees these).
DEFERRED = {
    ("changefeed/__init__.py", "changefeed.extension"):
        "importing the package must not import flask: the gunicorn master reads it before gevent patches",
    ("changefeed/stores/engines.py", "changefeed.stores.postgres"):
        "psycopg picks how it waits when imported: only once gevent has patched the worker",
    ("changefeed/stores/engines.py", "changefeed.stores.postgres_notify"):
        "psycopg picks how it waits when imported: only once gevent has patched the worker",
}


def test_no_module_imports_the_package_inside_a_function():
    """An import moved into a function hides a cycle from Python: none is allowed but the few DEFERRED on purpose.

    Optional third-party imports inside functions (psycopg, gevent, click) are not cycles, and stay allowed.
    """
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 10, "the package's modules were not found"
    found = [(str(path.relative_to(ROOT)), line, name)
             for path in modules for line, name in package_imports_inside_functions(path)]
    hidden = [f"{path}:{line}: {name}" for path, line, name in found if (path, name) not in DEFERRED]
    assert not hidden, "imports of changefeed inside functions (move them to the top, or cut the cycle):\n" + \
        "\n".join(hidden)
    assert {(path, name) for path, _, name in found} == set(DEFERRED), "a DEFERRED import is gone: drop it here"


def test_the_import_check_sees_what_it_must(tmp_path):
    """The AST walk above finds package imports in functions and methods, and lets third-party ones be."""
    sample = tmp_path / "sample.py"
    sample.write_text("import json\nfrom changefeed.core import errors\n\n"
                      "def f():\n    import psycopg\n    from changefeed.ops import metrics\n\n"
                      "class C:\n    def m(self):\n        import changefeed.stores.sqlite\n"
                      "        from . import sibling\n")
    assert package_imports_inside_functions(sample) == [
        (6, "changefeed.ops"), (10, "changefeed.stores.sqlite"), (11, ".")]


def test_importing_the_package_stays_light():
    probe = "import json, sys, changefeed; print(json.dumps(sorted({name.partition('.')[0] for name in sys.modules})))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=True)
    loaded = set(json.loads(done.stdout))
    assert not loaded.intersection(HEAVY), f"`import changefeed` imports {sorted(loaded.intersection(HEAVY))}"
