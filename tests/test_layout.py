"""The import rules of docs/architecture.md, read from every module's import statements."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lam"
# lam/<name>.py that are not entry points: shared by every layer (errors) or by the entry points (config)
SHARED = {"lam.errors", "lam.__init__"}
ENTRY_SUPPORT = {"lam.config", "lam.sweep"}  # what the entry points compose configs with; sweep's Hydra callbacks


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


def imports(path: Path) -> set[str]:
    """Every module `path` imports, at any depth of the file (imports inside functions count too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module != "__future__":
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names if node.module == "lam")
    return names


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in {"models", "data", "training", "serving"}:
        return parts[1]
    if module in SHARED:
        return "shared"
    return "entry support" if module in ENTRY_SUPPORT else "entry"


def violations(module: str, imported: set[str]) -> list[str]:
    top = {name.split(".")[0] for name in imported}
    lam_layers = {layer(name) for name in imported if name.startswith("lam.")}
    found = []
    own = layer(module)
    if own == "models" and (bad := top - {"torch", "lam"} - set(sys.stdlib_module_names)):
        found.append(f"models import only torch, not {sorted(bad)}")
    if own == "models" and (bad := lam_layers - {"models"}):
        found.append(f"models import no other layer of lam, not {sorted(bad)}")
    if own == "data" and (bad := lam_layers & {"models", "training", "serving", "entry", "entry support"}):
        found.append(f"data imports no model, Lightning glue or entry point, not {sorted(bad)}")
    if own in {"models", "data", "serving"} and (bad := top & {"lightning", "hydra", "pytorch_lightning"}):
        found.append(f"nothing in {own} imports Lightning or Hydra, not {sorted(bad)}")
    if own not in {"entry", "entry support"} and "hydra" in top:
        found.append("only entry points and their Hydra callbacks compose configs (hydra)")
    if own not in {"entry", "entry support"} and (bad := lam_layers & {"entry", "entry support"}):
        found.append(f"only entry points import an entry point, not {sorted(bad)}")
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_module_keeps_the_import_rules(path):
    assert violations(module_name(path), imports(path)) == []


@pytest.mark.parametrize("module, imported", [
    ("lam.models.decoder", {"lightning", "torch"}),
    ("lam.models.attention.linear", {"numpy"}),
    ("lam.models.sampling", {"lam.data.tokenizer"}),
    ("lam.data.tokenizer", {"lam.models.decoder"}),
    ("lam.serving.model_file", {"hydra.utils"}),
    ("lam.training.callbacks", {"lam.train"}),
    ("lam.training.checkpoint", {"hydra"}),
])
def test_each_rule_catches_its_break(module, imported):
    assert violations(module, imported)


def test_every_file_has_a_layer_and_the_top_level_holds_entry_points():
    top = {module_name(p) for p in PACKAGE.glob("*.py")} - SHARED - ENTRY_SUPPORT
    assert {name.split(".")[1] for name in top} <= {"train", "generate", "compare", "prepare", "export", "eval",
                                                    "chat", "serve"}
