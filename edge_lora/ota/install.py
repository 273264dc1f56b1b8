"""Device side: verify a package against the device (base model, installed versions) and install it
atomically, with the previous version kept to fall back to.

Install root layout::

    ROOT/base.json                        {"content_hash": ..., "source": ..., "export": ...}: the device's base
                                          model, recorded by the first `install --base`, and its hot-swap ONNX
                                          export folder (for ort probes), recorded by `install --export`; later
                                          installs may omit both
    ROOT/<adapter_id>/current             the pointer file: {"adapter_id", "version", "previous", "highest"};
                                          replaced atomically (temp file, fsync, rename, fsync folder)
    ROOT/<adapter_id>/versions/<N>/       one installed version: the payload files, manifest.json (the signed
                                          bytes) and manifest.sig; only `current` and `previous` are kept
    ROOT/.lock                            flock'ed by every install and rollback (one mutation at a time)
    ROOT/<adapter_id>/.staging-*          a version being written; removed by the next install if one was killed

Order of an install: read + verify everything (signature, schema, hashes, base, version, delta) without writing;
lock; stage the files in .staging-*, fsync; run the probes on the staged files; rename to versions/<N>, fsync;
switch `current`; drop versions older than the previous one. A kill at any point leaves `current` naming a
complete version (the old one until the rename of `current`, the new one after).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

from edge_lora.ota import codec
from edge_lora.ota.container import DEFAULT_LIMITS, Limits, check_adapter_id, fsync_dir, write_atomic
from edge_lora.ota.errors import (
    BaseMismatchError,
    DeltaError,
    FormatError,
    InstallRootError,
    PackageError,
    UnsafeEntryError,
    VersionError,
)
from edge_lora.ota.manifest import Package, decode_payload, open_package, parse_manifest, payload_digest
from edge_lora.ota.probe import run_probes

POINTER = "current"
VERSIONS = "versions"
LOCK = ".lock"
BASE_FILE = "base.json"
STATE_FORMAT = 1
_HEX64 = re.compile(r"[0-9a-f]{64}")


# ------------------------------------------------------------------------------------------ root state
def _no_link(path: Path, what: str) -> Path:
    if path.is_symlink():
        raise InstallRootError(f"{path} ({what}) is a symbolic link; the install root holds real folders and "
                               "files only (a link could redirect the install elsewhere). Remove it.")
    return path


def _adapter_dir(root: Path, adapter_id: str) -> Path:
    """ROOT/<adapter_id>. The root itself may be a link (the device's choice); nothing inside it may be."""
    try:
        check_adapter_id(adapter_id, str(root))
    except UnsafeEntryError as exc:
        raise InstallRootError(str(exc)) from None
    root = Path(root)
    if root.is_dir():   # "Foo" and "foo" are one folder where the file system ignores case: one id only
        clash = [p.name for p in root.iterdir() if p.name.lower() == adapter_id.lower() and p.name != adapter_id]
        if clash:
            raise InstallRootError(f"adapter id {adapter_id!r} differs from the installed {clash[0]!r} only in "
                                   "case; on many device file systems they are the same folder. Use the installed "
                                   "id, or another one.")
    return _no_link(root / adapter_id, "an adapter folder")


def read_state(root: str | os.PathLike, adapter_id: str) -> dict | None:
    """The pointer file as a dict, or None when nothing of this adapter is installed."""
    adir = _adapter_dir(Path(root), adapter_id)
    ptr = _no_link(adir / POINTER, "the current-version pointer")
    if not ptr.exists():
        return None
    try:
        state = json.loads(ptr.read_text())
        ok = (isinstance(state, dict) and state.get("adapter_id") == adapter_id
              and all(type(state.get(k)) is int for k in ("version", "highest"))
              and (state.get("previous") is None or type(state["previous"]) is int)
              and state["highest"] >= state["version"])
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise InstallRootError(f"{ptr} cannot be read ({exc}); the install root is damaged. Reinstall the "
                               "adapter into a fresh root.") from exc
    if not ok:
        raise InstallRootError(f"{ptr} is not a valid pointer file; the install root is damaged. Reinstall the "
                               "adapter into a fresh root.")
    return state


def version_dir(root: str | os.PathLike, adapter_id: str, version: int) -> Path:
    vroot = _no_link(_adapter_dir(Path(root), adapter_id) / VERSIONS, "the versions folder")
    return _no_link(vroot / str(version), f"installed version {version}")


def installed_manifest(root, adapter_id: str, version: int) -> dict:
    vdir = version_dir(root, adapter_id, version)
    path = _no_link(vdir / "manifest.json", "an installed manifest")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InstallRootError(f"{path} is missing: installed version {version} of {adapter_id} is damaged. "
                               "Install a full package of a newer version.") from exc
    try:
        return parse_manifest(data, str(path), Limits())
    except PackageError as exc:
        raise InstallRootError(f"installed version {version} of {adapter_id}: {exc}") from exc


def installed_reader(root, adapter_id: str, version: int):
    """A function name -> bytes for installed files, each checked against the installed manifest."""
    vdir = version_dir(root, adapter_id, version)
    files = {f["name"]: f for f in installed_manifest(root, adapter_id, version)["payload"]["files"]}

    def read(name: str) -> bytes:
        spec = files.get(name)
        if spec is None:
            raise DeltaError(f"the delta needs {name!r} from installed version {version}, which has no such file.")
        path = _no_link(vdir / name, "an installed file")
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            with os.fdopen(fd, "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    raise InstallRootError(f"{path} is not a regular file.")
                data = f.read(spec["size"] + 1)
        except OSError as exc:
            raise InstallRootError(f"{path} cannot be read ({exc.strerror}); installed version {version} is "
                                   "damaged. Install a full package.") from exc
        if len(data) != spec["size"] or codec.sha256(data) != spec["sha256"]:
            raise InstallRootError(f"{path} no longer matches its sha256 in the installed manifest: installed "
                                   f"version {version} is damaged. Install a full package of a newer version.")
        return data

    return read


def check_installed(root, adapter_id: str) -> int | None:
    """The current version after checking every one of its files; InstallRootError if it is broken."""
    state = read_state(root, adapter_id)
    if state is None:
        return None
    read = installed_reader(root, adapter_id, state["version"])
    for f in installed_manifest(root, adapter_id, state["version"])["payload"]["files"]:
        read(f["name"])
    return state["version"]


# ------------------------------------------------------------------------------------------- base model
def device_base_hash(root, base=None) -> tuple[str, str]:
    """(content hash, where it came from): ``base`` (an HF folder, 'smollm2', or a 64-hex hash), else the hash
    recorded in ROOT/base.json."""
    if base is not None:
        text = str(base)
        if _HEX64.fullmatch(text):
            return text, "--base (hash)"
        from edge_lora.base import base_content_hash, resolve_base

        path = resolve_base(text)
        return base_content_hash(path), str(path)
    rec = Path(root) / BASE_FILE
    try:
        data = json.loads(_no_link(rec, "the base record").read_text())
        h = data["content_hash"]
        if not isinstance(h, str) or not _HEX64.fullmatch(h):
            raise ValueError("content_hash is not 64 hex digits")
    except FileNotFoundError:
        raise PackageError(f"No base model is known for install root {root}: pass --base (the device's base "
                           "model folder, or 'smollm2') once; its content hash is then recorded in "
                           f"{rec}.") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InstallRootError(f"{rec} is damaged ({exc}); pass --base to record the base model again.") from exc
    return h, str(rec)


def device_export(root=None, export=None) -> Path | None:
    """The device's hot-swap ONNX export folder for ort probes: ``export`` (checked now), else the one recorded
    in ROOT/base.json by an earlier ``install --export`` (checked by the ort probe, so a package without an ort
    probe still installs if it went missing), else None (ort probes are then skipped)."""
    if export is not None:
        path = Path(export).resolve()
        if not (path / "model.onnx").is_file():
            raise PackageError(f"--export {export} is not a hot-swap export folder (no model.onnx); pass the "
                               "folder written by `python -m edge_lora export --profile cpu-hotswap`.")
        return path
    if root is None:
        return None
    rec = Path(root) / BASE_FILE
    try:
        data = json.loads(_no_link(rec, "the base record").read_text()) if rec.is_file() else {}
        recorded = data.get("export")
    except (OSError, ValueError, AttributeError) as exc:
        raise InstallRootError(f"{rec} is damaged ({exc}); pass --base to record the base model again.") from exc
    if recorded is not None and not isinstance(recorded, str):
        raise InstallRootError(f"{rec}: 'export' is not a path; pass --export to record it again.")
    return Path(recorded) if recorded else None


# ---------------------------------------------------------------------------------------------- verify
def check_against_device(pkg: Package, state: dict | None, base_hash: str | None, base_src: str = "",
                         check_versions: bool = True) -> None:
    """Base binding, then (with ``check_versions``) no rollback, no replay, and a delta's starting version."""
    m, where = pkg.manifest, pkg.path
    if base_hash is not None and m["base"]["content_hash"] != base_hash:
        raise BaseMismatchError(
            f"{where} is built for base model {m['base']['content_hash'][:16]}… "
            f"({m['base'].get('name', 'unnamed')}), but this device's base is {base_hash[:16]}… (from {base_src}). "
            "An adapter on another base computes garbage; build the package with --base set to the device's "
            "base model.")
    v, aid = m["version"], m["adapter_id"]
    if not check_versions:
        return
    if state is not None:
        cur, high = state["version"], state["highest"]
        if v < cur:
            raise VersionError(f"{where}: version {v} of {aid} is older than the installed version {cur}: "
                               "refusing a rollback by package (an attacker could replay an old, vulnerable "
                               "version). To go back on purpose, use `python -m edge_lora rollback`.")
        if v == cur:
            raise VersionError(f"{where}: version {v} of {aid} is already installed (replay). Publish a new "
                               "version with a higher number.")
        if v <= high:
            raise VersionError(f"{where}: version {v} of {aid} is not above the highest version ever installed "
                               f"({high}); versions only go up. Publish version {high + 1} or later.")
    if pkg.is_delta:
        d = m["delta"]
        if state is None:
            raise DeltaError(f"{where} is a delta from version {d['from_version']} of {aid}, but {aid} is not "
                             "installed here. Install the full package.")
        if d["from_version"] != state["version"]:
            raise DeltaError(f"{where} is a delta from version {d['from_version']} of {aid}, but version "
                             f"{state['version']} is installed. Install the full package of version {v}, or "
                             f"the delta built against version {state['version']}.")


def verify_package(source, public_key, root=None, base=None, limits: Limits = DEFAULT_LIMITS,
                   run_probe: bool = True, probe_base=None, probe_export=None) -> dict:
    """Every check install makes, writing nothing. Returns a report; raises a PackageError on failure."""
    if root is not None and not Path(root).is_dir():
        raise InstallRootError(f"--root {root} is not a folder: there is no install root to verify against. Pass "
                               "the device's install root, or leave --root out to check the package alone.")
    pkg = open_package(source, public_key, limits)
    m = pkg.manifest
    report = {"package": pkg.path, "adapter_id": m["adapter_id"], "version": m["version"],
              "kind": "delta" if pkg.is_delta else "full", "signature": "ok", "entries": "sha256 ok",
              "base_hash": m["base"]["content_hash"]}
    base_hash = src = None
    if base is not None or (root is not None and (Path(root) / BASE_FILE).exists()):
        base_hash, src = device_base_hash(root, base)
        report["base"] = f"matches {src}"
    else:
        report["base"] = "not checked (pass --base, or --root with a recorded base)"
    state = read_state(root, m["adapter_id"]) if root is not None else None
    check_against_device(pkg, state, base_hash, src or "", check_versions=root is not None)
    if pkg.is_delta and root is None:
        report["payload"] = "not decoded: a delta needs the installed version (pass --root)"
        return report
    old = None
    if pkg.is_delta:
        old_manifest = installed_manifest(root, m["adapter_id"], state["version"])
        if payload_digest(old_manifest["payload"]["files"]) != m["delta"]["from_payload_digest"]:
            raise DeltaError(f"{pkg.path}: the delta was built against a version {state['version']} of "
                             f"{m['adapter_id']} with other contents than the one installed. Install the full "
                             "package.")
        old = installed_reader(root, m["adapter_id"], state["version"])
    files = decode_payload(pkg, old, limits)
    # what the factors probe alone would let through: files PEFT or safetensors read differently, or that
    # do not fit the device's base
    from edge_lora.ota.adapter_check import base_shapes, check_adapter

    folder = probe_base if isinstance(probe_base, (str, os.PathLike)) and Path(probe_base).is_dir() else None
    check_adapter(files, base_shapes(folder) if folder is not None else None)
    report["payload"] = f"{len(files)} files, sizes and sha256 ok"
    report["_files"], report["_pkg"], report["_state"] = files, pkg, state
    if run_probe:
        with tempfile.TemporaryDirectory(prefix="edge-lora-probe-") as tmp:
            for name, data in files.items():
                (Path(tmp) / name).write_bytes(data)
            report["probes"] = run_probes(m["probes"], files, Path(tmp), probe_base, probe_export)
    return report


# --------------------------------------------------------------------------------------------- install
@contextlib.contextmanager
def _locked(root: Path):
    """ROOT/.lock, held by every mutation of the root (install, rollback): one lock, so that an installer that
    created an adapter folder can remove it again on failure without another one being inside it."""
    path = Path(root) / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(0, "not a regular file")
    except OSError as exc:
        raise InstallRootError(f"{path} cannot be used as the install root's lock file ({exc.strerror or exc}); "
                               "it must be a regular file (or absent). Remove it if nothing is installing.") from exc
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)
        except ImportError:  # not POSIX: single installer assumed
            pass
        yield
    finally:
        os.close(fd)


def _write_new(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _rm(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _collect_garbage(adir: Path, state: dict | None) -> None:
    """Remove what a killed or finished install left: staging folders, temp pointers, unreferenced versions."""
    keep = {str(state["version"]), str(state["previous"])} if state else set()
    for p in adir.iterdir():
        if p.name.startswith((".staging-", f".{POINTER}.tmp-")):
            _rm(p)
    vroot = adir / VERSIONS
    if vroot.is_dir() and not vroot.is_symlink():
        for p in vroot.iterdir():
            if p.name not in keep:
                _rm(p)


def _write_pointer(adir: Path, adapter_id: str, version: int, previous: int | None, highest: int) -> None:
    state = {"format": STATE_FORMAT, "adapter_id": adapter_id, "version": version, "previous": previous,
             "highest": highest}
    write_atomic(adir / POINTER, json.dumps(state, indent=1).encode() + b"\n")


def _record_base(root: Path, content_hash: str, base, probe_base, export, probe_export) -> None:
    if base is None and export is None:
        return
    rec = root / BASE_FILE
    try:
        old = json.loads(rec.read_text()) if rec.is_file() else {}
        old = old if isinstance(old, dict) else {}
    except (OSError, ValueError):
        old = {}
    new = dict(old)
    if base is not None and old.get("content_hash") != content_hash:
        new.update(content_hash=content_hash, source=str(probe_base or base))
    if export is not None:
        new["export"] = str(probe_export)
    if new != old:
        write_atomic(rec, json.dumps(new, indent=1).encode() + b"\n")


def install(source, public_key, root, base=None, limits: Limits = DEFAULT_LIMITS, export=None) -> dict:
    """Verify and install a package under ``root``. Returns a report. On any error the root is unchanged
    (apart from leftovers of earlier killed installs, which are collected). ``export``: the device's hot-swap
    ONNX export folder for ort probes (recorded in ROOT/base.json after a successful install; later installs
    use the recorded one)."""
    root = Path(root)
    if not root.is_dir():
        raise InstallRootError(f"Install root {root} does not exist; create it first (mkdir -p {root}).")
    probe_base = None
    if base is not None and not _HEX64.fullmatch(str(base)):
        from edge_lora.base import resolve_base

        probe_base = resolve_base(str(base))
    if base is None:
        device_base_hash(root, None)  # raises when no base is known for this root: nothing is checked yet
    probe_export = device_export(root, export)
    rep = verify_package(source, public_key, root, base, limits, run_probe=False, probe_base=probe_base)
    pkg, files = rep.pop("_pkg"), rep.pop("_files")
    m, aid, version = pkg.manifest, pkg.manifest["adapter_id"], pkg.manifest["version"]
    staging = committing = None
    created = False
    with _locked(root):   # the clean-up below runs under the lock too: nobody else is inside a folder it removes
        try:
            adir = _adapter_dir(root, aid)
            created = not adir.exists()
            adir.mkdir(exist_ok=True)
            state = read_state(root, aid)
            if state != rep.pop("_state"):  # another installer ran meanwhile: check again
                check_against_device(pkg, state, None)
                if pkg.is_delta:
                    raise DeltaError(f"{pkg.path}: the installed version changed while verifying; run again.")
            (_no_link(adir / VERSIONS, "the versions folder")).mkdir(exist_ok=True)
            _collect_garbage(adir, state)
            staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=adir))
            os.chmod(staging, 0o755)
            for name, data in files.items():
                _write_new(staging / name, data)
            _write_new(staging / "manifest.json", pkg.manifest_bytes)
            _write_new(staging / "manifest.sig", pkg.signature)
            fsync_dir(staging)
            staged = {}  # probe what is on disk, not what is in memory
            for f in m["payload"]["files"]:
                data = (staging / f["name"]).read_bytes()
                if codec.sha256(data) != f["sha256"]:
                    raise InstallRootError(f"{staging / f['name']} reads back different bytes than were written; "
                                           "the storage is failing. Nothing was switched.")
                staged[f["name"]] = data
            rep["probes"] = run_probes(m["probes"], staged, staging, probe_base, probe_export)
            # the base record before the commit: a kill after the pointer write must not lose it (re-running the
            # same install is then refused as a replay)
            _record_base(root, m["base"]["content_hash"], base, probe_base, export, probe_export)
            vdir = adir / VERSIONS / str(version)
            os.rename(staging, vdir)
            staging, committing = None, vdir   # until the pointer names it, vdir is an orphan to remove
            fsync_dir(adir / VERSIONS)
            fsync_dir(adir)
            previous = state["version"] if state else None
            _write_pointer(adir, aid, version, previous, version)
            created, committing = False, None
            new_state = read_state(root, aid)
            _collect_garbage(adir, new_state)
        except BaseException as exc:
            if staging is not None and staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
            if committing is not None:
                shutil.rmtree(committing, ignore_errors=True)
            if created:
                shutil.rmtree(adir, ignore_errors=True)
            if isinstance(exc, OSError):   # a full disk, a read-only root: the device's problem, said plainly
                raise InstallRootError(f"installing {pkg.path} into {root} failed: {exc.strerror or exc} "
                                       f"({getattr(exc, 'filename', None) or 'the install root'}). Nothing was "
                                       "switched; free space or fix the root and install again.") from exc
            raise
    rep.update(installed=str(adir / VERSIONS / str(version)), previous=previous)
    return rep


# ------------------------------------------------------------------------------------- rollback / list
def rollback(root, adapter_id: str, to: int | None = None, public_key=None, base=None, export=None) -> dict:
    """Switch ``current`` back to the kept previous version (or ``to``), after checking its files (and its
    signature, given the public key) and running its probes. ``highest`` stays, so the rolled-back-from version
    cannot be installed again by package: publish a higher one."""
    root = Path(root)
    state = read_state(root, adapter_id)
    if state is None:
        raise InstallRootError(f"{adapter_id} is not installed under {root}; nothing to roll back.")
    adir = _adapter_dir(root, adapter_id)
    with _locked(root):
        state = read_state(root, adapter_id)
        target = to if to is not None else state["previous"]
        if target is None or target == state["version"]:
            raise InstallRootError(f"{adapter_id}: no other version is kept to roll back to (current "
                                   f"{state['version']}, previous {state['previous']}).")
        if target > state["highest"]:
            raise InstallRootError(f"{adapter_id}: version {target} was never completely installed (an install "
                                   "was interrupted before it switched to it); the next install removes it. Roll "
                                   f"back to {state['previous']} or install a package.")
        if not version_dir(root, adapter_id, target).is_dir():
            raise InstallRootError(f"{adapter_id}: version {target} is not installed under {root}; kept: "
                                   f"{state['version']} and {state['previous']}.")
        vdir = version_dir(root, adapter_id, target)
        manifest = installed_manifest(root, adapter_id, target)
        base_hash, base_src = device_base_hash(root, base)
        if manifest["base"]["content_hash"] != base_hash:
            raise BaseMismatchError(
                f"{adapter_id}: version {target} was built for base model {manifest['base']['content_hash'][:16]}… "
                f"but this device's base is {base_hash[:16]}… (from {base_src}); rolling back to it would run an "
                "adapter on the wrong base. Install a version built for this base instead.")
        if public_key is not None:
            from edge_lora.ota.manifest import verify_signature

            verify_signature(public_key, (vdir / "manifest.json").read_bytes(),
                             (vdir / "manifest.sig").read_bytes(), str(vdir))
        read = installed_reader(root, adapter_id, target)
        files = {f["name"]: read(f["name"]) for f in manifest["payload"]["files"]}
        probe_base = None
        if base is not None:
            from edge_lora.base import resolve_base

            probe_base = resolve_base(str(base))
        probes = run_probes(manifest["probes"], files, vdir, probe_base, device_export(root, export))
        _collect_garbage(adir, state)   # what a killed install or rollback left (its temporary pointer)
        try:
            _write_pointer(adir, adapter_id, target, state["version"], state["highest"])
        except OSError as exc:   # the pointer is replaced atomically: on failure the old one stands
            raise InstallRootError(f"rolling {adapter_id} back in {root} failed: {exc.strerror or exc}; version "
                                   f"{state['version']} is still current. Free space and run it again.") from exc
    return {"adapter_id": adapter_id, "version": target, "from": state["version"], "probes": probes}


def list_installed(root) -> list[dict]:
    root = Path(root)
    out = []
    if not root.is_dir():
        raise InstallRootError(f"Install root {root} does not exist.")
    for adir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            state = read_state(root, adir.name)
        except PackageError as exc:
            out.append({"adapter_id": adir.name, "error": str(exc)})
            continue
        if state is None:
            continue
        row = dict(state)
        row.pop("format", None)
        vroot = adir / VERSIONS
        row["kept"] = sorted(int(p.name) for p in vroot.iterdir() if p.name.isdigit()) if vroot.is_dir() else []
        try:
            check_installed(root, adir.name)
            row["status"] = "ok"
            built_for = installed_manifest(root, adir.name, state["version"])["base"]["content_hash"]
            if (root / BASE_FILE).is_file() and built_for != device_base_hash(root)[0]:
                row["status"] = (f"wrong base: version {state['version']} is built for {built_for[:16]}…, not "
                                 "this device's base; install a version built for it")
        except PackageError as exc:
            row["status"] = f"damaged: {exc}"
        out.append(row)
    return out


__all__ = [
    "FormatError",
    "check_installed",
    "device_base_hash",
    "device_export",
    "install",
    "list_installed",
    "read_state",
    "rollback",
    "verify_package",
]
