"""Bad-input corpus for the device side: each case must raise one specific PackageError subclass with a message
that says what is wrong, and leave the install root exactly as it was (every file, mode and link)."""
# ruff: noqa: F811 (fixtures imported from package_fixtures are used as same-named arguments)

from __future__ import annotations

import json

import pytest
import zstandard
from package_fixtures import ota, resign, root_v1, snapshot  # noqa: F401 (fixtures)

from edge_lora.errors import PackageError
from edge_lora.ota import (
    BaseMismatchError,
    DeltaError,
    FormatError,
    IntegrityError,
    ProbeError,
    SignatureError,
    SizeLimitError,
    UnsafeEntryError,
    VersionError,
)
from edge_lora.ota.codec import sha256
from edge_lora.ota.container import DEFAULT_LIMITS, MAGIC, Limits
from edge_lora.ota.install import install
from edge_lora.ota.manifest import payload_digest


def refused(root, pkg, pub, error, match, tmp_path, limits=DEFAULT_LIMITS, base=None):
    """Install ``pkg`` (bytes or path): it must raise ``error`` matching ``match`` and change nothing."""
    if isinstance(pkg, bytes):
        path = tmp_path / "bad.elpkg"
        path.write_bytes(pkg)
        pkg = path
    before = snapshot(root)
    with pytest.raises(error, match=match) as info:
        install(pkg, pub, root, base=base, limits=limits)
    assert isinstance(info.value, PackageError)
    assert snapshot(root) == before, "the install root changed"
    return info.value


def rename_entry(old, new):
    """Mutations that rename a payload file and its entry in a signed manifest and the container."""
    def mm(m):
        for f in m["payload"]["files"]:
            if f["name"] == old:
                f["name"] = new
        m["payload"]["digest"] = payload_digest(m["payload"]["files"])
        for e in m["entries"]:
            if e["name"] == old:
                e["name"] = new

    def me(entries):
        return [(new if n == old else n, d, t) for n, d, t in entries]

    return mm, me


W = "adapter_model.safetensors"


def test_tampered_payload_byte(ota, root_v1, tmp_path):
    data = bytearray(ota.v2.read_bytes())
    data[-10] ^= 0x40  # inside the last entry's zstd data
    refused(root_v1, bytes(data), ota.pub, IntegrityError, "fails its sha256 check", tmp_path)


def test_tampered_manifest(ota, root_v1, tmp_path):
    data = ota.v2.read_bytes()
    i = data.index(b'"version":2')
    data = data[:i] + b'"version":7' + data[i + 11:]
    refused(root_v1, data, ota.pub, SignatureError, "signature does not match the manifest", tmp_path)


def test_wrong_key(ota, root_v1, tmp_path):
    refused(root_v1, resign(ota.v2.read_bytes(), ota.other_priv), ota.pub, SignatureError,
            "not signed by the trusted key", tmp_path)


def test_wrong_key_with_forged_key_id(ota, root_v1, tmp_path):
    # the attacker copies the trusted key id into the header; the signature still fails
    from edge_lora.ota.keys import key_id

    forged = resign(ota.v2.read_bytes(), ota.other_priv, hint=key_id(ota.pub))
    refused(root_v1, forged, ota.pub, SignatureError, "does not match the manifest", tmp_path)


@pytest.mark.parametrize("keep", [0.05, 0.5, 0.99])
def test_truncated_file(ota, root_v1, tmp_path, keep):
    data = ota.v2.read_bytes()
    refused(root_v1, data[: int(len(data) * keep)], ota.pub, FormatError, "truncated", tmp_path)


def test_not_a_package_and_trailing_bytes(ota, root_v1, tmp_path):
    refused(root_v1, b"PK\x03\x04" + bytes(100), ota.pub, FormatError, "bad magic", tmp_path)
    refused(root_v1, ota.v2.read_bytes() + b"\0", ota.pub, FormatError, "unexpected bytes after", tmp_path)


def test_rollback_to_older_version(ota, root_v1, tmp_path):
    install(ota.v2, ota.pub, root_v1)
    refused(root_v1, ota.v1, ota.pub, VersionError, "older than the installed version 2", tmp_path)


def test_replay_of_installed_version(ota, root_v1, tmp_path):
    refused(root_v1, ota.v1, ota.pub, VersionError, r"already installed \(replay\)", tmp_path)


def test_package_for_another_base(ota, root_v1, tmp_path):
    refused(root_v1, ota.v2_other_base, ota.pub, BaseMismatchError, "built for base model", tmp_path)
    # also when the device's base is given explicitly
    refused(root_v1, ota.v2, ota.pub, BaseMismatchError, "built for base model", tmp_path, base=ota.other_base)


@pytest.mark.parametrize("bad", ["../adapter_model.safetensors", "..", "x/../../etc/passwd", "a/b"])
def test_path_traversal_signed(ota, root_v1, tmp_path, bad):
    # even a manifest signed by the trusted key (a buggy or compromised packager) cannot escape the folder
    mm, me = rename_entry(W, bad)
    pkg = resign(ota.v2.read_bytes(), ota.priv, mm, me)
    refused(root_v1, pkg, ota.pub, UnsafeEntryError, "'..'|path separator", tmp_path)


def test_path_traversal_unsigned_container_name(ota, root_v1, tmp_path):
    _, me = rename_entry(W, "../evil")
    pkg = resign(ota.v2.read_bytes(), ota.priv, None, me)
    refused(root_v1, pkg, ota.pub, UnsafeEntryError, "'..'", tmp_path)
    assert not (root_v1.parent / "evil").exists()


@pytest.mark.parametrize("bad", ["/etc/passwd", "\\windows\\x", "C:evil"])
def test_absolute_path(ota, root_v1, tmp_path, bad):
    mm, me = rename_entry(W, bad)
    refused(root_v1, resign(ota.v2.read_bytes(), ota.priv, mm, me), ota.pub, UnsafeEntryError, "absolute path",
            tmp_path)


@pytest.mark.parametrize("etype,kind", [(1, "symbolic link"), (2, "hard link"), (3, "directory"), (9, "unknown")])
def test_symlink_and_other_non_file_entries(ota, root_v1, tmp_path, etype, kind):
    pkg = resign(ota.v2.read_bytes(), ota.priv, None,
                 lambda es: [(n, d, etype if n == W else t) for n, d, t in es])
    refused(root_v1, pkg, ota.pub, UnsafeEntryError, kind, tmp_path)


def test_reserved_name(ota, root_v1, tmp_path):
    mm, me = rename_entry(W, "manifest.json")
    refused(root_v1, resign(ota.v2.read_bytes(), ota.priv, mm, me), ota.pub, UnsafeEntryError, "reserved",
            tmp_path)


def test_duplicate_entry(ota, root_v1, tmp_path):
    # twice in the container
    pkg = resign(ota.v2.read_bytes(), ota.priv, None, lambda es: es + [es[-1]])
    refused(root_v1, pkg, ota.pub, UnsafeEntryError, "duplicate entry", tmp_path)

    # twice in the signed manifest's payload list
    def mm(m):
        m["payload"]["files"].append(dict(m["payload"]["files"][-1]))
        m["payload"]["total_bytes"] += m["payload"]["files"][-1]["size"]
        m["payload"]["digest"] = payload_digest(m["payload"]["files"])

    refused(root_v1, resign(ota.v2.read_bytes(), ota.priv, mm), ota.pub, UnsafeEntryError,
            "duplicate payload file", tmp_path)


def test_oversize_entry(ota, root_v1, tmp_path):
    size = ota.a2.joinpath(W).stat().st_size
    refused(root_v1, ota.v2, ota.pub, SizeLimitError, "per-entry limit", tmp_path,
            limits=Limits(max_entry_bytes=size - 1))
    refused(root_v1, ota.v2, ota.pub, SizeLimitError, "payload totals", tmp_path,
            limits=Limits(max_total_bytes=size))
    refused(root_v1, ota.v2, ota.pub, SizeLimitError, "package limit", tmp_path,
            limits=Limits(max_package_bytes=1000))


def _bomb(ota, declared: int, content_size: bool, payload_size: int = 64 << 20, window_log: int = 0):
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=window_log,
                                                           write_content_size=content_size)
    bomb = zstandard.ZstdCompressor(compression_params=params).compress(bytes(payload_size))

    def mm(m):
        for f in m["payload"]["files"]:
            if f["name"] == W:
                f["size"], f["sha256"] = declared, sha256(bytes(declared))
        m["payload"]["total_bytes"] = sum(f["size"] for f in m["payload"]["files"])
        m["payload"]["digest"] = payload_digest(m["payload"]["files"])
        for e in m["entries"]:
            if e["name"] == W:
                e.update(stored_size=len(bomb), stored_sha256=sha256(bomb), decoded_size=declared)

    return resign(ota.v2.read_bytes(), ota.priv, mm, lambda es: [(n, bomb if n == W else d, t) for n, d, t in es])


def test_zstd_bomb(ota, root_v1, tmp_path):
    # 64 MiB of zeros in ~2 KiB. Declared honestly: over the limit before decoding anything.
    refused(root_v1, _bomb(ota, 64 << 20, True), ota.pub, SizeLimitError, "per-entry limit", tmp_path,
            limits=Limits(max_entry_bytes=16 << 20))
    # declared small, frame header says 64 MiB: refused before decoding
    refused(root_v1, _bomb(ota, 4096, True), ota.pub, SizeLimitError, "frame says it holds", tmp_path)
    # declared small, no size in the frame header, a big window: refused before decoding (memory)
    refused(root_v1, _bomb(ota, 4096, False), ota.pub, SizeLimitError, "window", tmp_path)
    # declared small, no size in the header, a small window: decoding stops right after the declared size
    refused(root_v1, _bomb(ota, 4096, False, window_log=10), ota.pub, SizeLimitError, "decompresses to more than",
            tmp_path)


def test_delta_against_wrong_base_version(ota, root_v1, tmp_path):
    # a delta from v2 while v1 is installed
    refused(root_v1, ota.v3d, ota.pub, DeltaError, "delta from version 2 .* but version 1 is installed", tmp_path)


def test_delta_against_other_contents_of_same_version(ota, tmp_path):
    # the device has a different "v1" (e.g. from another build): the delta must not be applied to it
    from edge_lora.stages.package import build_package

    alt = tmp_path / "alt.elpkg"
    build_package(ota.a3, ota.priv, 1, ota.base, alt, adapter_id="tiny-ota", base_hash=ota.base_hash, level=3,
                  probes=("factors",))
    root = tmp_path / "root"
    root.mkdir()
    install(alt, ota.pub, root, base=ota.base_hash)
    refused(root, ota.v2d, ota.pub, DeltaError, "other contents", tmp_path)


def test_delta_with_nothing_installed(ota, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    refused(root, ota.v2d, ota.pub, DeltaError, "not installed here", tmp_path, base=ota.base_hash)


def test_probe_mismatch(ota, root_v1, tmp_path):
    def mm(m):
        for p in m["probes"]:
            if p["kind"] == "factors":
                p["modules"][3]["expected"][0] *= 1.001

    refused(root_v1, resign(ota.v2.read_bytes(), ota.priv, mm), ota.pub, ProbeError,
            "does not decode to the update that was packaged", tmp_path)


def test_probe_mismatch_torch_logits(ota, root_v1, tmp_path):
    def mm(m):
        for p in m["probes"]:
            if p["kind"] == "torch-logits":
                p["expected"][5][0] += 0.5

    refused(root_v1, resign(ota.v2.read_bytes(), ota.priv, mm), ota.pub, ProbeError, "torch-logits probe",
            tmp_path, base=ota.base)


def test_probe_mismatch_on_fresh_root_leaves_nothing(ota, tmp_path):
    def mm(m):
        m["probes"][0]["modules"][0]["norm"] *= 2

    root = tmp_path / "root"
    root.mkdir()
    refused(root, resign(ota.v1.read_bytes(), ota.priv, mm), ota.pub, ProbeError, "factors probe", tmp_path,
            base=ota.base_hash)
    assert snapshot(root) == {}   # only the root's empty lock file (see package_fixtures.snapshot)


def test_no_runnable_probe(ota, root_v1, tmp_path):
    def mm(m):
        m["probes"] = [p for p in m["probes"] if p["kind"] != "factors"] + [{"kind": "ort"}]

    refused(root_v1, resign(ota.v2.read_bytes(), ota.priv, mm), ota.pub, ProbeError, "No probe could run",
            tmp_path)


@pytest.mark.parametrize("mutate,error,match", [
    (lambda m: m.update(extra=1), FormatError, "unknown key"),
    (lambda m: m.update(version=True), FormatError, "not a boolean"),
    (lambda m: m.update(version=0), FormatError, "from 1 to"),
    (lambda m: m.update(format_version=2), FormatError, "not supported"),
    (lambda m: m.update(adapter_id="../x"), UnsafeEntryError, "adapter_id"),
    (lambda m: m["payload"].update(digest="0" * 64), IntegrityError, "digest"),
    (lambda m: m["entries"][0].update(encoding="zstd-patch"), FormatError, "encoding"),
    (lambda m: m.pop("probes"), FormatError, "'probes' is missing"),
])
def test_bad_manifest_schema(ota, root_v1, tmp_path, mutate, error, match):
    refused(root_v1, resign(ota.v2.read_bytes(), ota.priv, mutate), ota.pub, error, match, tmp_path)


def test_manifest_json_tricks(ota, root_v1, tmp_path):
    from edge_lora.ota.container import pack_container
    from edge_lora.ota.keys import key_id

    raw = ota.v2.read_bytes()
    good = json.loads(raw[22:22 + int.from_bytes(raw[18:22], "big")])
    for text, match in ((b'{"format":"edge-lora-ota","format":"x"}', "duplicate key"),
                        (b'{"a":NaN}', "not valid JSON"), (b"\xff\xfe", "not valid UTF-8"),
                        (json.dumps([good]).encode(), "must be a JSON object")):
        pkg = pack_container(text, ota.priv.sign(text), key_id(ota.pub), [])
        refused(root_v1, pkg, ota.pub, FormatError, match, tmp_path)
    assert raw.startswith(MAGIC)


def test_links_inside_the_install_root(ota, root_v1, tmp_path):
    # a link where the versions folder belongs could redirect the install: refused, nothing written
    vroot = root_v1 / "tiny-ota" / "versions"
    elsewhere = tmp_path / "elsewhere"
    vroot.rename(elsewhere)
    vroot.symlink_to(elsewhere)
    refused(root_v1, ota.v2, ota.pub, PackageError, "symbolic link", tmp_path)
    assert sorted(p.name for p in elsewhere.iterdir()) == ["1"]


SMALL_ORDER = [bytes(32), bytes([1]) + bytes(31), bytes([0xEC]) + b"\xff" * 30 + b"\x7f",
               bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"),
               bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a")]


@pytest.mark.parametrize("raw", SMALL_ORDER, ids=["zero", "one", "p-1", "order8a", "order8b"])
def test_small_order_public_keys_are_never_trusted(ota, root_v1, tmp_path, raw):
    """A small-order Ed25519 key accepts signatures that no private key made; as a file (raw, hex, PEM) and as a
    key object handed to install, it is refused before any signature is checked."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from edge_lora.ota.keys import load_public_key

    key = ed25519.Ed25519PublicKey.from_public_bytes(raw)
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    for name, data in (("raw.pub", raw), ("hex.pub", raw.hex().encode()), ("pem.pub", pem)):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(PackageError, match="refused as a trusted key: it is"):
            load_public_key(tmp_path / name)
    refused(root_v1, ota.v2, key, SignatureError, "trusted public key is refused", tmp_path)


def test_the_device_verbs_run_without_torch_or_onnx(ota, tmp_path):
    """docs/ota.md: a device needs numpy, zstandard and cryptography. verify, install (factors probe, base by
    folder), list and rollback run with torch, transformers, PEFT and ONNX made unimportable."""
    import subprocess
    import sys

    blocked = ("torch", "transformers", "peft", "onnx", "onnxruntime", "optimum", "onnx_ir", "tensorly")
    runner = ("import runpy, sys\n"
              f"for m in {blocked!r}:\n    sys.modules[m] = None\n"
              "sys.argv = ['edge_lora'] + sys.argv[1:]\nrunpy.run_module('edge_lora', run_name='__main__')\n")

    def device(*args):
        return subprocess.run([sys.executable, "-c", runner, *map(str, args)], capture_output=True, text=True,
                              timeout=120)

    root = tmp_path / "root"
    root.mkdir()
    steps = [("verify", ota.v3, "--pubkey", ota.pub_path),
             ("install", ota.v1, "--pubkey", ota.pub_path, "--root", root, "--base", ota.base),
             ("install", ota.v3, "--pubkey", ota.pub_path, "--root", root),
             ("list", "--root", root),
             ("rollback", "--id", "tiny-ota", "--root", root)]
    for args in steps:
        out = device(*args)
        assert out.returncode == 0, (args[0], out.stderr[-2000:])
        assert "Traceback" not in out.stderr


@pytest.mark.parametrize("aid", ["base.json", "BASE.JSON", "con", "NUL.txt", "lpt1", "ends-with-dot."])
def test_reserved_adapter_ids_are_refused_by_packager_and_device(ota, root_v1, tmp_path, aid):
    """An id is a folder beside ROOT/base.json: the root's own names, Windows device names and trailing dots
    would turn into something else on some device file system."""
    from edge_lora.ota import UnsafeEntryError
    from edge_lora.stages.package import build_package

    with pytest.raises(UnsafeEntryError, match="reserved"):
        build_package(ota.a1, key=ota.priv, version=5, base=ota.base, base_hash=ota.base_hash, out=tmp_path / "x",
                      adapter_id=aid, probes=("factors",))
    assert not (tmp_path / "x").exists()

    def rename(m):
        m["adapter_id"] = aid

    refused(root_v1, resign(ota.v2.read_bytes(), ota.priv, mutate_manifest=rename), ota.pub, UnsafeEntryError, "reserved",
            tmp_path)


def test_ids_that_differ_only_in_case_are_one_folder(ota, root_v1, tmp_path):
    from edge_lora.ota import InstallRootError

    def rename(m):
        m["adapter_id"] = "TINY-ota"

    refused(root_v1, resign(ota.v2.read_bytes(), ota.priv, mutate_manifest=rename), ota.pub, InstallRootError,
            "only in case", tmp_path)


def test_manifest_signer_and_base_take_no_unknown_keys(ota, root_v1, tmp_path):
    def extra_base(m):
        m["base"]["trust_me"] = True

    def extra_signer(m):
        m["signer"]["comment"] = "x"

    refused(root_v1, resign(ota.v2.read_bytes(), ota.priv, mutate_manifest=extra_base), ota.pub, FormatError,
            r"manifest.base: unknown key\(s\) \['trust_me'\]", tmp_path)
    refused(root_v1, resign(ota.v2.read_bytes(), ota.priv, mutate_manifest=extra_signer), ota.pub, FormatError,
            r"manifest.signer: unknown key\(s\) \['comment'\]", tmp_path)


def test_packager_refuses_versions_no_device_accepts_and_verify_a_missing_root(ota, tmp_path):
    from edge_lora.ota import InstallRootError
    from edge_lora.ota.install import verify_package
    from edge_lora.stages.package import build_package

    with pytest.raises(PackageError, match="from 1 to 9007199254740991"):
        build_package(ota.a1, key=ota.priv, version=2**53, base=ota.base, base_hash=ota.base_hash,
                      out=tmp_path / "x", probes=("factors",))
    assert not (tmp_path / "x").exists()
    with pytest.raises(InstallRootError, match="is not a folder"):
        verify_package(ota.v1, ota.pub, root=tmp_path / "nonexistent")


@pytest.mark.parametrize("name", ["adapter_model.bin", "weights.PT", "model.ckpt"])
def test_pickled_checkpoints_are_never_installed(ota, root_v1, tmp_path, name):
    """A signed package that carries a pickle (PEFT would torch.load adapter_model.bin when no safetensors file is
    there) is refused by its entry names, before anything is written."""
    mm, me = rename_entry(W, name)
    refused(root_v1, resign(ota.v2.read_bytes(), ota.priv, mm, me), ota.pub, UnsafeEntryError,
            "pickled checkpoint", tmp_path)


def test_an_unsigned_huge_file_is_refused_before_it_is_read(ota, tmp_path):
    """Authentication first: a 1.5 GB file (sparse, a real package's head with a forged signature) is refused
    with a few MB of memory, not the file's size (measured before: 3.9 GB peak for 1.9 GB)."""
    import subprocess
    import sys

    data = bytearray(ota.v2.read_bytes())
    head = 22 + int.from_bytes(data[18:22], "big")
    data[head] ^= 0xFF   # first byte of the signature
    big = tmp_path / "huge.elpkg"
    with open(big, "wb") as f:
        f.write(data)
        f.seek(1_500_000_000)
        f.write(b"\0")
    code = ("import resource, sys\n"
            "from edge_lora.ota.install import verify_package\n"
            "from edge_lora.ota.keys import load_public_key\n"
            "from edge_lora.errors import PackageError\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "try:\n"
            f"    verify_package({str(big)!r}, load_public_key({str(ota.pub_path)!r}))\n"
            "except PackageError as exc:\n"
            "    print(type(exc).__name__, str(exc)[:120])\n"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 0 and lines[0].startswith("SignatureError"), out.stdout + out.stderr[-2000:]
    assert int(lines[-1]) < 100, f"peak RSS grew by {lines[-1]} MB while refusing an unsigned file"


# ----------------------------------------------------------------- the strict adapter reader (ota/adapter_check)
def _tamper(folder, tmp_path, header=None, config=None, extra=None):
    """A copy of the PEFT folder with its safetensors header and/or config rewritten (data bytes kept, plus
    ``extra`` bytes appended to the data section)."""
    import shutil

    out = tmp_path / "tampered" / "tiny-ota"
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(folder, out)
    w = out / W
    data = w.read_bytes()
    n = int.from_bytes(data[:8], "little")
    head, body = json.loads(data[8:8 + n]), data[8 + n:]
    if hasattr(header, "text"):   # a header json.dumps cannot write (duplicate names)
        raw = header.text(head).encode()
    else:
        raw = json.dumps(header(head) if header else head).encode()
    raw += b" " * (-len(raw) % 8)
    w.write_bytes(len(raw).to_bytes(8, "little") + raw + body + (extra or b""))
    if config:
        c = json.loads((out / "adapter_config.json").read_text())
        config(c)
        (out / "adapter_config.json").write_text(json.dumps(c))
    return out


def _first(head):
    return next(k for k in head if k != "__metadata__")


def _unknown_dtype(head):
    head["base_model.model.extra.scale"] = {"dtype": "Q4", "shape": [4], "data_offsets": [_end(head), _end(head) + 4]}
    return head


def _end(head):
    return max(v["data_offsets"][1] for k, v in head.items() if k != "__metadata__")


def _overlap(head):
    k = _first(head)
    head["base_model.model.extra.copy"] = dict(head[k])   # the same bytes, read as a second tensor
    return head


def _no_prefix(head):
    module = _first(head).rsplit(".lora_", 1)[0]   # both factors of one module, so the pair stays whole
    for k in [k for k in head if k.startswith(module + ".lora_")]:
        head[k.removeprefix("base_model.model.")] = head.pop(k)
    return head


class _Duplicate:
    """A header naming the first tensor twice (json.dumps cannot write that, so build the text)."""

    @staticmethod
    def text(head):
        k = _first(head)
        body = json.dumps(head)[1:]
        return "{" + json.dumps(k) + ": " + json.dumps(head[k]) + ", " + body


CASES = {
    "duplicate-name": dict(header=_Duplicate, match="names tensor .* twice"),
    "unknown-dtype": dict(header=_unknown_dtype, extra=b"\0" * 4, match="dtype 'Q4'"),
    "overlapping-offsets": dict(header=_overlap, match="overlap or leave gaps"),
    "no-peft-prefix": dict(header=_no_prefix, match="lacks PEFT's 'base_model.model.' prefix"),
    "rank-mismatch": dict(config=lambda c: c.update(r=8, lora_alpha=16), match="rank 4 but adapter_config.json "
                                                                              "gives r = 8"),
    "bad-target-modules": dict(config=lambda c: c.update(target_modules=5), match="target_modules must be"),
    "trailing-bytes": dict(extra=b"\0" * 8, match="bytes after the last tensor"),
    # configs PEFT refuses or reads differently (tests/test_peft_config.py loads each in PEFT)
    "config-targets-fewer-modules": dict(config=lambda c: c.update(target_modules=["q_proj"]),
                                         match="do not select it; PEFT would drop them"),
    "config-init-rewrites-the-base": dict(config=lambda c: c.update(init_lora_weights="pissa"),
                                          match="init_lora_weights is 'pissa'"),
    "config-lora-bias-without-tensors": dict(config=lambda c: c.update(lora_bias=True), match="lacks a lora_B.bias"),
    "config-modules-to-save": dict(config=lambda c: c.update(modules_to_save=["lm_head"]),
                                   match="modules_to_save is"),
    "config-unknown-key-switched-on": dict(config=lambda c: c.update(frobnicate=3), match="frobnicate is 3"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_adapters_peft_would_read_differently_are_refused_by_packager_and_device(ota, root_v1, tmp_path,
                                                                               monkeypatch, case):
    """Each case installed as ok with only the factors probe. The packager refuses to build it; a package built
    by a compromised packager (the check bypassed, correctly signed) is refused by the device."""
    from edge_lora.ota.adapter_check import AdapterPayloadError
    from edge_lora.stages import package
    from edge_lora.stages.package import build_package

    spec = dict(CASES[case])
    match = spec.pop("match")
    bad = _tamper(ota.a2, tmp_path, **spec)
    kw = dict(key=ota.priv, version=2, base=ota.base, base_hash=ota.base_hash, out=tmp_path / "p.elpkg",
              probes=("factors",))
    with pytest.raises(AdapterPayloadError, match=match):
        build_package(bad, **kw)
    assert not (tmp_path / "p.elpkg").exists()
    monkeypatch.setattr(package, "_check_adapter", lambda payload, base_path: {})
    build_package(bad, **kw)
    refused(root_v1, tmp_path / "p.elpkg", ota.pub, AdapterPayloadError, match, tmp_path)


def test_peft_errors_while_building_the_torch_logits_probe_are_clean_errors(ota, tmp_path, monkeypatch):
    """Were tracebacks: an adapter PEFT itself refuses (here an unknown bias mode, past a bypassed strict reader)
    while the packager builds the torch-logits probe."""
    from edge_lora.stages import package
    from edge_lora.stages.package import build_package

    bad = _tamper(ota.a2, tmp_path, config=lambda c: c.update(bias="bogus"))
    monkeypatch.setattr(package, "_check_adapter", lambda payload, base_path: {})
    with pytest.raises(PackageError, match="torch-logits probe could not run the adapter .*NotImplementedError"):
        build_package(bad, key=ota.priv, version=2, base=ota.base, base_hash=ota.base_hash,
                      out=tmp_path / "p.elpkg", probes=("torch-logits",))
    assert not (tmp_path / "p.elpkg").exists()


def test_an_adapter_that_does_not_fit_the_devices_base_is_refused(ota, tmp_path, monkeypatch):
    """Signed for the device's base hash by a compromised packager, but trained on another architecture: with
    --base (a folder) and only the factors probe, the device reads the base's shapes and refuses it."""
    from edge_lora.ota import BaseMismatchError
    from edge_lora.stages import package
    from edge_lora.stages.package import build_package
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    wide = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    peft = get_peft_model(wide, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False))
    peft.save_pretrained(tmp_path / "wide" / "tiny-ota")
    monkeypatch.setattr(package, "_check_adapter", lambda payload, base_path: {})
    build_package(tmp_path / "wide" / "tiny-ota", key=ota.priv, version=1, base=ota.base, base_hash=ota.base_hash,
                  out=tmp_path / "w.elpkg", probes=("factors",))
    root = tmp_path / "root"
    root.mkdir()
    refused(root, tmp_path / "w.elpkg", ota.pub, BaseMismatchError, "wrong base model", tmp_path, base=ota.base)


def test_keygen_force_failing_keeps_the_old_pair(tmp_path):
    """keygen --force that cannot finish (here: a folder where the public key goes) leaves the old, matching
    pair; and the packager's numeric flags take only what works."""
    from edge_lora.ota.keys import PRIVATE_NAME, PUBLIC_NAME, keygen
    from edge_lora.stages.package import size_limits

    keygen(tmp_path / "k")
    old = {n: (tmp_path / "k" / n).read_bytes() for n in (PRIVATE_NAME, PUBLIC_NAME)}
    (tmp_path / "k" / PUBLIC_NAME).unlink()
    (tmp_path / "k" / PUBLIC_NAME).mkdir()
    with pytest.raises(PackageError, match="is a folder"):
        keygen(tmp_path / "k", force=True)
    assert (tmp_path / "k" / PRIVATE_NAME).read_bytes() == old[PRIVATE_NAME]
    assert not [p for p in (tmp_path / "k").iterdir() if ".tmp-" in p.name]
    (tmp_path / "k" / PUBLIC_NAME).rmdir()
    (tmp_path / "k" / PUBLIC_NAME).write_bytes(old[PUBLIC_NAME])
    priv, pub = keygen(tmp_path / "k", force=True)
    assert priv.read_bytes() != old[PRIVATE_NAME] and pub.read_bytes() != old[PUBLIC_NAME]
    for bad in (float("nan"), float("inf"), 0, -1):
        with pytest.raises(PackageError, match="positive, finite size"):
            size_limits(bad)


def test_zstd_level_out_of_range_is_refused(ota, tmp_path):
    from edge_lora.stages.package import build_package

    for level in (0, 23, 99):
        with pytest.raises(PackageError, match="zstd levels run from 1 to 22"):
            build_package(ota.a1, key=ota.priv, version=1, base=ota.base, base_hash=ota.base_hash,
                          out=tmp_path / "x", level=level, probes=("factors",))
    assert not (tmp_path / "x").exists()


def test_bad_roots_and_outputs_are_clean_errors_not_tracebacks(ota, tmp_path):
    """Each of these was a traceback: the root's lock file a folder or a link, package/export --out under a file
    or a folder, a file where the install root goes."""
    import subprocess
    import sys

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "edge_lora", *map(str, args)], capture_output=True, text=True,
                              timeout=300)

    (tmp_path / "afile").write_text("x")
    lockdir = tmp_path / "r1"
    (lockdir / ".lock").mkdir(parents=True)
    locklink = tmp_path / "r2"
    locklink.mkdir()
    (locklink / ".lock").symlink_to(tmp_path / "afile")
    pkg = ["package", ota.a1, "--key", ota.priv_path, "--version", "1", "--base", ota.base, "--probe", "factors"]
    cases = [
        (["install", ota.v1, "--pubkey", ota.pub_path, "--root", lockdir, "--base", ota.base], "lock file"),
        (["install", ota.v1, "--pubkey", ota.pub_path, "--root", locklink, "--base", ota.base], "lock file"),
        ([*pkg, "--out", tmp_path / "afile" / "p.elpkg"], "cannot write the package"),
        ([*pkg, "--out", tmp_path], "is a folder"),
        (["export", "--base", ota.base, "--adapter", ota.a1, "--out", tmp_path / "afile" / "e", "--quiet"],
         "cannot be created"),
        (["keygen", "--out", tmp_path / "afile" / "k"], "cannot create the folder"),
        (["install", ota.v1, "--pubkey", ota.pub_path, "--root", tmp_path / "afile", "--base", ota.base],
         "does not exist"),
    ]
    for args, words in cases:
        out = cli(*args)
        assert out.returncode == 2 and "Traceback" not in out.stderr, (args[0], out.stderr[-1500:])
        assert words in out.stderr, (args[0], words, out.stderr[-500:])
    assert (tmp_path / "afile").read_text() == "x" and not list((lockdir / ".lock").iterdir())
