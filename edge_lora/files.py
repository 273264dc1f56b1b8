"""The only atomic writers, and the one safetensors header reader. Standard library only: the device side
(``runtimes/``, ``ota/``) imports this too.

Writers leave the old file (or folder) or the new one after a crash, never half of one: temp file or folder in
the same directory, fsync, ``os.replace``, fsync the directory (the rename itself is only durable then).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def replace_folder(tmp: Path, out: Path) -> None:
    """fsync every file and folder in ``tmp``, move it to ``out`` (an existing ``out`` is swapped out and
    removed), then fsync the parent: without that last step a power cut can undo the rename."""
    tmp, out = Path(tmp), Path(out)
    for f in tmp.rglob("*"):
        if f.is_file() and not f.is_symlink():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        elif f.is_dir():
            fsync_dir(f)
    fsync_dir(tmp)
    if out.exists() or out.is_symlink():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        fsync_dir(out.parent)
        _remove(old)
    else:
        os.replace(tmp, out)
        fsync_dir(out.parent)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's process: alive
        return True
    return True


def temp_folder_beside(out: str | os.PathLike) -> Path:
    """A new empty hidden folder in ``out``'s parent (same file system, so renaming it to ``out`` is atomic),
    named with this process's id; what a killed run for the same ``out`` left (its process is gone) is removed
    first."""
    from edge_lora.errors import EdgeLoraError

    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if not out.parent.is_dir():
            raise NotADirectoryError(20, "Not a directory", str(out.parent))
    except OSError as exc:
        raise EdgeLoraError(f"cannot write the output {out}: its folder {out.parent} cannot be created "
                            f"({exc.strerror or exc}); choose an --out inside a folder you can write.") from None
    stale = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-(\d+)(-.*)?")
    try:
        for p in out.parent.iterdir():
            m = stale.fullmatch(p.name)
            if m and int(m.group(2)) != os.getpid() and not _alive(int(m.group(2))):
                _remove(p)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    except OSError as exc:   # a read-only or full file system, a folder this user cannot write
        raise EdgeLoraError(f"cannot write the output {out}: no folder can be created in {out.parent} "
                            f"({exc.strerror or exc}); free space there or choose another --out.") from None


@contextmanager
def atomic_folder(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; when the block succeeds it becomes ``out``."""
    out = Path(out)
    tmp = temp_folder_beside(out)
    try:
        yield tmp
        replace_folder(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def fsync_dir(folder: str | os.PathLike) -> None:
    """fsync a directory, so a rename inside it survives a power cut (a no-op where the OS cannot)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_and_replace(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """fsync the finished temp file ``tmp``, rename it over ``path``, fsync the directory."""
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def write_bytes_atomic(path: str | os.PathLike, data: bytes, mode: int = 0o644) -> Path:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new one: temp file in the same
    folder, fsync, rename, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, mode)   # mkstemp's 0600 would make a shipped file unreadable to other users
        fsync_and_replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode())


@contextmanager
def atomic_file(path: str | os.PathLike, mode: int = 0o644) -> Iterator[Path]:
    """Yield a free temporary path beside ``path`` for a tool that writes a file by name (ONNX Runtime,
    llama.cpp, onnx.save); when the block succeeds the file is fsynced and renamed over ``path``, else removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=".partial", dir=path.parent)
    os.close(fd)
    os.unlink(tmp)   # the tool creates it (some refuse to overwrite)
    try:
        yield Path(tmp)
        if not os.path.isfile(tmp):
            raise FileNotFoundError(f"{tmp} was not written")
        os.chmod(tmp, mode)
        fsync_and_replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ------------------------------------------------------------------------------------------ safetensors
SAFETENSORS_MAX_HEADER = 100 << 20   # a real header is a few KB per tensor; refuse to parse a giant one


class SafetensorsHeaderError(ValueError):
    """The bytes are not a safetensors file (callers turn this into their own EdgeLoraError)."""


def parse_safetensors_header(data: bytes, size: int | None = None) -> tuple[int, dict, dict]:
    """(header length n, {tensor: {"dtype", "shape", "data_offsets"}}, metadata) of a safetensors file, from
    its first 8 + n bytes (``data`` may hold more). ``size``: the file's total size, to check the header fits."""
    size = len(data) if size is None else size
    if len(data) < 8:
        raise SafetensorsHeaderError("shorter than the 8-byte header length")
    n = int.from_bytes(data[:8], "little")
    if n > size - 8 or n > SAFETENSORS_MAX_HEADER:
        raise SafetensorsHeaderError(f"declares a {n}-byte header in a {size}-byte file")
    if len(data) < 8 + n:
        raise SafetensorsHeaderError(f"declares a {n}-byte header but only {len(data) - 8} bytes follow")
    try:
        header = json.loads(data[8:8 + n])
    except (ValueError, UnicodeDecodeError) as exc:
        raise SafetensorsHeaderError(f"its header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise SafetensorsHeaderError("its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise SafetensorsHeaderError("its __metadata__ is not a JSON object")
    return n, header, metadata


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, dict]:
    """({tensor: {"dtype", "shape", "data_offsets"}}, metadata) of a safetensors file on disk, reading the
    8-byte length and the JSON header only (no tensor bytes). Raises SafetensorsHeaderError, OSError."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        data = head + fh.read(min(n, SAFETENSORS_MAX_HEADER))
    _, header, metadata = parse_safetensors_header(data, size)
    return header, metadata
