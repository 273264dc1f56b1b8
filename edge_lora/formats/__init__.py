"""File-format contracts, one owner per format, shared by the build side and the device side.

- :mod:`edge_lora.formats.export_meta`: ``edge_lora.json``, what an export folder holds (stdlib only);
- :mod:`edge_lora.formats.quantized_factors`: the codes of the one factor quantizer (numpy);
- :mod:`edge_lora.formats.ort_adapter`: the hot-swap adapter file (numpy, onnxruntime).

Nothing here imports torch or the build stages, so ``runtimes/`` and ``ota/`` can import it on a device. This
``__init__`` imports nothing, so importing one format costs only that format's dependencies.
"""
