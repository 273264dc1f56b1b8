"""Golden bytes of quantized.safetensors, the hot-swap adapter file, compressed.safetensors and the OTA container
(edge_lora.json's are in test_formats_golden.py): a refactor cannot change a documented layout while round trips
still pass. A deliberate format change updates these literals together with the format's version and docs."""

from __future__ import annotations

import hashlib
import json

import numpy as np

from edge_lora.formats import ort_adapter
from edge_lora.formats.quantized_factors import (
    ModuleCodes,
    QuantizedFactors,
    QuantizedRows,
    read_file,
    to_bytes,
    write_file,
)


def rows(bits, d, g, seed) -> QuantizedRows:
    rng = np.random.default_rng(seed)
    codes = [rng.integers(0, (1 << b) - 1, d).astype(np.uint8) if b else np.zeros(0, np.uint8) for b in bits]
    scales = np.zeros((len(bits), -(-d // g)), np.float16)
    for i, b in enumerate(bits):
        if b:
            scales[i] = np.float16(0.01 * (i + 1))
    return QuantizedRows(bits=np.array(bits, np.uint8), codes=codes, scales=scales, zeros=None, d=d, group_size=g)


def golden() -> QuantizedFactors:
    """Two modules: widths 8/3/0 (a dropped component) and 2/4, d not a multiple of the group size 8, one bias."""
    return QuantizedFactors(
        modules={"m.q_proj": ModuleCodes("m.q_proj", "linear", rows([8, 3, 0], 12, 8, 1), rows([8, 3, 0], 10, 8, 2)),
                 "m.up_proj": ModuleCodes("m.up_proj", "linear", rows([2, 4], 9, 8, 3), rows([2, 4], 12, 8, 4),
                                          np.arange(9, dtype=np.float32) / 8)},
        settings={"bits": None, "mixed_avg_bits": 3.0, "group_size": 8, "symmetric": True}, original_params=100,
        peft_config={"peft_type": "LORA", "r": 3}, source="../adapter")


HEADER = ('{"format":"edge_lora.quantized_factors/2","config":{"bits":null,"mixed_avg_bits":3.0,"group_size":8,'
          '"symmetric":true},"original_params":100,"modules":[{"name":"m.q_proj","kind":"linear","d_out":12,'
          '"d_in":10,"rank":3,"has_bias":false},{"name":"m.up_proj","kind":"linear","d_out":9,"d_in":12,"rank":2,'
          '"has_bias":true}],"peft_config":{"peft_type":"LORA","r":3},"source":"../adapter"}')
TENSORS = {
    "bits": "08030008030002040204",   # per module: Bᵀ's row widths, then A's
    "codes": "7882c0f20824d1f13f4fdd6b69c4016e07d5421b4c69cf73175599ad632c21026800419637a20b6a2a45c928da83d570",
    "scales": "1f211f211f251f251f211f211f251f251f211f211f251f251f211f211f251f25",   # fp16, per live row
    "bias": "000000300034003600380039003a003b003c",
}
FILE_SHA256 = "1e49fc2136f24e48c0fda4f8757e2293e4ed720070f47191349e9228680997f0"


def test_quantized_safetensors_bytes():
    q = golden()
    assert json.dumps(q.header(), separators=(",", ":")) == HEADER
    assert {k: v.tobytes().hex() for k, v in q.arrays().items()} == TENSORS
    data = to_bytes(q)
    assert len(data) == 828 and hashlib.sha256(data).hexdigest() == FILE_SHA256


def test_golden_bytes_decode_to_the_same_codes(tmp_path):
    q = golden()
    back = read_file(write_file(q, tmp_path / "quantized.safetensors"))
    assert back.header() == q.header()
    for name, m in q.modules.items():
        for got, want in zip(back.modules[name].factors(), m.factors()):
            np.testing.assert_array_equal(got, want)
    # a dropped component stores no codes or scales: q_proj keeps 2 of its 3 components
    assert back.modules["m.q_proj"].factors()[0].shape == (12, 2)


def test_adapter_file_parameters():
    """The quantized hot-swap adapter file: exactly these parameter names, dtypes and shapes, and the header as
    sorted-key JSON bytes (ORT's adapter format has no metadata field)."""
    params = ort_adapter.quantized_parameters(golden())
    assert {k: (str(v.dtype), v.shape) for k, v in params.items()} == {
        "edge_lora.quantized.bits": ("uint8", (10,)), "edge_lora.quantized.codes": ("uint8", (48,)),
        "edge_lora.quantized.scales": ("float16", (16,)), "edge_lora.quantized.bias": ("float16", (9,)),
        "edge_lora.quantized.header": ("uint8", (380,))}
    header = bytes(params["edge_lora.quantized.header"]).decode()
    assert header == json.dumps(json.loads(HEADER), separators=(",", ":"), sort_keys=True)
    assert {k.removeprefix("edge_lora.quantized."): v.tobytes().hex() for k, v in params.items()
            if not k.endswith(".header")} == TENSORS


def test_float_adapter_file_names_are_the_graph_names():
    """A float adapter file's parameters are named exactly as the hot-swap graph's inputs: lora.<module>.A/B for
    one module, lora.<parent>.<m1>+<m2>….A/B for a fused group (block-diagonal B)."""
    from edge_lora.formats.export_meta import LoraGroup
    from edge_lora.passes.fuse import lora_group_name, lora_input_names

    mods = ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj")
    name = lora_group_name(mods)
    assert name == "model.layers.0.mlp.gate_proj+up_proj"
    assert lora_input_names(name) == ("lora.model.layers.0.mlp.gate_proj+up_proj.A",
                                      "lora.model.layers.0.mlp.gate_proj+up_proj.B")
    group = LoraGroup(name, lora_input_names(name), mods, 4, (3, 2))
    B1, A1 = np.ones((3, 1)), np.full((1, 4), 2.0)
    B2, A2 = np.full((2, 2), 3.0), np.ones((2, 4))
    arrays = ort_adapter.graph_arrays({mods[0]: (B1, A1), mods[1]: (B2, A2)}, [group])
    a, b = arrays[group.inputs[0]], arrays[group.inputs[1]]
    np.testing.assert_array_equal(a, np.hstack([A1.T, A2.T]))          # d_in × Σr
    np.testing.assert_array_equal(b, [[1, 1, 1, 0, 0], [0, 0, 0, 3, 3], [0, 0, 0, 3, 3]])   # Σr × Σd_out


# ---------------------------------------------------------------------------------------------- compressed
def golden_compressed():
    import torch

    from edge_lora.adapter.compressed import CompressedAdapter, CompressedGroup

    def t(*shape, k=1.0):
        return torch.arange(int(np.prod(shape)), dtype=torch.float32).reshape(*shape) * 0.125 * k

    svd = CompressedGroup(name="model.layers.*.self_attn.q_proj", structure="svd",
                          modules=["model.layers.0.self_attn.q_proj"],
                          per_module={"model.layers.0.self_attn.q_proj": {"B": t(4, 2), "A": t(2, 3)}},
                          ranks={"d_out": 4, "d_in": 3, "k": [2]})
    shared = CompressedGroup(name="model.layers.*.mlp.up_proj", structure="shared-out",
                             modules=["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"],
                             shared={"U": t(4, 2, k=-1)},
                             per_module={"model.layers.0.mlp.up_proj": {"G": t(2, 1), "A": t(1, 3)},
                                         "model.layers.1.mlp.up_proj": {"G": t(2, 1, k=2), "A": t(1, 3, k=3)}},
                             ranks={"d_out": 4, "d_in": 3, "r_u": 2, "k": [1, 1]})
    kinds = {m: "linear" for g in (svd, shared) for m in g.modules}
    return CompressedAdapter(groups=[svd, shared], kinds=kinds, peft_config={"peft_type": "LORA", "r": 2},
                             source=None, storage_dtype="float16")


COMPRESSED_HEADER = (
    '{"format": "edge_lora.compressed", "version": 1, "storage_dtype": "float16", "source": null, "peft_config": '
    '{"peft_type": "LORA", "r": 2}, "groups": [{"name": "model.layers.*.self_attn.q_proj", "structure": "svd", '
    '"modules": ["model.layers.0.self_attn.q_proj"], "ranks": {"d_out": 4, "d_in": 3, "k": [2]}, "shared": []}, '
    '{"name": "model.layers.*.mlp.up_proj", "structure": "shared-out", "modules": ["model.layers.0.mlp.up_proj", '
    '"model.layers.1.mlp.up_proj"], "ranks": {"d_out": 4, "d_in": 3, "r_u": 2, "k": [1, 1]}, "shared": ["U"]}], '
    '"modules": {"model.layers.0.self_attn.q_proj": {"group": 0, "kind": "linear", "bias": false}, '
    '"model.layers.0.mlp.up_proj": {"group": 1, "kind": "linear", "bias": false}, "model.layers.1.mlp.up_proj": '
    '{"group": 1, "kind": "linear", "bias": false}}, "extra_tensors": []}')


def test_compressed_safetensors_bytes(tmp_path):
    """A shared-out group's U is ONE tensor (group1.U) for both layers; per-module parts are named by module."""
    from safetensors import safe_open

    path = golden_compressed().save(tmp_path / "c")
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["edge_lora"] == COMPRESSED_HEADER
        assert sorted(f.keys()) == ["group1.U", "module.model.layers.0.mlp.up_proj.A",
                                    "module.model.layers.0.mlp.up_proj.G", "module.model.layers.0.self_attn.q_proj.A",
                                    "module.model.layers.0.self_attn.q_proj.B", "module.model.layers.1.mlp.up_proj.A",
                                    "module.model.layers.1.mlp.up_proj.G"]
    data = path.read_bytes()
    assert len(data) == 1640
    assert hashlib.sha256(data).hexdigest() == "66f0d6055a640afc832466cae283b65a67863315c5b0c7b78701c4b8af7b1a14"


# ---------------------------------------------------------------------------------------------- OTA container
OTA_MANIFEST = {"format": "edge_lora.ota", "adapter_id": "demo", "version": 3,
                "files": [{"name": "adapter.onnx_adapter", "size": 5}]}
OTA_BYTES = (
    "89454c504b470d0a000156475aa75463474c0000006d7b22616461707465725f6964223a2264656d6f222c2266696c6573223a5b7b"
    "226e616d65223a22616461707465722e6f6e6e785f61646170746572222c2273697a65223a357d5d2c22666f726d6174223a2265"
    "6467655f6c6f72612e6f7461222c2276657273696f6e223a337db353f68041fd3e3f93c6624feb18e5c49af8615dadc1a630bd5ec6"
    "e44b0a86a21de29819f976b904d2f989c34eb8fcc902abe44f7e391cff384f137c51cd930000000001000014616461707465722e6f"
    "6e6e785f61646170746572000000000000000528b52ffd00")


def test_ota_container_bytes():
    """magic, version 1, key id hint, manifest length + canonical JSON, Ed25519 signature (deterministic for a
    fixed key), entry count, then per entry: type, name length, name, data length, data (docs/ota.md)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from edge_lora.ota.container import DEFAULT_LIMITS, pack_container, read_container
    from edge_lora.ota.keys import key_id
    from edge_lora.ota.manifest import canonical_json

    key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    manifest = canonical_json(OTA_MANIFEST)
    data = pack_container(manifest, key.sign(manifest), key_id(key.public_key()),
                          [("adapter.onnx_adapter", b"\x28\xb5\x2f\xfd\x00")])
    assert data.hex() == OTA_BYTES
    raw = read_container(bytes.fromhex(OTA_BYTES), DEFAULT_LIMITS)
    assert raw.key_id_hint == "56475aa75463474c" and raw.manifest_bytes == manifest
    assert [(e.name, e.data) for e in raw.entries] == [("adapter.onnx_adapter", b"\x28\xb5\x2f\xfd\x00")]
