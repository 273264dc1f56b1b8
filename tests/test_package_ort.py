"""OTA packages with an ONNX Runtime adapter (.onnx_adapter from the hot-swap export) and the `ort` probe:
round trip, probe mismatch, wrong export on the device, the CLI."""
# ruff: noqa: F811 (fixtures imported from package_fixtures are used as same-named arguments)

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from package_fixtures import ota_ort, resign, snapshot  # noqa: F401 (fixtures)

from edge_lora.cli import main
from edge_lora.ota import codec
from edge_lora.ota.errors import PackageError, ProbeError
from edge_lora.ota.install import install, read_state, rollback, verify_package
from edge_lora.ota.manifest import open_package, payload_digest
from edge_lora.runtimes.hotswap import HotswapSession
from edge_lora.runtimes.ort_session import full_feeds
from edge_lora.stages.export_onnx import ADAPTER_FILE, write_ort_adapter
from edge_lora.stages.package import build_package

IDS = np.array([[1, 5, 9, 33, 70, 2, 127, 64]])


def _ort_logits(export, adapter_file):
    s = HotswapSession(export, threads=1)
    s.load_adapter("a", adapter_file)
    return s.run(full_feeds(s.session, IDS), adapter="a")[0]


@pytest.fixture(scope="module")
def pkg_x(ota_ort):
    """v1: the hot-swap export folder itself (only adapter.onnx_adapter travels, with an ort probe)."""
    out = ota_ort.dir / "x-v1.elpkg"
    rep = build_package(ota_ort.export, ota_ort.priv, 1, ota_ort.base, out, adapter_id="tiny-ort",
                        base_hash=ota_ort.base_hash, level=3)
    return out, rep


def _root(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    return root


def refused(root, pkg, pub, match, tmp_path, **kw):
    if isinstance(pkg, bytes):
        path = tmp_path / "bad.elpkg"
        path.write_bytes(pkg)
        pkg = path
    before = snapshot(root)
    with pytest.raises(ProbeError, match=match):
        install(pkg, pub, root, **kw)
    assert snapshot(root) == before, "the install root changed"


def test_round_trip_export_folder(ota_ort, pkg_x, tmp_path):
    out, rep = pkg_x
    assert rep["probes"] == ["ort"]
    m = open_package(out, ota_ort.pub).manifest
    assert [(f["name"], f["role"]) for f in m["payload"]["files"]] == [(ADAPTER_FILE, "ort-adapter")]
    assert "onnxruntime" in m["requirements"]["runtimes"] and "peft" not in m["requirements"]["runtimes"]
    probe = m["probes"][0]
    assert probe["kind"] == "ort" and probe["adapter"] == ADAPTER_FILE
    assert probe["export"]["base_sha256"] == ota_ort.base_hash and len(probe["export"]["model_sha256"]) == 64
    assert probe["adapter_effect_max_abs"] > 0 and len(probe["top1"]) == 16

    # verify: without the export nothing can check the adapter; with it the ort probe passes
    with pytest.raises(ProbeError, match="No probe could run"):
        verify_package(out, ota_ort.pub)
    rep = verify_package(out, ota_ort.pub, probe_export=ota_ort.export)
    assert [(p["kind"], p["status"]) for p in rep["probes"]] == [("ort", "passed")]

    root = _root(tmp_path)
    rep = install(out, ota_ort.pub, root, base=ota_ort.base_hash, export=ota_ort.export)
    assert [(p["kind"], p["status"]) for p in rep["probes"]] == [("ort", "passed")]
    vdir = root / "tiny-ort" / "versions" / "1"
    assert (vdir / ADAPTER_FILE).read_bytes() == (ota_ort.export / ADAPTER_FILE).read_bytes()
    installed = _ort_logits(ota_ort.export, vdir / ADAPTER_FILE)
    assert np.array_equal(installed, _ort_logits(ota_ort.export, ota_ort.export / ADAPTER_FILE))
    assert json.loads((root / "base.json").read_text())["export"] == str(ota_ort.export.resolve())

    # v2 from a PEFT folder + --export: factors, torch-logits and ort; the device uses the recorded export
    v2 = tmp_path / "y-v2.elpkg"
    rep2 = build_package(ota_ort.ay, ota_ort.priv, 2, ota_ort.base, v2, base_hash=ota_ort.base_hash, level=3,
                         export=ota_ort.export, probes=("factors", "ort"))
    assert rep2["probes"] == ["factors", "ort"]
    assert {f["name"] for f in open_package(v2, ota_ort.pub).manifest["payload"]["files"]} == {
        "adapter_config.json", "adapter_model.safetensors", ADAPTER_FILE}
    rep = install(v2, ota_ort.pub, root)
    assert {p["kind"]: p["status"] for p in rep["probes"]} == {"factors": "passed", "ort": "passed"}
    assert read_state(root, "tiny-ort")["version"] == 2
    assert not np.array_equal(_ort_logits(ota_ort.export, root / "tiny-ort" / "versions" / "2" / ADAPTER_FILE),
                              installed)
    # rollback runs the kept version's ort probe on the recorded export too
    rep = rollback(root, "tiny-ort")
    assert rep["version"] == 1 and {p["kind"]: p["status"] for p in rep["probes"]} == {"ort": "passed"}


def test_delta_of_an_ort_adapter(ota_ort, pkg_x, tmp_path):
    """v2 = the same export with another adapter.onnx_adapter, shipped as a delta against v1."""
    from edge_lora.adapter import load_peft

    export2 = tmp_path / "export-y"
    shutil.copytree(ota_ort.export, export2)
    meta = json.loads((export2 / "edge_lora.json").read_text())
    write_ort_adapter(load_peft(ota_ort.ay), export2 / ADAPTER_FILE, set(meta["lora_inputs"]))
    v2d = tmp_path / "v2-delta.elpkg"
    rep = build_package(export2, ota_ort.priv, 2, ota_ort.base, v2d, from_package=pkg_x[0], adapter_id="tiny-ort",
                        base_hash=ota_ort.base_hash, level=3)
    assert rep["kind"] == "delta" and rep["probes"] == ["ort"]
    root = _root(tmp_path)
    install(pkg_x[0], ota_ort.pub, root, base=ota_ort.base_hash, export=ota_ort.export)
    rep = install(v2d, ota_ort.pub, root)
    assert {p["kind"]: p["status"] for p in rep["probes"]} == {"ort": "passed"}
    assert (root / "tiny-ort" / "versions" / "2" / ADAPTER_FILE).read_bytes() == (export2 / ADAPTER_FILE).read_bytes()


def _swap_adapter(new_bytes):
    """Put other .onnx_adapter bytes in the package, with every hash updated (only the probe is left)."""
    stored = codec.zstd_compress(new_bytes, 3)

    def mm(m):
        f = m["payload"]["files"][0]
        f.update(size=len(new_bytes), sha256=codec.sha256(new_bytes))
        m["payload"].update(total_bytes=len(new_bytes), digest=payload_digest(m["payload"]["files"]))
        m["entries"][0].update(encoding="zstd", stored_size=len(stored), stored_sha256=codec.sha256(stored),
                               decoded_size=len(new_bytes))

    def me(entries):
        return [(n, stored, t) for n, _, t in entries]

    return mm, me


def test_probe_mismatch_other_adapter_is_refused(ota_ort, pkg_x, tmp_path):
    from edge_lora.adapter import load_peft

    y_file = tmp_path / "y.onnx_adapter"
    write_ort_adapter(load_peft(ota_ort.ay), y_file)
    mm, me = _swap_adapter(y_file.read_bytes())
    bad = resign(pkg_x[0].read_bytes(), ota_ort.priv, mm, me)
    root = _root(tmp_path)
    refused(root, bad, ota_ort.pub, "ort probe: position", tmp_path, base=ota_ort.base_hash, export=ota_ort.export)
    assert snapshot(root) == {}


def test_probe_mismatch_tampered_expectation_is_refused(ota_ort, pkg_x, tmp_path):
    root = _root(tmp_path)
    install(pkg_x[0], ota_ort.pub, root, base=ota_ort.base_hash, export=ota_ort.export)

    def mm(m):
        m["version"] = 2
        m["probes"][0]["expected"][3][0] += 0.05

    refused(root, resign(pkg_x[0].read_bytes(), ota_ort.priv, mm), ota_ort.pub, "ort probe: position 3", tmp_path)
    assert read_state(root, "tiny-ort")["version"] == 1


def test_wrong_export_is_refused(ota_ort, pkg_x, tmp_path):
    root = _root(tmp_path)
    refused(root, pkg_x[0], ota_ort.pub, "not the export the package was built for", tmp_path,
            base=ota_ort.base_hash, export=ota_ort.other_export)
    assert snapshot(root) == {}
    with pytest.raises(PackageError, match="not a hot-swap export"):  # --export names no export at all
        install(pkg_x[0], ota_ort.pub, root, base=ota_ort.base_hash, export=tmp_path)
    assert snapshot(root) == {}


def test_package_refuses_export_of_another_base(ota_ort, tmp_path):
    from edge_lora.errors import CompatibilityError

    meta = json.loads((ota_ort.export / "edge_lora.json").read_text())
    assert meta["base_sha256"] == ota_ort.base_hash
    with pytest.raises(CompatibilityError, match="export is of base"):
        build_package(ota_ort.export, ota_ort.priv, 1, ota_ort.base, tmp_path / "p.elpkg",
                      base_hash="0" * 64, adapter_id="tiny-ort")


def test_cli_package_verify_install(ota_ort, tmp_path):
    pkg, root = tmp_path / "cli.elpkg", _root(tmp_path)
    assert main(["package", str(ota_ort.export), "--key", str(ota_ort.priv_path), "--version", "1", "--base",
                 str(ota_ort.base), "--out", str(pkg), "--id", "tiny-ort", "--level", "3"]) == 0
    assert main(["verify", str(pkg), "--pubkey", str(ota_ort.pub_path), "--export", str(ota_ort.export)]) == 0
    assert main(["install", str(pkg), "--pubkey", str(ota_ort.pub_path), "--root", str(root), "--base",
                 str(ota_ort.base), "--export", str(ota_ort.export)]) == 0
    assert read_state(root, "tiny-ort")["version"] == 1


def test_peft_adapter_packaged_for_a_quantized_export_is_quantized(ota_ort, tmp_path):
    """An export whose adapter file is quantized (the one factor quantizer, quantize.adapter = "int8"/"int4")
    gets quantized adapters from the packager too, with the export's settings, and they load on the export's
    float graph close to the float adapter."""
    from dataclasses import replace

    from edge_lora.formats import ort_adapter
    from edge_lora.formats.export_meta import AdapterQuantization, ExportMeta
    from edge_lora.stages.package import _ort_adapter_from_peft

    meta = ExportMeta.read(ota_ort.export)
    files = {}
    for kind, bits in (("fp32", None), ("int8", 8), ("int4", 4)):
        meta = replace(meta, adapter_quantization=None if bits is None else AdapterQuantization(
            bits=bits, mixed_avg_bits=None, group_size=16, symmetric=True))
        files[kind] = tmp_path / f"{kind}.onnx_adapter"
        files[kind].write_bytes(_ort_adapter_from_peft(ota_ort.ay, meta))
    assert [ort_adapter.read(files[k]).is_quantized for k in ("fp32", "int8", "int4")] == [False, True, True]
    assert files["int4"].stat().st_size < files["int8"].stat().st_size < files["fp32"].stat().st_size / 2
    s = HotswapSession(ota_ort.export, threads=1)
    feeds = full_feeds(s.session, IDS)
    for kind, path in files.items():
        s.load_adapter(kind, path)
    base, ref, q8 = s.run(feeds)[0], s.run(feeds, adapter="fp32")[0], s.run(feeds, adapter="int8")[0]
    # random tiny factors: int8 keeps the adapter's effect to a few percent (int4 is scored on SmolLM2)
    assert np.linalg.norm(q8 - ref) / np.linalg.norm(ref - base) < 0.05
