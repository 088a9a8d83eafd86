"""The architecture, checked from the imports: the folders of `src/ilora` are layers, and a module
imports only from its own folder and from layers below it. The command line's first screen loads no
heavy library."""

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).parents[1] / "src" / "ilora"

# bottom to top; the names are top-level modules or folders of ilora
LAYERS = [
    {"errors"},
    {"files"},
    {"data", "runtime"},
    {"config", "core"},
    {"methods"},
    {"store"},
    {"evaluation"},
    {"trainer"},
    {"pipeline", "integrations"},
    {"cli"},
]
FLOOR = {name: level for level, names in enumerate(LAYERS) for name in names}


def room(module: str) -> str:
    """The layer name of a dotted module under ilora: `ilora.store.taskdir` -> `store`."""
    return module.split(".")[1]


def modules() -> dict[str, Path]:
    found = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path) -> set[str]:
    """Every ilora module `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ilora"):
            if node.level:
                raise AssertionError(f"{path}: a relative import (ilora imports absolutely)")
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("ilora"))
    known = modules()
    return {name for name in found if name in known}


def test_every_module_sits_in_a_layer():
    for module in modules():
        if module != "ilora":
            assert room(module) in FLOOR, f"{module} is in no layer of tests/test_layers.py"


def test_nothing_imports_upward():
    upward = []
    for module, path in modules().items():
        if module == "ilora":  # the package's lazy exports, resolved on first use
            continue
        own = room(module)
        for target in imports(path):
            if target == "ilora" or room(target) == own:
                continue
            if FLOOR[room(target)] >= FLOOR[own]:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports against the layers: " + ", ".join(sorted(upward))


HEAVY = ("torch", "transformers", "peft", "accelerate", "datasets", "deepspeed", "matplotlib")


def test_the_command_list_and_the_run_help_load_no_heavy_library():
    """`ilora --help` and `ilora run --help` answer from the standard library: the heavy imports happen in
    the command that needs them."""
    for argv in (["--help"], ["run", "--help"], ["export", "--help"]):
        code = "\n".join(
            [
                "import sys",
                "from ilora.cli import main",
                "try:",
                f"    main({argv!r})",
                "except SystemExit:",
                "    pass",
                f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))",
            ]
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().splitlines()[-1] == "[]", (argv, result.stdout[-300:])
