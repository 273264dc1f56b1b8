"""edge_lora.json (edge_lora.formats.export_meta): exact bytes, round trip, every way a file can be bad (one error,
the same from every command), and no absolute path in a real export, its report or a package made from it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from edge_lora.errors import ExportMetaError
from edge_lora.formats.export_meta import (
    FILE,
    FORMAT_VERSION,
    AdapterQuantization,
    AdapterRanks,
    BaseQuantization,
    ExportMeta,
    FusedProjections,
    LoraChain,
    LoraGroup,
    export_folder_hash,
)

GOLDEN = ExportMeta(
    mode="hotswap", task="text-generation-with-past", inputs=("input_ids", "attention_mask"), outputs=("logits",),
    model_file="model.onnx", external_data=False, opset=17, base="../bases/llama", base_path="../bases/llama",
    base_sha256="b" * 64, adapter_source="../adapters/x", adapter_sha256="a" * 64,
    reference_adapter="../adapters/x-peft", profile="cpu-int4-hotswap",
    fused_projections=FusedProjections(fused=2, nodes_before=120, nodes_after=110),
    lora_inputs={"m.q_proj": ("lora.m.q_proj+k_proj.A", "lora.m.q_proj+k_proj.B"),
                 "m.k_proj": ("lora.m.q_proj+k_proj.A", "lora.m.q_proj+k_proj.B"),
                 "m.up_proj": ("lora.g.Vt", "lora.m.up_proj.G", "lora.g.U")},
    lora_groups=(LoraGroup("m.q_proj+k_proj", ("lora.m.q_proj+k_proj.A", "lora.m.q_proj+k_proj.B"),
                           ("m.q_proj", "m.k_proj"), 32, (32, 16)),),
    lora_chains=(LoraChain("m.up_proj", "g", "tucker2", ("lora.g.Vt", "lora.m.up_proj.G", "lora.g.U")),),
    lora_unreachable=("m.pooler",),
    adapter_file="adapter.onnx_adapter", adapter_parameters=5,
    adapter_ranks={"m.q_proj+k_proj": AdapterRanks((4, 2))},
    base_quantization=BaseQuantization(base="int4", method="weight_only", block_size=32, symmetric=True,
                                       accuracy_level=4, lm_head="int8", embedding="fp32", int4_matmuls=10,
                                       int8_matmuls=3, fp32_matmuls=0, untied=("embed_tokens.weight",),
                                       bytes_after=123456),
    adapter_quantization=AdapterQuantization(bits=None, mixed_avg_bits=2.5, group_size=64, symmetric=True),
)

# The exact bytes: key order, 2-space indentation, ASCII, a final newline. A change here is a format change:
# bump FORMAT_VERSION and say so in the module docstring.
GOLDEN_TEXT = """\
{
  "format_version": 2,
  "mode": "hotswap",
  "task": "text-generation-with-past",
  "inputs": [
    "input_ids",
    "attention_mask"
  ],
  "outputs": [
    "logits"
  ],
  "model_file": "model.onnx",
  "external_data": false,
  "opset": 17,
  "graph": "optimum",
  "base": "../bases/llama",
  "base_path": "../bases/llama",
  "base_sha256": "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
  "adapter_source": "../adapters/x",
  "adapter_sha256": "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
  "reference_adapter": "../adapters/x-peft",
  "profile": "cpu-int4-hotswap",
  "fused_projections": {
    "fused": 2,
    "nodes_before": 120,
    "nodes_after": 110
  },
  "lora_inputs": {
    "m.q_proj": [
      "lora.m.q_proj+k_proj.A",
      "lora.m.q_proj+k_proj.B"
    ],
    "m.k_proj": [
      "lora.m.q_proj+k_proj.A",
      "lora.m.q_proj+k_proj.B"
    ],
    "m.up_proj": [
      "lora.g.Vt",
      "lora.m.up_proj.G",
      "lora.g.U"
    ]
  },
  "lora_groups": [
    {
      "name": "m.q_proj+k_proj",
      "inputs": [
        "lora.m.q_proj+k_proj.A",
        "lora.m.q_proj+k_proj.B"
      ],
      "modules": [
        "m.q_proj",
        "m.k_proj"
      ],
      "d_in": 32,
      "d_out": [
        32,
        16
      ],
      "out_offsets": [
        0,
        32
      ]
    }
  ],
  "lora_chains": [
    {
      "module": "m.up_proj",
      "group": "g",
      "structure": "tucker2",
      "inputs": [
        "lora.g.Vt",
        "lora.m.up_proj.G",
        "lora.g.U"
      ]
    }
  ],
  "lora_unreachable": [
    "m.pooler"
  ],
  "adapter_file": "adapter.onnx_adapter",
  "merge_on_swap": null,
  "adapter_parameters": 5,
  "adapter_ranks": {
    "m.q_proj+k_proj": {
      "ranks": [
        4,
        2
      ],
      "rank_offsets": [
        0,
        4
      ]
    }
  },
  "base_quantization": {
    "base": "int4",
    "method": "weight_only",
    "block_size": 32,
    "symmetric": true,
    "accuracy_level": 4,
    "lm_head": "int8",
    "embedding": "fp32",
    "int4_matmuls": 10,
    "int8_matmuls": 3,
    "fp32_matmuls": 0,
    "untied": [
      "embed_tokens.weight"
    ],
    "bytes_after": 123456
  },
  "adapter_quantization": {
    "bits": null,
    "mixed_avg_bits": 2.5,
    "group_size": 64,
    "symmetric": true
  }
}
"""


def test_golden_bytes():
    assert FORMAT_VERSION == 2
    assert GOLDEN.dumps() == GOLDEN_TEXT


def test_round_trip_through_a_folder(tmp_path):
    written = GOLDEN.write(tmp_path)
    assert (tmp_path / FILE).read_bytes() == GOLDEN_TEXT.encode()
    assert [p.name for p in tmp_path.iterdir()] == [FILE]                       # no temp file left behind
    meta = ExportMeta.read(tmp_path)
    assert meta == GOLDEN == written and meta.dumps() == GOLDEN_TEXT
    assert ExportMeta.loads(GOLDEN_TEXT) == GOLDEN
    assert meta.path("adapter_source") == Path(os.path.normpath(tmp_path / "../adapters/x"))
    assert meta.path("adapter_file") == tmp_path / "adapter.onnx_adapter"
    assert meta.lora_groups[0].out_offsets == (0, 32) and meta.adapter_ranks["m.q_proj+k_proj"].rank_offsets == (0, 4)
    assert meta.adapter_quantization.label == "mixed:2.5"
    updated = replace(meta, opset=18, base_quantization=None)
    assert updated.opset == 18 and updated.folder == tmp_path and updated != meta
    with pytest.raises(ValueError, match="relative to the export folder"):   # absolute paths never get in
        replace(meta, adapter_source=str(tmp_path / "x"))
    with pytest.raises(ValueError, match="exactly one of bits and mixed_avg_bits"):
        AdapterQuantization(bits=4, mixed_avg_bits=2.5, group_size=64, symmetric=True)


def _golden_json() -> dict:
    return json.loads(GOLDEN_TEXT)


def _edit(**changes) -> str:
    data = _golden_json()
    data.update(changes)
    return json.dumps(data)


def _nested_unknown() -> str:
    data = _golden_json()
    data["lora_groups"][0]["bias"] = True
    return json.dumps(data)


def _bad_offsets() -> str:
    data = _golden_json()
    data["adapter_ranks"]["m.q_proj+k_proj"]["rank_offsets"] = [0, 3]
    return json.dumps(data)


# fault -> (file text or None for no file, words the message must hold)
BAD = {
    "missing": (None, ["has no edge_lora.json", "not an edge_lora export folder"]),
    "not-json": ("{\"format_version\": 2, \"mode\": ", ["is not valid JSON", "damaged"]),
    "not-an-object": ("[1, 2]", ["not a JSON object"]),
    "newer-version": (_edit(format_version=FORMAT_VERSION + 1), ["newer than this edge_lora reads", "upgrade"]),
    "older-version": (_edit(format_version=1), ["older edge_lora"]),
    "wrong-type": (_edit(opset="17"), ["opset must be an integer, not a string"]),
    "unknown-key": (_edit(precision="fp32"), ["unknown key(s) 'precision'"]),
    "unknown-nested-key": (_nested_unknown(), ["lora_groups[0] has unknown key(s) 'bias'"]),
    "absolute-path": (_edit(adapter_source="/home/me/adapter"), ["adapter_source is the absolute path"]),
    "inconsistent": (_bad_offsets(), ["rank_offsets is [0, 3], but its sizes give [0, 4]"]),
    "bad-mode": (_edit(mode="fused"), ["mode must be one of"]),
    "missing-key": (json.dumps({k: v for k, v in _golden_json().items() if k != "task"}), ["lacks required key(s) 'task'"]),
}


def _bad_folder(tmp_path, fault) -> Path:
    folder = tmp_path / f"export-{fault}"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"not read: the meta is checked first")
    text = BAD[fault][0]
    if text is not None:
        (folder / FILE).write_text(text)
    return folder


@pytest.mark.parametrize("fault", sorted(BAD))
def test_a_bad_file_is_one_clear_error(tmp_path, fault):
    folder = _bad_folder(tmp_path, fault)
    with pytest.raises(ExportMetaError) as info:
        ExportMeta.read(folder)
    message = str(info.value)
    assert str(folder) in message and "re-export" in message and info.value.exit_code == 2
    for words in BAD[fault][1]:
        assert words in message


@pytest.mark.parametrize("fault", sorted(BAD))
def test_every_command_gives_the_same_error(tmp_path, capsys, fault):
    """validate and profile (and the packager, and the device-side session) read edge_lora.json through one
    reader: the same message and exit code 2, never a traceback."""
    from edge_lora.cli import main
    from edge_lora.stages.package import hotswap_export_meta

    folder = _bad_folder(tmp_path, fault)
    messages = []
    for argv in (["validate", str(folder), "--quiet"], ["profile", str(folder), "--quiet"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "Traceback" not in err
        messages.append(err)
    assert messages[0] == messages[1] and messages[0].startswith("error: ")
    with pytest.raises(ExportMetaError) as info:
        ExportMeta.read(folder)
    assert messages[0] == f"error: {info.value}\n"
    if BAD[fault][0] is not None:   # a folder without edge_lora.json is a PEFT folder to the packager
        with pytest.raises(ExportMetaError, match="re-export"):
            hotswap_export_meta(folder)


def test_python_m_edge_lora_exits_2_without_a_traceback(tmp_path):
    folder = _bad_folder(tmp_path, "newer-version")
    errs = []
    for verb in ("validate", "profile"):
        proc = subprocess.run([sys.executable, "-m", "edge_lora", verb, str(folder), "--quiet"], capture_output=True,
                              text=True, timeout=300, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        errs.append(proc.stderr)
    assert errs[0] == errs[1] and "newer than this edge_lora reads" in errs[0]


# ------------------------------------------------------------------------------------------ a real export
def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _no_absolute_paths(where: str, text: str, roots: list[str]) -> None:
    for root in roots:
        assert root not in text, f"{where} names {root}"
    try:
        data = json.loads(text)
    except ValueError:
        return
    bad = [s for s in _strings(data) if os.path.isabs(s) or s.startswith("~")]
    assert not bad, f"{where} holds absolute paths {bad[:3]}"


def test_no_absolute_path_in_an_export_its_report_or_its_package(tmp_path):
    from conftest import ADAPTER_TABLE, make_peft_adapter

    from edge_lora.base import tiny_model
    from edge_lora.ota.container import Limits, read_container
    from edge_lora.ota.keys import keygen, load_private_key
    from edge_lora.pipeline import run_export
    from edge_lora.stages.export_onnx import model_opset
    from edge_lora.stages.package import build_package

    kind, kwargs = ADAPTER_TABLE["llama-all7"]
    make_peft_adapter(kind, kwargs, tmp_path / "adapter")
    tiny_model(kind).save_pretrained(tmp_path / "llama")
    out = tmp_path / "out"
    report = run_export(tmp_path / "llama", tmp_path / "adapter", "cpu-hotswap", out, show_progress=False)
    roots = sorted({str(tmp_path), str(tmp_path.resolve())})

    for name in (FILE, "report.json", "report.md"):
        _no_absolute_paths(name, (out / name).read_text(), roots)
    meta = ExportMeta.read(out)
    assert meta.path("adapter_source").resolve() == (tmp_path / "adapter").resolve()
    assert meta.path("base_path").resolve() == (tmp_path / "llama").resolve()
    assert meta.base == "../llama" and report["adapter_source"] == "../adapter"
    assert meta.opset == model_opset(out / "model.onnx") and meta.opset >= 13   # written, not only read
    assert meta.adapter_file == "adapter.onnx_adapter" and meta.path("adapter_file").is_file()

    keys = keygen(tmp_path / "keys")
    pkg = tmp_path / "x.elpkg"
    build_package(out, load_private_key(keys[0]), 1, tmp_path / "llama", pkg, adapter_id="x", level=3,
                  probes=("factors", "ort"))
    manifest_text = read_container(pkg, Limits()).manifest_bytes.decode()
    _no_absolute_paths("the signed manifest", manifest_text, roots)
    manifest = json.loads(manifest_text)
    assert manifest["requirements"]["onnx_opset"] == meta.opset
    # one identity of an export folder: the export stage's report, the hash function and the ort probe agree
    probe = next(p for p in manifest["probes"] if p["kind"] == "ort")
    export_stage = next(s for s in report["stages"] if s["stage"] == "export")
    assert probe["export"]["model_sha256"] == export_folder_hash(out) == export_stage["output_hash"]
    # a shipped profile is named by its place in the checkout, not by this machine's path to it
    assert report["profile"]["source"] == "export_profiles/cpu-hotswap.toml"

    # a compress folder's headers name the original adapter relative to the folder, and read back to it
    from edge_lora.adapter.load import load_adapter
    from edge_lora.cli import main
    from edge_lora.files import read_safetensors_header

    assert main(["compress", str(tmp_path / "adapter"), "--out", str(tmp_path / "c"), "--budget", "0.3",
                 "--bits", "4"]) == 0
    for name in ("compressed.safetensors", "quantized.safetensors"):
        header = json.loads(read_safetensors_header(tmp_path / "c" / name)[1]["edge_lora"])
        _no_absolute_paths(name, json.dumps(header), roots)
        assert header["source"] == "../adapter"
    _no_absolute_paths("the compress report", (tmp_path / "c" / "report.json").read_text(), roots)
    assert load_adapter(tmp_path / "c")[1] == (tmp_path / "adapter").resolve()

    # profile.json names the export folder, its adapter file and the runner's model relative to the report
    from edge_lora.stages.profile import ProfileConfig, folder_variants, run_profile
    from edge_lora.stages.profile_report import write_report

    fast = ProfileConfig(runs=1, warmup=0, decode_tokens=2, prompt_lengths=[8], isolate=False)
    write_report(tmp_path / "prof", run_profile(folder_variants(out, "ort_cpu", 1), fast))
    text = (tmp_path / "prof" / "profile.json").read_text()
    _no_absolute_paths("profile.json", text, roots)
    variants = json.loads(text)["variants"]
    assert [v["adapter"] for v in variants] == [None, "../out/adapter.onnx_adapter"]
    assert {v["path"] for v in variants} == {"../out"} and {v["info"]["model"] for v in variants} == {
        "../out/model.onnx"}


def test_the_one_safetensors_header_reader(tmp_path):
    """edge_lora.files reads the 8-byte length and the JSON header only; the packager and the OTA codec use it."""
    import numpy as np
    from safetensors.numpy import save_file

    from edge_lora.files import SafetensorsHeaderError, parse_safetensors_header, read_safetensors_header

    path = tmp_path / "t.safetensors"
    save_file({"a": np.zeros((2, 3), np.float32)}, str(path), metadata={"edge_lora": "x"})
    header, metadata = read_safetensors_header(path)
    assert header["a"]["shape"] == [2, 3] and header["a"]["dtype"] == "F32" and metadata == {"edge_lora": "x"}
    assert parse_safetensors_header(path.read_bytes())[1:] == (header, metadata)
    (tmp_path / "bad").write_bytes((1 << 40).to_bytes(8, "little") + b"{}")
    with pytest.raises(SafetensorsHeaderError, match="header"):
        read_safetensors_header(tmp_path / "bad")


def test_every_field_has_a_parser():
    """A field added to ExportMeta without a parser would be written but refused on read."""
    from dataclasses import fields

    from edge_lora.formats.export_meta import _PARSERS, ExportMeta

    assert set(_PARSERS) == {f.name for f in fields(ExportMeta)} - {"folder"}
