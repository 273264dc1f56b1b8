"""Fixtures for the OTA package tests: keys, a tiny base model folder, tiny PEFT adapters (v1, a v2 that changes
one layer), their packages, an install root with v1, and helpers to craft malformed packages signed with the
trusted key. Imported by tests/test_package*.py (tests/conftest.py belongs to the adapter tests)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from edge_lora.ota.container import Limits, pack_container, read_container
from edge_lora.ota.keys import key_id, keygen, load_private_key, load_public_key
from edge_lora.ota.manifest import canonical_json

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(folder, seed: int = 1, change_layer: int | None = None, change_seed: int = 100, r: int = 4,
                 base_seed: int = 0):
    """A PEFT LoRA adapter on tiny_model('llama', base_seed) with random non-zero factors, saved to ``folder``.
    With ``change_layer``, that layer's factors are drawn again from ``change_seed`` (a one-layer update)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from edge_lora.base import tiny_model

    model = get_peft_model(tiny_model("llama", seed=base_seed),
                           LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights=False))
    gen = torch.Generator().manual_seed(seed)
    gen2 = torch.Generator().manual_seed(change_seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
                if change_layer is not None and f"layers.{change_layer}." in name:
                    p.copy_(torch.randn(p.shape, generator=gen2) * 0.2)
    model.eval()
    model.save_pretrained(str(folder))
    return Path(folder)


def snapshot(root) -> dict:
    """Everything under an install root: path -> ('d',) | ('f', sha256, mode) | ('l', target). The root's lock
    file (an empty ROOT/.lock, created by the first installer and never removed: removing a lock file races) is
    infrastructure, not content; anything else is compared."""
    out = {}
    root = Path(root)
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            rel = str(p.relative_to(root))
            if rel == ".lock" and p.is_file() and not p.is_symlink() and p.stat().st_size == 0:
                continue
            if p.is_symlink():
                out[rel] = ("l", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("d",)
            else:
                out[rel] = ("f", hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mode)
    return out


def resign(data: bytes, priv, mutate_manifest=None, mutate_entries=None, hint: str | None = None) -> bytes:
    """Unpack a package, change its manifest and/or entries, sign again with ``priv``, pack again."""
    raw = read_container(data, Limits())
    m = json.loads(raw.manifest_bytes)
    entries = [(e.name, e.data, e.type) for e in raw.entries]
    if mutate_manifest:
        r = mutate_manifest(m)
        m = r if isinstance(r, dict) else m
    if mutate_entries:
        entries = mutate_entries(entries) or entries
    mb = canonical_json(m)
    return pack_container(mb, priv.sign(mb), hint or key_id(priv.public_key()), entries)


class Ctx:
    """Everything a package test needs, built once per session."""


@pytest.fixture(scope="session")
def ota(tmp_path_factory):
    from edge_lora.base import base_content_hash, tiny_model
    from edge_lora.stages.package import build_package

    d = tmp_path_factory.mktemp("ota")
    c = Ctx()
    c.dir = d
    c.priv_path, c.pub_path = keygen(d / "keys")
    c.priv, c.pub = load_private_key(c.priv_path), load_public_key(c.pub_path)
    other_priv, other_pub = keygen(d / "other-keys")
    c.other_priv, c.other_pub = load_private_key(other_priv), load_public_key(other_pub)
    c.base = d / "base"
    tiny_model("llama", seed=0).save_pretrained(str(c.base))
    c.base_hash = base_content_hash(c.base)
    c.other_base = d / "other-base"
    tiny_model("llama", seed=7).save_pretrained(str(c.other_base))
    c.a1 = make_adapter(d / "src1" / "tiny-ota")
    c.a2 = make_adapter(d / "src2" / "tiny-ota", change_layer=1)
    c.a3 = make_adapter(d / "src3" / "tiny-ota", seed=3)
    kw = {"key": c.priv, "base": c.base, "base_hash": c.base_hash, "level": 3}
    c.v1 = d / "v1.elpkg"
    c.rep_v1 = build_package(c.a1, version=1, out=c.v1, **kw)
    c.v2 = d / "v2.elpkg"
    c.rep_v2 = build_package(c.a2, version=2, out=c.v2, **kw)
    c.v2d = d / "v2-delta.elpkg"
    c.rep_v2d = build_package(c.a2, version=2, out=c.v2d, from_package=c.v1, **kw)
    c.v3 = d / "v3.elpkg"
    build_package(c.a3, version=3, out=c.v3, probes=("factors",), **kw)
    c.v3d = d / "v3-delta-from-v2.elpkg"
    build_package(c.a3, version=3, out=c.v3d, from_package=c.v2, probes=("factors",), **kw)
    c.v2_other_base = d / "v2-other-base.elpkg"
    build_package(c.a1, version=2, out=c.v2_other_base, key=c.priv, base=c.other_base, level=3,
                  probes=("factors",))
    return c


@pytest.fixture
def root_v1(ota, tmp_path):
    """An install root with v1 of tiny-ota installed (base recorded by hash)."""
    from edge_lora.ota.install import install

    root = tmp_path / "root"
    root.mkdir()
    install(ota.v1, ota.pub, root, base=ota.base_hash)
    return root


def make_hotswap_export(folder, adapter_dir, base_seed: int = 0, base_hash: str | None = None):
    """A hot-swap ONNX export of tiny_model('llama', base_seed) with the PEFT adapter in ``adapter_dir`` written
    beside it as adapter.onnx_adapter (what `export --profile cpu-hotswap` writes). ``base_hash`` goes into
    edge_lora.json as base_sha256, as the pipeline records it."""
    from edge_lora.adapter import load_peft
    from edge_lora.base import tiny_model
    from edge_lora.config import ExportConfig
    from edge_lora.stages.export_onnx import export_hotswap

    folder = Path(folder)
    folder.mkdir(parents=True)
    export_hotswap(tiny_model("llama", seed=base_seed), None, load_peft(adapter_dir), folder,
                   ExportConfig(mode="hotswap"), meta={"base_sha256": base_hash} if base_hash else None)
    return folder


@pytest.fixture(scope="session")
def ota_ort(tmp_path_factory):
    """Keys, a tiny base, two PEFT adapters (x, y), a hot-swap export of the base with x, and a hot-swap export
    of another tiny model (the wrong export for the device)."""
    from edge_lora.base import base_content_hash, tiny_model

    d = tmp_path_factory.mktemp("ota-ort")
    c = Ctx()
    c.dir = d
    c.priv_path, c.pub_path = keygen(d / "keys")
    c.priv, c.pub = load_private_key(c.priv_path), load_public_key(c.pub_path)
    c.base = d / "base"
    tiny_model("llama", seed=0).save_pretrained(str(c.base))
    c.base_hash = base_content_hash(c.base)
    c.ax = make_adapter(d / "x" / "tiny-ort", seed=1)
    c.ay = make_adapter(d / "y" / "tiny-ort", seed=3)
    c.export = make_hotswap_export(d / "export", c.ax, base_hash=c.base_hash)
    c.other_export = make_hotswap_export(d / "other-export", c.ax, base_seed=7)
    return c
