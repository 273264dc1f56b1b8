"""Graph edits as onnx_ir passes, each returning a small result record: the model, whether the pass changed it,
and a frozen record of what it did (its ``details``, one dataclass per pass).

The shape follows onnx_ir's own passes (``call(model)`` behind ``__call__``, in place, ``PassResult(model,
modified)``) without inheriting from ``onnx_ir.passes.PassBase``: its ``__call__`` insists on onnx_ir's own,
mutable PassResult (a frozen record cannot subclass it), its ``Sequential``/``PassManager`` re-wrap every error as
``PassError`` (the CLI maps EdgeLoraError subclasses to exit codes, so the type must survive), and importing
onnx_ir costs a second (it imports onnx) in modules that only need the naming rules of :mod:`edge_lora.passes.fuse`.
:func:`run` still takes onnx_ir passes beside ours.

- :func:`run`: passes in order on a model in memory (the quantizer serializes the result itself);
- :func:`apply`: load a model file, run passes, save it in place atomically (external data kept as such).

A failing pass is named: an EdgeLoraError is raised again as the same type, its message prefixed with
``graph pass 'NAME' failed:``; any other exception (a bug) keeps its traceback and gets a note naming the pass.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from edge_lora.errors import EdgeLoraError, ModelError

D = TypeVar("D")


@dataclass(frozen=True)
class PassResult(Generic[D]):
    """What one pass did. ``model`` is the edited model (passes edit in place: the one passed in), or None in the
    results of :func:`apply`, whose model is on disk again; ``details`` is the pass's own record."""

    name: str
    model: Any
    modified: bool
    details: D


@contextmanager
def named_errors(name: str) -> Iterator[None]:
    """Errors raised inside graph pass ``name`` name it (see the module docstring)."""
    try:
        yield
    except EdgeLoraError as exc:
        renamed = copy.copy(exc)   # same type (and exit code), attributes and notes
        renamed.args = (f"graph pass '{name}' failed: {exc}",)
        raise renamed from exc
    except Exception as exc:
        exc.add_note(f"edge_lora: raised in graph pass '{name}'")
        raise


class GraphPass:
    """Base of edge_lora's passes: a subclass sets ``name`` and implements ``call(model) -> PassResult``, editing
    ``model`` in place. Calling the pass runs ``call`` with its errors naming the pass."""

    name: ClassVar[str] = "graph_pass"

    def call(self, model) -> PassResult:
        raise NotImplementedError

    def __call__(self, model) -> PassResult:
        with named_errors(self.name):
            result = self.call(model)
        if not isinstance(result, PassResult) or result.model is not model:
            raise TypeError(f"graph pass '{self.name}' must return a PassResult holding the model it edited in "
                            "place; this is a bug in edge_lora.")
        return result


def _pass_name(p) -> str:
    return getattr(p, "name", None) or type(p).__name__


def run(model, *passes) -> list[PassResult]:
    """Run ``passes`` on ``model`` in order; one result per pass. A pass is a :class:`GraphPass` or an in-place
    ``onnx_ir.passes.PassBase`` (its result gets ``details`` None)."""
    results = []
    for p in passes:
        if isinstance(p, GraphPass):
            result = p(model)
        else:
            with named_errors(_pass_name(p)):
                done = p(model)
            if done.model is not model:
                raise TypeError(f"graph pass '{_pass_name(p)}' returned a new model; edge_lora runs in-place "
                                "passes only (the file is saved from the model it loaded).")
            result = PassResult(_pass_name(p), model, bool(done.modified), None)
        results.append(result)
    return results


def apply(model_path: str | Path, *passes) -> list[PassResult]:
    """Load ``model_path`` with onnx_ir, :func:`run` ``passes`` on it and, if one changed it, save it in place
    (external data kept as such). The results carry no model: the file is the model now (the one in memory
    refers lazily to external data this replaced)."""
    import onnx_ir as ir

    model_path = Path(model_path)
    try:
        model = ir.load(model_path)
    except Exception as exc:
        raise ModelError(f"cannot read {model_path} as ONNX ({exc}); export it again.") from exc
    results = run(model, *passes)
    if any(r.modified for r in results):
        save_in_place(model, model_path)
    del model
    return [replace(r, model=None) for r in results]


def save_in_place(model, model_path: Path) -> None:
    """Replace ``model_path`` (and its ``_data`` file, if it has one) with ``model``, atomically."""
    import onnx_ir as ir

    from edge_lora.files import fsync_and_replace, temp_folder_beside

    # ir.load reads external data lazily, from the files we are about to replace: write into a side folder
    # under the final names (the model refers to its data file by name), then move both into place.
    data = model_path.with_name(model_path.name + "_data")
    side = temp_folder_beside(model_path.with_name("rewrite"))
    try:
        ir.save(model, side / model_path.name, external_data=data.name if data.exists() else None)
        # data file first: a crash between the two leaves the old graph, which ignores the unknown tail
        for produced in sorted(side.iterdir(), key=lambda p: p.name == model_path.name):
            fsync_and_replace(produced, model_path.parent / produced.name)
    finally:
        shutil.rmtree(side, ignore_errors=True)
