"""A full disk at every point of an install: on a small tmpfs, the install root is filled to every level
between "nothing fits" and "everything fits"; each install either completes or fails with a clean
InstallRootError, and the root always holds a complete current version that list, rollback and the next install
accept. Needs permission to mount a tmpfs (root in a container); skipped with the reason otherwise."""

from __future__ import annotations

import os
import subprocess

import pytest
from package_fixtures import ota  # noqa: F401 (fixture)

from edge_lora.ota import InstallRootError, VersionError
from edge_lora.ota.install import check_installed, install, list_installed, read_state


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True,
                         text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({out.stderr.strip() or out.returncode}); the full-disk test needs "
                    "one")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(mnt, leave: int) -> None:
    """Leave ``leave`` bytes free on the tmpfs (a pad file outside the install root takes the rest)."""
    pad = mnt / "pad"
    pad.unlink(missing_ok=True)
    st = os.statvfs(mnt)
    free = st.f_bavail * st.f_frsize
    with open(pad, "wb") as f:
        try:
            f.write(b"\0" * max(free - leave, 0))
        except OSError:
            pass


def test_a_full_disk_at_every_point_leaves_a_working_root(ota, small_disk):   # noqa: F811
    import shutil

    outcomes = {"installed": 0, "refused": 0}
    for leave in range(0, 160 * 1024, 4096):
        root = small_disk / "root"
        shutil.rmtree(root, ignore_errors=True)
        (small_disk / "pad").unlink(missing_ok=True)
        root.mkdir()
        install(ota.v1, ota.pub, root, base=ota.base_hash)
        _fill(small_disk, leave)
        try:
            install(ota.v2, ota.pub, root)
            outcomes["installed"] += 1
            kept = ["1", "2"]
        except InstallRootError as exc:
            assert "Nothing was switched" in str(exc) or "No space" in str(exc), exc
            outcomes["refused"] += 1
            kept = ["1"]   # no orphan version 2 that a rollback --to could switch to
        assert check_installed(root, "tiny-ota") == int(kept[-1]), leave
        assert list_installed(root)[0]["status"] == "ok"
        assert sorted(p.name for p in (root / "tiny-ota" / "versions").iterdir()) == kept, leave
        assert not [p for p in (root / "tiny-ota").iterdir() if p.name.startswith(".staging")], leave
        (small_disk / "pad").unlink()
        try:
            install(ota.v2, ota.pub, root)
        except VersionError:
            pass
        assert read_state(root, "tiny-ota")["version"] == 2 and check_installed(root, "tiny-ota") == 2
    assert outcomes["installed"] and outcomes["refused"], outcomes   # both sides of the edge were reached


def test_a_read_only_root_is_a_clean_error(ota, small_disk):   # noqa: F811
    from edge_lora.ota.install import rollback

    root = small_disk / "root"
    root.mkdir()
    install(ota.v1, ota.pub, root, base=ota.base_hash)
    install(ota.v2, ota.pub, root)
    out = subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    try:
        with pytest.raises(InstallRootError, match="Read-only file system"):
            install(ota.v3, ota.pub, root)
        with pytest.raises(InstallRootError, match="Read-only file system"):
            rollback(root, "tiny-ota")
        assert check_installed(root, "tiny-ota") == 2 and list_installed(root)[0]["status"] == "ok"
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], capture_output=True)


@pytest.mark.parametrize("state", ["full", "read-only"])
def test_writers_onto_a_full_or_read_only_disk_are_clean_errors(ota, small_disk, capsys, state):   # noqa: F811
    """package, keygen and export with --out on a disk that is full or read-only: exit code 2 and one error line
    (each was a traceback), nothing left behind."""
    from edge_lora.cli import main

    if state == "full":
        _fill(small_disk, 0)
    else:
        out = subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], capture_output=True, text=True)
        if out.returncode != 0:
            pytest.skip(f"cannot remount the tmpfs read-only ({out.stderr.strip()})")
    before = sorted(p.name for p in small_disk.iterdir())
    try:
        commands = {
            "package": ["package", ota.a1, "--key", ota.priv_path, "--version", "1", "--base", ota.base,
                        "--probe", "factors", "--out", small_disk / "p.elpkg"],
            "keygen": ["keygen", "--out", small_disk / "k"],
            "export": ["export", "--base", ota.base, "--adapter", ota.a1, "--out", small_disk / "e", "--quiet"],
        }
        for verb, args in commands.items():
            capsys.readouterr()
            code = main([str(a) for a in args])
            err = capsys.readouterr().err
            assert code == 2 and "Traceback" not in err and "error" in err.lower(), (verb, err[-1500:])
            assert sorted(p.name for p in small_disk.iterdir()) == before, (verb, "left files behind")
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], capture_output=True)
