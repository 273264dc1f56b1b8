"""ONNX Runtime on the CUDA execution provider (``pip install edge_lora[cuda]`` brings onnxruntime-gpu).

Same loop as the CPU runner: the KV cache goes back to host memory every step (no IO binding), so decode
times include two PCIe copies of the cache per token and are an upper bound on what the GPU can do.
"""

from __future__ import annotations

from edge_lora.runtimes import RuntimeUnavailableError
from edge_lora.runtimes.ort_cpu import OrtCpuRunner
from edge_lora.runtimes.ort_session import load_session

CUDA = "CUDAExecutionProvider"
INSTALL_HINT = "install edge_lora[cuda] on a machine with an NVIDIA GPU"


def require_cuda() -> None:
    import onnxruntime as ort

    if CUDA not in ort.get_available_providers():
        raise RuntimeUnavailableError(f"{CUDA} is not available: {INSTALL_HINT} (this onnxruntime "
                                      f"{ort.__version__} offers {', '.join(ort.get_available_providers())}).")


class OrtCudaRunner(OrtCpuRunner):
    runtime = "ort_cuda"
    provider = CUDA

    def _make_session(self, threads: int, spinning: bool):
        require_cuda()
        session = load_session(self.folder, threads=threads, spinning=spinning, providers=(CUDA,))
        # ORT falls back to the CPU quietly when the CUDA libraries fail to load; a CPU number labelled CUDA
        # would be wrong, so refuse.
        if session.get_providers()[0] != CUDA:
            raise RuntimeUnavailableError(f"{CUDA} is installed but the session fell back to "
                                          f"{session.get_providers()[0]} (CUDA or cuDNN libraries missing?); "
                                          f"{INSTALL_HINT} and matching CUDA/cuDNN versions.")
        return session
