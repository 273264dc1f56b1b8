"""The layout rules of docs (DESIGN.md "Structure"), checked on the source: who may import whom, and that a
profile parses in a fresh process (no stage registers itself at import time)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from edge_lora.config import available_profiles

PACKAGE = Path(__file__).resolve().parents[1] / "edge_lora"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


class _Imports(ast.NodeVisitor):
    """Every import of a module, function-local ones included, as (imported module, at module level?). ``from A
    import B`` counts as importing A and A.B (B may be a submodule, as in ``from edge_lora import pipeline``)."""

    def __init__(self, module: str, is_package: bool):
        self.package = module if is_package else module.rpartition(".")[0]
        self.found: list[tuple[str, bool, int]] = []
        self.calls: list[tuple[str, int]] = []
        self.depth = 0

    def _nested(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = visit_Lambda = _nested

    def visit_Import(self, node):
        for alias in node.names:
            self.found.append((alias.name, self.depth == 0, node.lineno))

    def visit_ImportFrom(self, node):
        base = node.module or ""
        if node.level:
            anchor = self.package.split(".")[: len(self.package.split(".")) - node.level + 1]
            base = ".".join(anchor + ([base] if base else []))
        self.found.append((base, self.depth == 0, node.lineno))
        for alias in node.names:
            self.found.append((f"{base}.{alias.name}", self.depth == 0, node.lineno))

    def visit_Call(self, node):
        f = node.func
        name = (f"{f.value.id}.{f.attr}" if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name)
                else f.id if isinstance(f, ast.Name) else "")
        if name in ("importlib.import_module", "import_module", "__import__"):
            self.calls.append((name, node.lineno))
        self.generic_visit(node)


def _scan():
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        visitor = _Imports(module, path.name == "__init__.py")
        visitor.visit(ast.parse(path.read_text(), str(path)))
        out[module] = visitor
    return out


MODULES = _scan()


def _imports(prefix: str):
    """(module, imported, module level, line) for every module under ``prefix``."""
    return [(m, name, top, line) for m, v in MODULES.items() if m == prefix or m.startswith(prefix + ".")
            for name, top, line in v.found]


def _is(name: str, target: str) -> bool:
    return name == target or name.startswith(target + ".")


def test_the_scan_sees_the_package():
    assert {"edge_lora.cli", "edge_lora.pipeline", "edge_lora.stages.compress", "edge_lora.ota.install",
            "edge_lora.runtimes.timing"} <= set(MODULES)
    # function-local imports are seen too (the pipeline imports transformers' PEFT inside a function)
    assert any(name == "peft.PeftModel" and not top for _, name, top, _ in _imports("edge_lora.pipeline"))


def test_no_stage_imports_the_pipeline_or_the_cli():
    bad = [(m, name, line) for m, name, _, line in _imports("edge_lora.stages")
           if _is(name, "edge_lora.pipeline") or _is(name, "edge_lora.cli")]
    assert not bad, bad


@pytest.mark.parametrize("side", ["edge_lora.runtimes", "edge_lora.ota"])
def test_device_side_never_imports_build_code(side):
    bad = [(m, name, line) for m, name, _, line in _imports(side)
           if any(_is(name, t) for t in ("edge_lora.stages", "edge_lora.pipeline", "edge_lora.cli"))]
    assert not bad, bad


@pytest.mark.parametrize("side", ["edge_lora.runtimes", "edge_lora.ota"])
def test_device_side_does_not_import_torch_at_module_level(side):
    bad = [(m, name, line) for m, name, top, line in _imports(side) if top and _is(name, "torch")]
    assert not bad, bad


def test_config_needs_no_stage():
    """Every stage's config is in edge_lora.config, so a profile parses without importing the stages."""
    bad = [(name, line) for _, name, _, line in _imports("edge_lora.config")
           if any(_is(name, t) for t in ("edge_lora.stages", "edge_lora.pipeline", "edge_lora.cli", "torch"))]
    assert not bad, bad


def test_only_the_cli_parses_arguments():
    bad = [(m, line) for m, v in MODULES.items() for name, _, line in v.found
           if _is(name, "argparse") and not _is(m, "edge_lora.cli")]
    assert not bad, bad


def test_no_import_by_name_string():
    """Modules are imported by import statements (literal verb, stage and runner tables), never by a computed
    name: a reader (and this test) can then see every dependency."""
    bad = [(m, call, line) for m, v in MODULES.items() for call, line in v.calls]
    bad += [(m, name, line) for m, v in MODULES.items() for name, _, line in v.found
            if name in ("importlib.import_module",)]
    assert not bad, bad


def test_the_cli_parser_loads_no_build_code():
    """Building the parser (every `python -m edge_lora` call, --help included) imports no torch, numpy or stage:
    handlers import their library code when they run, so device-side verbs stay light."""
    code = ("import sys; from edge_lora.cli import VERBS, build_parser; build_parser(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'transformers') "
            "or m.startswith(('edge_lora.stages', 'edge_lora.pipeline'))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_the_verb_list_is_literal_and_complete():
    from edge_lora.cli import VERBS, build_parser

    names = [name for name, _ in VERBS]
    assert names == ["inspect", "models", "export", "validate", "compress", "compress-many", "keygen", "package",
                     "verify", "install", "list", "rollback", "profile"]
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert list(sub.choices) == names


@pytest.mark.parametrize("name", available_profiles())
def test_every_shipped_profile_parses_in_a_fresh_process(name):
    """Regression: load_profile("cpu-int8") failed with "unknown table(s) quantize" unless edge_lora.pipeline had
    been imported first (stages registered their tables when imported)."""
    code = f"from edge_lora.config import load_profile; load_profile({name!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_shipped_profiles_are_there():
    assert {"cpu-fp32", "cpu-hotswap", "cpu-int8", "cpu-int4", "cpu-int4-hotswap", "mobile-int4"} <= set(
        available_profiles())


STAGE_MODULES = ("canonicalize", "compress", "compress_many", "quantize_factors", "merge", "export_onnx", "quantize_base",
                 "validate", "profile", "package")


@pytest.mark.parametrize("name", STAGE_MODULES)
def test_every_stage_has_the_one_shape(name):
    """run(input, config) -> (output, StageReport): two parameters, the second a frozen dataclass config."""
    import dataclasses
    import importlib
    import inspect
    import typing

    module = importlib.import_module(f"edge_lora.stages.{name}")
    params = list(inspect.signature(module.run).parameters)
    assert len(params) == 2, (name, params)
    config = typing.get_type_hints(module.run)[params[1]]
    assert dataclasses.is_dataclass(config) and config.__dataclass_params__.frozen, (name, config)
