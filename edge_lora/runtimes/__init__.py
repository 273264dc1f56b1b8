"""Runtimes that run exported models: ONNX Runtime sessions, generation loops, the hot-swap loader."""
