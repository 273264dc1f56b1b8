"""OTA packages: round trip, deltas, rollback, CLI. Bad inputs: test_package_bad_inputs.py; fuzzing:
test_package_fuzz.py; kill test: test_package_kill.py (slow)."""
# ruff: noqa: F811 (fixtures imported from package_fixtures are used as same-named arguments)

from __future__ import annotations

import json
import os
import random
import shutil
import stat

import pytest
import torch
from package_fixtures import make_adapter, ota, root_v1, snapshot  # noqa: F401 (fixtures)

from edge_lora.cli import main
from edge_lora.errors import CompatibilityError, PackageError
from edge_lora.ota import DeltaError, VersionError
from edge_lora.ota.container import Limits, read_container
from edge_lora.ota.install import (
    check_installed,
    install,
    list_installed,
    read_state,
    rollback,
    verify_package,
)
from edge_lora.ota.manifest import open_package
from edge_lora.stages.package import build_package


def _logits(adapter_dir, base_seed=0):
    from peft import PeftModel

    from edge_lora.base import tiny_model

    model = PeftModel.from_pretrained(tiny_model("llama", seed=base_seed), str(adapter_dir)).eval()
    ids = torch.tensor([[1, 5, 9, 33, 70, 2, 127, 64]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def _payload(vdir):
    return {p.name: p.read_bytes() for p in sorted(vdir.iterdir()) if not p.name.startswith("manifest")}


def test_round_trip_full_package(ota, tmp_path):
    # package -> verify -> install (runs both probes on the device) -> same outputs as the source adapter
    assert ota.rep_v1["probes"] == ["factors", "torch-logits"]
    rep = verify_package(ota.v1, ota.pub)
    assert rep["signature"] == "ok" and [p["status"] for p in rep["probes"]] == ["passed", "skipped"]
    root = tmp_path / "root"
    root.mkdir()
    rep = install(ota.v1, ota.pub, root, base=ota.base)
    assert {p["kind"]: p["status"] for p in rep["probes"]} == {"factors": "passed", "torch-logits": "passed"}
    vdir = root / "tiny-ota" / "versions" / "1"
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (vdir / name).read_bytes() == (ota.a1 / name).read_bytes()
    assert torch.equal(_logits(vdir), _logits(ota.a1))
    assert not torch.equal(_logits(vdir), _logits(ota.a2))
    assert read_state(root, "tiny-ota") == {"format": 1, "adapter_id": "tiny-ota", "version": 1, "previous": None,
                                            "highest": 1}
    assert json.loads((root / "base.json").read_text())["content_hash"] == ota.base_hash
    assert check_installed(root, "tiny-ota") == 1


def test_manifest_contents(ota):
    m = open_package(ota.v1, ota.pub).manifest
    assert m["format_version"] == 1 and m["version"] == 1 and m["adapter_id"] == "tiny-ota"
    assert m["base"]["content_hash"] == ota.base_hash and m["base"]["architecture"] == "LlamaForCausalLM"
    assert {f["name"]: f["role"] for f in m["payload"]["files"]} == {
        "adapter_config.json": "peft-config", "adapter_model.safetensors": "peft-weights"}
    for f in m["payload"]["files"]:
        assert f["size"] == (ota.a1 / f["name"]).stat().st_size and len(f["sha256"]) == 64
    assert m["requirements"]["runtimes"]["peft"]
    assert m["compression"]["codec"] == "zstd" and m["compression"]["payload_bytes"] > 0
    assert m["validation"]["packager_checks"]["finite"] is True
    assert m["validation"]["packager_checks"]["base_shapes"] == "ok"
    tl = next(p for p in m["probes"] if p["kind"] == "torch-logits")
    assert len(tl["input_ids"][0]) == 16 and len(tl["top1"]) == 16 and len(tl["top1_sha256"]) == 64
    assert tl["adapter_effect_max_abs"] > 0
    fac = next(p for p in m["probes"] if p["kind"] == "factors")
    assert len(fac["modules"]) == 14 and all(len(x["expected"]) == 8 for x in fac["modules"])


def test_delta_equals_full_install(ota, root_v1, tmp_path):
    d = open_package(ota.v2d, ota.pub).manifest
    full = open_package(ota.v2, ota.pub).manifest
    assert d["payload"] == full["payload"] and d["delta"]["from_version"] == 1
    assert d["delta"]["unchanged"] == ["adapter_config.json"]
    measured = d["delta"]["measured"]["adapter_model.safetensors"]
    assert set(measured) == {"zstd", "zstd-patch", "copy-ops"}
    assert d["entries"][0]["stored_size"] == min(measured.values()) < measured["zstd"]
    assert ota.v2d.stat().st_size < ota.v2.stat().st_size
    # delta over v1 ...
    rep = install(ota.v2d, ota.pub, root_v1)
    assert rep["previous"] == 1
    # ... equals a full v2 install, bit for bit
    other = tmp_path / "other"
    other.mkdir()
    install(ota.v2, ota.pub, other, base=ota.base_hash)
    a, b = root_v1 / "tiny-ota" / "versions" / "2", other / "tiny-ota" / "versions" / "2"
    assert _payload(a) == _payload(b) == {n: (ota.a2 / n).read_bytes() for n in _payload(b)}
    assert torch.equal(_logits(a), _logits(ota.a2))
    assert read_state(root_v1, "tiny-ota")["previous"] == 1
    assert (root_v1 / "tiny-ota" / "versions" / "1").is_dir()  # kept to fall back to


def test_copy_ops_delta_applies(ota, root_v1, tmp_path):
    # force the per-tensor delta (copy-ops) path, which the size race may not pick for tiny files
    from edge_lora.ota import codec

    old = (ota.a1 / "adapter_model.safetensors").read_bytes()
    new = (ota.a2 / "adapter_model.safetensors").read_bytes()
    blob = codec.plan_tensor_delta(old, new)
    assert codec.apply_copy_ops(blob, old, len(new), "t", Limits()) == new
    n_ops = int.from_bytes(blob[16:20], "big")
    assert 2 <= n_ops <= 16  # header literal, copied layer-0 run, literal layer-1 run (merged)
    a3 = make_adapter(tmp_path / "tiny-ota", change_layer=0, change_seed=5)
    orig = codec.zstd_patch_compress
    codec.zstd_patch_compress = lambda data, old, level=19: b"\0" * (len(data) * 2)  # never the smallest
    try:
        build_package(a3, ota.priv, 2, ota.base, tmp_path / "d.elpkg", from_package=ota.v1,
                      base_hash=ota.base_hash, level=3, probes=("factors",))
    finally:
        codec.zstd_patch_compress = orig
    m = open_package(tmp_path / "d.elpkg", ota.pub).manifest
    assert m["entries"][0]["encoding"] == "copy-ops"
    install(tmp_path / "d.elpkg", ota.pub, root_v1)
    assert _payload(root_v1 / "tiny-ota" / "versions" / "2")["adapter_model.safetensors"] == \
        (a3 / "adapter_model.safetensors").read_bytes()


def test_rollback_is_explicit_and_keeps_highest(ota, root_v1):
    install(ota.v2, ota.pub, root_v1)
    rep = rollback(root_v1, "tiny-ota", public_key=ota.pub)
    assert rep["version"] == 1 and read_state(root_v1, "tiny-ota")["highest"] == 2
    with pytest.raises(VersionError, match="highest version ever installed"):
        install(ota.v2, ota.pub, root_v1)
    with pytest.raises(DeltaError, match="delta from version 2"):
        install(ota.v3d, ota.pub, root_v1)
    install(ota.v3, ota.pub, root_v1)
    rows = list_installed(root_v1)
    assert rows == [{"adapter_id": "tiny-ota", "version": 3, "previous": 1, "highest": 3, "kept": [1, 3],
                     "status": "ok"}]


def test_verify_with_root_rebuilds_delta(ota, root_v1):
    before = snapshot(root_v1)
    assert "not decoded" in verify_package(ota.v2d, ota.pub)["payload"]
    rep = verify_package(ota.v2d, ota.pub, root=root_v1)
    assert rep["payload"].endswith("sha256 ok") and rep["probes"][0]["status"] == "passed"
    assert snapshot(root_v1) == before


def test_damaged_install_is_reported(ota, root_v1):
    f = root_v1 / "tiny-ota" / "versions" / "1" / "adapter_model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    assert list_installed(root_v1)[0]["status"].startswith("damaged")
    with pytest.raises(PackageError, match="no longer matches its sha256"):
        install(ota.v2d, ota.pub, root_v1)


def test_packager_refuses_bad_adapters(ota, tmp_path):
    from safetensors.numpy import load_file, save_file

    bad = make_adapter(tmp_path / "nan")
    t = load_file(bad / "adapter_model.safetensors")
    next(iter(t.values()))[0] = float("nan")
    save_file(t, bad / "adapter_model.safetensors")
    with pytest.raises(PackageError, match="NaN or Inf"):
        build_package(bad, ota.priv, 1, ota.base, tmp_path / "x", base_hash=ota.base_hash, probes=("factors",))
    from edge_lora.base import tiny_model

    bert = tmp_path / "bert"
    tiny_model("bert").save_pretrained(str(bert))
    with pytest.raises(CompatibilityError, match="has no weight in the base model"):
        build_package(ota.a1, ota.priv, 1, bert, tmp_path / "x", probes=("factors",))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PackageError, match="holds no adapter"):
        build_package(tmp_path / "empty", ota.priv, 1, ota.base, tmp_path / "x", base_hash=ota.base_hash)
    with pytest.raises(PackageError, match="is itself a delta"):
        build_package(ota.a2, ota.priv, 3, ota.base, tmp_path / "x", from_package=ota.v2d, base_hash=ota.base_hash)
    assert not (tmp_path / "x").exists()


def test_install_needs_a_known_base(ota, tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    with pytest.raises(PackageError, match="No base model is known"):
        install(ota.v1, ota.pub, root)
    assert snapshot(root) == {}


def test_keys(tmp_path):
    from edge_lora.ota.keys import keygen, load_private_key

    priv, _ = keygen(tmp_path / "k")
    assert stat.S_IMODE(os.stat(priv).st_mode) == 0o600
    with pytest.raises(PackageError, match="already exists"):
        keygen(tmp_path / "k")
    os.chmod(priv, 0o644)
    with pytest.raises(PackageError, match="chmod 600"):
        load_private_key(priv)
    with pytest.raises(PackageError, match="Ed25519 public key"):
        from edge_lora.ota.keys import load_public_key

        load_public_key(priv)


def test_cli_end_to_end(ota, tmp_path, capsys):
    keys, root = tmp_path / "keys", tmp_path / "root"
    root.mkdir()
    assert main(["keygen", "--out", str(keys)]) == 0
    key, pub = keys / "ota_ed25519.key", keys / "ota_ed25519.pub"
    p1, p2 = tmp_path / "v1.elpkg", tmp_path / "v2.elpkg"
    assert main(["package", str(ota.a1), "--key", str(key), "--version", "1", "--base", str(ota.base),
                 "--out", str(p1), "--probe", "factors", "--level", "3"]) == 0
    assert main(["package", str(ota.a2), "--key", str(key), "--version", "2", "--base", str(ota.base),
                 "--out", str(p2), "--from", str(p1), "--probe", "factors", "--level", "3", "--json"]) == 0
    assert main(["verify", str(p1), "--pubkey", str(pub)]) == 0
    assert main(["install", str(p1), "--pubkey", str(pub), "--root", str(root), "--base", str(ota.base)]) == 0
    assert main(["install", str(p2), "--pubkey", str(pub), "--root", str(root)]) == 0
    capsys.readouterr()
    assert main(["list", "--root", str(root)]) == 0
    assert "current 2, previous 1" in capsys.readouterr().out
    assert main(["rollback", "--root", str(root), "--id", "tiny-ota", "--pubkey", str(pub)]) == 0
    assert read_state(root, "tiny-ota")["version"] == 1
    # errors become a message and a non-zero exit
    assert main(["install", str(p1), "--pubkey", str(ota.pub_path), "--root", str(root)]) != 0
    assert "not signed by the trusted key" in capsys.readouterr().err
    assert main(["verify", str(p2), "--pubkey", str(pub), "--max-mb", "0.001"]) != 0
    assert "limit" in capsys.readouterr().err


def test_container_framing_roundtrip(ota):
    raw = read_container(ota.v1, Limits())
    assert [e.name for e in raw.entries] == ["adapter_config.json", "adapter_model.safetensors"]
    assert len(raw.signature) == 64


def test_export_folder_with_ort_adapter(ota, tmp_path):
    # payload files are generic: an .onnx_adapter travels next to the PEFT files, with byte deltas
    ort1 = random.Random(0).randbytes(30000)
    ort2 = ort1[:100] + b"changed" + ort1[107:]
    src1, src2 = tmp_path / "e1" / "tiny-ota", tmp_path / "e2" / "tiny-ota"
    for src, blob in ((src1, ort1), (src2, ort2)):
        shutil.copytree(ota.a1, src)
        (src / "model.onnx_adapter").write_bytes(blob)
        (src / "export.json").write_text(json.dumps({"opset": 17}))
    kw = {"key": ota.priv, "base": ota.base, "base_hash": ota.base_hash, "level": 3, "probes": ("factors",)}
    build_package(src1, version=1, out=tmp_path / "e1.elpkg", **kw)
    rep = build_package(src2, version=2, out=tmp_path / "e2.elpkg", from_package=tmp_path / "e1.elpkg", **kw)
    assert rep["entries"] == {"model.onnx_adapter": "zstd-patch"}
    assert sorted(rep["unchanged"]) == ["adapter_config.json", "adapter_model.safetensors"]
    m = open_package(tmp_path / "e1.elpkg", ota.pub).manifest
    assert {f["name"]: f["role"] for f in m["payload"]["files"]}["model.onnx_adapter"] == "ort-adapter"
    assert m["requirements"]["onnx_opset"] == 17 and "onnxruntime" in m["requirements"]["runtimes"]
    root = tmp_path / "root"
    root.mkdir()
    install(tmp_path / "e1.elpkg", ota.pub, root, base=ota.base_hash)
    install(tmp_path / "e2.elpkg", ota.pub, root)
    assert (root / "tiny-ota" / "versions" / "2" / "model.onnx_adapter").read_bytes() == \
        ort2


def test_rollback_and_list_respect_the_base_binding(ota, root_v1):
    """After the device's base changes, a version built for the old base is never made current by rollback,
    and list says when the current one is built for another base."""
    from edge_lora.base import base_content_hash
    from edge_lora.ota import BaseMismatchError

    install(ota.v2, ota.pub, root_v1)
    other = base_content_hash(ota.other_base)
    install(ota.v3, ota.pub, root_v1)
    before = snapshot(root_v1)
    with pytest.raises(BaseMismatchError, match="wrong base"):
        rollback(root_v1, "tiny-ota", base=other)
    assert snapshot(root_v1) == before
    (root_v1 / "base.json").write_text(json.dumps({"content_hash": other, "source": "test"}))
    assert list_installed(root_v1)[0]["status"].startswith("wrong base: version 3")
    with pytest.raises(BaseMismatchError, match="version 2 was built for base model"):
        rollback(root_v1, "tiny-ota")


def test_rollback_never_switches_to_a_version_that_was_never_committed(ota, root_v1):
    """An orphan version folder (an install killed or out of space between its rename and the switch) is not a
    rollback target: its number is above the highest version ever installed."""
    import shutil

    from edge_lora.ota import InstallRootError

    install(ota.v2, ota.pub, root_v1)
    shutil.copytree(root_v1 / "tiny-ota" / "versions" / "2", root_v1 / "tiny-ota" / "versions" / "5")
    before = snapshot(root_v1)
    with pytest.raises(InstallRootError, match="version 5 was never completely installed"):
        rollback(root_v1, "tiny-ota", to=5)
    assert snapshot(root_v1) == before and list_installed(root_v1)[0]["status"] == "ok"
