"""Quantize the exported base model: int8 or int4 weights through ONNX Runtime's own quantizers.

Runs after the export stage, on ``model.onnx`` in the output folder, and before validation (which then
measures what the quantization cost against the PyTorch reference).

- **int4** (default block 32, symmetric): ``MatMulNBits`` from onnxruntime's ``MatMulNBitsQuantizer``. The
  defaults lose too much on a 135M model (top-1 agreement with fp32 ≈ 0.89 over 256 positions on SmolLM2),
  so some MatMuls stay at 8 bits: the LM head (``lm_head``) and the modules named in ``int8_modules``
  (``down_proj`` and ``v_proj`` were the most sensitive when each type alone was made int4).
- **int8**: by default also weight-only ``MatMulNBits`` (8 bits, block 32): top-1 0.99 on SmolLM2. The
  classic ``quantize_dynamic`` (per-channel int8 weights, per-tensor int8 activations at run time) is available
  as ``method = "dynamic"`` but measured top-1 0.87: LLM activations have outliers a per-tensor scale cannot hold.
- ``accuracy_level = 4`` lets MatMulNBits quantize activations per block to int8 and use integer dot products;
  with 0 (fp32 compute) an 8-bit model decoded 5× slower than the fp32 model itself (busy machine).

Only MatMuls with a constant weight are quantized. A hot-swap export's LoRA branches take their factors as
graph inputs: those MatMuls are left alone, so the adapter keeps its own precision (the issue's "quantize the
base only"). The tied embedding is untied for the LM head (a ``Transpose`` of the embedding table feeds it) so
that the head can be quantized while the ``Gather`` keeps its table, or quantizes it too (``embedding = "int4"``,
``GatherBlockQuantized``).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edge_lora.errors import ModelError, ProfileError
from edge_lora.config import (  # noqa: F401  (importable from here)
    ADAPTER_CHOICES,
    BASE_CHOICES,
    EMBEDDING_CHOICES,
    HEAD_CHOICES,
    METHODS,
    QuantizeConfig,
    QuantizeConfigError,
)
from edge_lora.report import StageReport

STAGE = "quantize"
EXTERNAL_DATA_ABOVE = 1_800_000_000   # protobuf's 2 GB limit, with room for the graph itself


# ------------------------------------------------------------------------------------------ graph prep
def _constant_weight_matmuls(graph) -> list:
    """MatMul nodes whose second input is a constant 2-D initializer (not an overridable graph input)."""
    inputs = {v.name for v in graph.inputs}
    out = []
    for node in graph:
        if node.op_type != "MatMul" or len(node.inputs) < 2 or node.inputs[1] is None:
            continue
        w = node.inputs[1]
        if w.name in inputs or w.const_value is None or len(w.shape or ()) != 2 or 0 in tuple(w.shape):
            continue
        out.append(node)
    return out


def prepare_graph(model, untie_head: bool) -> list:
    """The graph passes before quantizing (edge_lora.passes.untie_head): untie the LM head (unless it stays fp32),
    name unnamed MatMuls (the quantizers select nodes by name). Returns their PassResults."""
    from edge_lora import passes
    from edge_lora.passes.untie_head import NameMatMuls, UntieHead

    return passes.run(model, *([UntieHead()] if untie_head else []), NameMatMuls())


def head_nodes(graph) -> list[str]:
    """The LM head: the MatMul that produces a graph output (``logits``)."""
    outputs = {v.name for v in graph.outputs}
    return [n.name for n in _constant_weight_matmuls(graph) if n.outputs[0].name in outputs or "lm_head" in n.name]


def plan_bits(graph, config: QuantizeConfig) -> dict[str, int]:
    """Bits per constant-weight MatMul (32 = left in fp32)."""
    heads = set(head_nodes(graph))
    head_bits = {"fp32": 32, "int8": 8, "int4": 4}[config.lm_head]
    plan = {}
    for node in _constant_weight_matmuls(graph):
        if node.name in heads:
            plan[node.name] = head_bits
        elif config.base == "int8":
            plan[node.name] = 8
        else:
            names = (node.name, node.inputs[1].name or "")
            keep = any(part in n for part in config.int8_modules for n in names)
            plan[node.name] = 8 if keep else 4
    return plan


# ------------------------------------------------------------------------------------------ quantizers
def _quiet_quantizer() -> None:
    # The quantizer logs one INFO line per node (thousands), and warns that raising the opset to 21 for int4
    # "may not be a valid model": the validation stage checks the result on ONNX Runtime instead.
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.ERROR)


def _nbits(proto, bits: int, include: list[str], config: QuantizeConfig, block_size: int):
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 MatMulNBitsQuantizer)

    _quiet_quantizer()
    level = config.accuracy_level or None
    hqq = config.method == "hqq" and bits == 4
    if hqq:
        from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig

        algo = HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits)
    else:
        algo = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=config.symmetric,
                                            accuracy_level=level, bits=bits)
    # nodes_to_include is not honoured by the default algorithm in onnxruntime 1.2x: exclude the rest instead,
    # every other MatMul included: the quantizer would take a LoRA input's rank-0 default for a weight.
    wanted = set(include)
    exclude = [n.name for n in proto.graph.node if n.op_type == "MatMul" and n.name not in wanted]
    q = MatMulNBitsQuantizer(proto, bits=bits, block_size=block_size, is_symmetric=config.symmetric,
                             accuracy_level=level, nodes_to_exclude=exclude, algo_config=algo)
    q.process()
    proto = q.model.model
    if hqq and level:   # HQQ's nodes carry no accuracy_level: fp32 compute, measured 5x slower at decode
        import onnx

        for node in proto.graph.node:
            if node.op_type == "MatMulNBits" and not any(a.name == "accuracy_level" for a in node.attribute):
                node.attribute.append(onnx.helper.make_attribute("accuracy_level", level))
    return proto


def _gather_int4(proto, config: QuantizeConfig):
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 MatMulNBitsQuantizer)

    _quiet_quantizer()
    axes = (("Gather", 1),)   # blocks along the hidden dimension of each embedding row
    algo = DefaultWeightOnlyQuantConfig(block_size=config.block_size, is_symmetric=config.symmetric, bits=4,
                                        op_types_to_quantize=("Gather",), quant_axes=axes)
    q = MatMulNBitsQuantizer(proto, bits=4, block_size=config.block_size, is_symmetric=config.symmetric,
                             algo_config=algo, op_types_to_quantize=("Gather",), quant_axes=axes)
    q.process()
    return q.model.model


def _dynamic(proto, include: list[str], workdir: Path):
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = workdir / ".quantize-in.onnx", workdir / ".quantize-out.onnx"
    wanted = set(include)
    exclude = [n.name for n in proto.graph.node if n.op_type == "MatMul" and n.name not in wanted]
    onnx.save(proto, str(src))
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING)   # quantize_dynamic logs one INFO line per activation on the root logger
    try:
        # MatMulConstBOnly: no activation × activation MatMuls (attention). The LoRA branches are excluded by
        # name: their rank-0 defaults are initializers, so ConstBOnly alone would take them for weights.
        quantize_dynamic(str(src), str(dst), per_channel=True, weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul"], nodes_to_exclude=exclude,
                         extra_options={"MatMulConstBOnly": True})
        return onnx.load(str(dst))
    finally:
        root.setLevel(level)
        for p in (src, dst):
            p.unlink(missing_ok=True)


def _save_atomic(proto, model_path: Path) -> None:
    """Replace model.onnx (and its external data) with the quantized model: temp file, fsync, rename."""
    import onnx

    folder = model_path.parent
    old_data = [p for p in folder.iterdir() if p.name.startswith(model_path.name) and p.name != model_path.name]
    tmp = folder / f".{model_path.name}.quantized.tmp"
    data_name = model_path.name + ".data"
    external = proto.ByteSize() > EXTERNAL_DATA_ABOVE
    if external:
        onnx.save(proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=data_name)
    else:
        onnx.save(proto, str(tmp))
    from edge_lora.files import fsync_and_replace

    if external:
        with open(folder / data_name, "rb") as f:
            os.fsync(f.fileno())
    for p in old_data:
        if not (external and p.name == data_name):
            p.unlink()
    fsync_and_replace(tmp, model_path)


# ------------------------------------------------------------------------------------------ stage
def quantize_base(model_path: str | os.PathLike, config: QuantizeConfig) -> tuple[dict, StageReport]:
    """Quantize ``model_path`` (an exported model.onnx) in place. Returns (summary, report)."""
    import onnx
    import onnx_ir as ir

    start = time.perf_counter()
    model_path = Path(model_path)
    if config.base == "none":
        return {}, StageReport(stage=STAGE, config=asdict(config), seconds=0.0,
                               skipped=["quantize.base = 'none': the base stays fp32"])
    if not model_path.is_file():
        raise ModelError(f"{model_path} does not exist; the quantize stage runs after the export stage.")
    before = sum(p.stat().st_size for p in model_path.parent.iterdir() if p.name.startswith(model_path.name))
    try:
        model = ir.load(model_path)
    except Exception as exc:
        raise ModelError(f"cannot read {model_path} as ONNX: {exc}") from exc
    prep = prepare_graph(model, untie_head=config.lm_head != "fp32")
    untied = next((list(r.details.untied) for r in prep if r.name == "untie_head"), [])
    plan = plan_bits(model.graph, config)
    heads = set(head_nodes(model.graph)) if config.lm_head_block_size else set()
    proto = ir.serde.serialize_model(model)
    del model
    by_bits = {b: [n for n, nb in plan.items() if nb == b] for b in (4, 8, 32)}
    if config.method == "dynamic":
        proto = _dynamic(proto, by_bits[8], model_path.parent)
    else:
        for bits in (4, 8):
            body = [n for n in by_bits[bits] if n not in heads]
            head = [n for n in by_bits[bits] if n in heads]
            if body:
                proto = _nbits(proto, bits, body, config, config.block_size)
            if head:
                proto = _nbits(proto, bits, head, config, config.lm_head_block_size)
    if config.embedding == "int4":
        proto = _gather_int4(proto, config)
    _save_atomic(proto, model_path)
    after = sum(p.stat().st_size for p in model_path.parent.iterdir() if p.name.startswith(model_path.name))
    ops = {}
    for node in onnx.load(str(model_path), load_external_data=False).graph.node:
        if node.op_type in ("MatMul", "MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul",
                            "GatherBlockQuantized"):
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
    summary = {"base": config.base, "method": config.method, "block_size": config.block_size,
               "symmetric": config.symmetric, "accuracy_level": config.accuracy_level,
               "lm_head": config.lm_head,
               "lm_head_block_size": config.lm_head_block_size or config.block_size, "embedding": config.embedding,
               "int4_matmuls": len(by_bits[4]), "int8_matmuls": len(by_bits[8]), "fp32_matmuls": len(by_bits[32]),
               "untied": untied, "bytes_before": before, "bytes_after": after, "ops_after": ops}
    report = StageReport(stage=STAGE, config=asdict(config), seconds=time.perf_counter() - start,
                         metrics={**summary, "size_ratio": before / after if after else None,
                                  "graph_passes": {r.name: asdict(r.details) for r in prep}})
    return summary, report


def quantized_meta(meta, summary: dict, model_path: Path):
    """``meta`` (an ExportMeta) updated with what :func:`quantize_base` did: ``base_quantization`` (the profiler
    and the OTA packer label numbers with it) and the quantized graph's opset."""
    from dataclasses import fields, replace

    from edge_lora.formats.export_meta import BaseQuantization
    from edge_lora.stages.export_onnx import model_opset

    record = BaseQuantization(**{f.name: summary[f.name] for f in fields(BaseQuantization)})
    return replace(meta, base_quantization=record, opset=model_opset(model_path))


def record_in_meta(folder: Path, summary: dict) -> None:
    """For a folder quantized outside the pipeline (tools/): read its edge_lora.json, record, write it back."""
    from edge_lora.formats.export_meta import ExportMeta

    meta = ExportMeta.read(folder)
    quantized_meta(meta, summary, Path(folder) / meta.model_file).write(folder)


@dataclass(frozen=True)
class ExportFolder:
    folder: Path               # an export folder (model.onnx is quantized in place)
    meta: object               # its ExportMeta (in memory: the pipeline writes it once)


def run(inp: ExportFolder, config: QuantizeConfig) -> tuple[object, StageReport]:
    """The stage entry (every stage module has one: ``run(input, config) -> (output, StageReport)``): the base's
    constant weights, quantized in place; returns the export's updated ExportMeta. The adapter's factors were
    quantized before the export (the one factor quantizer), so the adapter file is final already."""
    from edge_lora.stages.export_onnx import MODEL_FILE, export_folder_hash

    summary, report = quantize_base(inp.folder / MODEL_FILE, config)
    if not summary:
        return inp.meta, report
    if inp.meta is None:
        raise ModelError("the quantize stage runs after the export stage; list 'export' before 'quantize' in the "
                         "profile's [profile] stages.")
    report.output_hash = export_folder_hash(inp.folder)
    return quantized_meta(inp.meta, summary, inp.folder / MODEL_FILE), report
