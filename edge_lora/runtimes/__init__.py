"""Runtimes that run exported models: ONNX Runtime sessions, generation loops, the hot-swap loader, and the
runners the profiler times.

A runner is one model on one runtime, driven one token at a time with greedy decoding. Every runner module
(``ort_cpu``, ``ort_cuda``, ``mobile``, ``llamacpp``) exposes a class to the :class:`Runner` protocol, built as
``Cls(path, threads=N, **options)``; :func:`open_runner` picks it by runtime name. A runner whose runtime or
provider is missing raises :class:`RuntimeUnavailableError`, so a caller can say so and go on.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from edge_lora.errors import EdgeLoraError


class RuntimeUnavailableError(EdgeLoraError):
    """A runtime or execution provider is not installed or not usable on this machine."""


@runtime_checkable
class Runner(Protocol):
    name: str        # label in reports: runtime, provider, threads, precision, e.g. "ort_cpu 2t fp32"
    info: dict       # runtime, provider, threads, precision, model path ...; the profiler also reads
                     # vocab_size and max_positions (token ids and prompt lengths every variant accepts)

    def prefill(self, ids: list[int]) -> int:
        """Reset the state, run the prompt, return the greedy next id."""

    def decode(self, token: int) -> int:
        """One KV-cache step; return the greedy next id."""

    def close(self) -> None: ...


@runtime_checkable
class SwapRunner(Runner, Protocol):
    def swap(self, adapter_path: str | None) -> None:
        """Load and activate an adapter file on the live session (None: the plain base)."""


# Runtime name -> a function importing its runner class. The imports are inside the functions so that each
# runtime's package (llama-cpp-python, onnxruntime-gpu) is needed only when it is asked for.
def _ort_cpu() -> type:
    from edge_lora.runtimes.ort_cpu import OrtCpuRunner

    return OrtCpuRunner


def _ort_cuda() -> type:
    from edge_lora.runtimes.ort_cuda import OrtCudaRunner

    return OrtCudaRunner


def _mobile() -> type:
    from edge_lora.runtimes.mobile import MobileRunner

    return MobileRunner


def _llamacpp() -> type:
    from edge_lora.runtimes.llamacpp import LlamaCppRunner

    return LlamaCppRunner


RUNNERS = {"ort_cpu": _ort_cpu, "ort_cuda": _ort_cuda, "mobile": _mobile, "llamacpp": _llamacpp}


def runner_class(runtime: str) -> type:
    if runtime not in RUNNERS:
        raise EdgeLoraError(f"unknown runtime {runtime!r}; use one of {', '.join(RUNNERS)}.")
    try:
        return RUNNERS[runtime]()
    except ImportError as exc:
        raise RuntimeUnavailableError(f"runtime {runtime!r} cannot be imported ({exc}); install its package "
                                      "(see README) or pick another runtime.") from exc


def open_runner(runtime: str, path, threads: int = 2, **options) -> Runner:
    return runner_class(runtime)(path, threads=threads, **options)
