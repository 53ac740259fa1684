"""Memory-mapped weights (`Engine(mmap=True)`, `--mmap`): the engine's arena kept in a file.

The huge-page arena is filled at every load (each tensor read from the model file and packed into
the kernels' tiles) and lives in the process's memory. With mmap the engine fills the same arena
once, into a cache file, and from then on maps that file read-only: a warm start reads no
weight, and the weights stream from the page cache, which the kernel may evict and read back, so
a model larger than the memory still runs (at the disk's speed).

The cache file: b"TRITLMW1", a little-endian uint32 n, n bytes of JSON header, zeros up to
DATA_ALIGN; the arena, byte for byte what the huge-page arena would hold (the float head and
embedding, then every packed matrix, each at a 64-byte-aligned offset); zeros up to a multiple of
64; the matrices' float32 row scales, in the order they were packed. The header records what
the bytes were made from (`expected_header`); anything different, a size that is not the one
the header implies, or an unreadable header, and the cache is rebuilt, never used.

It is written through a writable map of a temporary file in the same directory, synced, then
renamed into place (`os.replace`): a killed process leaves at most a stray `*.tmp`, never a half
file under the trusted name, and a process that already maps the old file keeps its own copy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import tempfile
import warnings
from pathlib import Path

import numpy as np

from .. import __version__

FORMAT_VERSION = 1  # of the file and of the arena's contents: bump when either changes
MAGIC = b"TRITLMW1"
DATA_ALIGN = 4096  # the arena starts on a page of its own
MAX_HEADER = 1 << 20
# the source's fingerprint: its header (GGUF metadata and tensor table) and SAMPLES chunks of
# SAMPLE_BYTES spread over its data, or all of it when that is no more
SAMPLES, SAMPLE_BYTES = 64, 1 << 16


def cache_dir() -> Path:
    """Where a cache goes when the model's own directory is not writable: $XDG_CACHE_HOME/tritlm/
    weights (default ~/.cache/tritlm/weights). A directory of tritlm's own, not the Hub cache:
    that one's layout belongs to huggingface_hub, whose scan and delete commands would not know
    these files, and a model need not come from the Hub."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "tritlm" / "weights"


def candidate_paths(source: str, layouts: list[str]) -> list[Path]:
    """Where the cache of `source` in `layouts` may be, in the order tried: beside the model,
    then in `cache_dir()`. The name holds the model's file name, a key of its full path and the
    layouts (two models, or two layouts of one, never share a file), the layouts and the format
    version; what the file was built from is checked in its header."""
    key = hashlib.sha256(f"{os.path.realpath(source)}\0{','.join(layouts)}".encode()).hexdigest()[:12]
    name = f"{os.path.basename(source)}.{key}.{'+'.join(sorted(set(layouts)))}.v{FORMAT_VERSION}.tritlm-weights"
    return [Path(source).parent / name, cache_dir() / name]


def fingerprint(path: str, header_end: int) -> dict:
    """What identifies the source's bytes, cheaply: its size and mtime_ns (any ordinary change),
    and a sha256 of its first `header_end` bytes (the GGUF metadata and tensor table: every shape,
    type and offset) and of SAMPLES chunks spread evenly over the tensor data (a file replaced by
    another of the same size with its mtime restored). Hashing all of a 17 GB file would take
    minutes at every start; a change confined to bytes between the samples goes unseen."""
    with open(path, "rb") as f:
        stat = os.fstat(f.fileno())
        digest = hashlib.sha256()
        data = stat.st_size - header_end
        if data <= SAMPLES * SAMPLE_BYTES:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        else:
            digest.update(f.read(header_end))
            for i in range(SAMPLES):
                f.seek(header_end + (data - SAMPLE_BYTES) * i // (SAMPLES - 1))
                digest.update(f.read(SAMPLE_BYTES))
    return {"path": os.path.realpath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "sha256": digest.hexdigest()}


def _aligned(n: int, to: int) -> int:
    return -(-n // to) * to


def expected_header(source: str, header_end: int, layouts: list[str], config, arena_nbytes: int,
                    n_scales: int) -> dict:
    """The header a valid cache of this source, layout and model has (as read back from JSON)."""
    header = {"format": FORMAT_VERSION, "tritlm": __version__, "source": fingerprint(source, header_end),
              "layouts": list(layouts), "config": dataclasses.asdict(config),
              "arena_nbytes": arena_nbytes, "n_scales": n_scales}
    return json.loads(json.dumps(header))  # (tuples become lists, as they will read back)


def _layout(header: dict) -> tuple[int, int, int, int]:
    """(header bytes, arena offset, scales offset, file size) of a cache with this header."""
    text = json.dumps(header, sort_keys=True).encode()
    data = _aligned(len(MAGIC) + 4 + len(text), DATA_ALIGN)
    scales = _aligned(data + header["arena_nbytes"], 64)
    return len(text), data, scales, scales + 4 * header["n_scales"]


def _read_header(f) -> dict:
    """The header of an open cache file; ValueError if it has none."""
    start = f.read(len(MAGIC) + 4)
    if len(start) < len(MAGIC) + 4 or start[: len(MAGIC)] != MAGIC:
        raise ValueError("not a tritlm weight cache, or of another format version")
    (n,) = struct.unpack("<I", start[len(MAGIC):])
    text = f.read(n) if n <= MAX_HEADER else b""
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, ValueError):
        header = None
    if not isinstance(header, dict):
        raise ValueError("its header is unreadable")
    return header


def _problem(header: dict, expected: dict, file_size: int) -> str | None:
    """Why a cache with `header` and `file_size` cannot stand for `expected`, or None."""
    for key, want in expected.items():
        have = header.get(key)
        if key == "source" and isinstance(have, dict) and have != want:
            changed = [k for k in want if have.get(k) != want[k]]
            return f"the model file's {', '.join(changed)} changed since it was written"
        if have != want:
            return f"its {key} is {str(have)[:80]}, not {str(want)[:80]}"
    if file_size != _layout(expected)[3]:
        return f"it is {file_size} bytes, not {_layout(expected)[3]}"
    return None


def _open(path: Path, expected: dict) -> tuple[np.ndarray, np.ndarray] | str:
    """(arena bytes, row scales), read-only maps of a valid cache at `path`; else why not."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            try:
                problem = _problem(_read_header(f), expected, size)
            except ValueError as e:
                problem = str(e)
            if problem:
                return problem
            # mapped from the file just checked (one opened by name now could be a newer one);
            # the map is exactly the size checked, so nothing reads past the file
            whole = np.memmap(f, dtype=np.uint8, mode="r", shape=(size,))
    except OSError as e:
        return f"it cannot be read ({e.strerror or e})"
    _, data, scales, end = _layout(expected)
    return whole[data : data + expected["arena_nbytes"]], whole[scales:end].view(np.float32)


def _reserve(path: Path, nbytes: int) -> tuple[int, str]:
    """A new temporary file of `nbytes` beside `path`: (descriptor, name). OSError where that
    directory cannot take it (not writable, a read-only file system, no room)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        # the blocks reserved first: a full disk is an OSError here, not a SIGBUS in the map
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, nbytes)
        else:
            os.ftruncate(fd, nbytes)
    except BaseException:
        os.close(fd)
        os.unlink(temporary)
        raise
    return fd, temporary


def _write(fd: int, temporary: str, path: Path, expected: dict, fill) -> None:
    """Fill the reserved file: the header, then fill(arena bytes, row scales) fills writable maps
    of it; then sync it and rename it to `path` (removed instead if anything fails)."""
    header_bytes, data, scales, end = _layout(expected)
    try:
        with os.fdopen(fd, "r+b") as f:
            whole = np.memmap(f, dtype=np.uint8, mode="r+", shape=(end,))
            text = json.dumps(expected, sort_keys=True).encode()
            whole[: len(MAGIC) + 4 + header_bytes] = np.frombuffer(
                MAGIC + struct.pack("<I", header_bytes) + text, np.uint8)
            fill(whole[data : data + expected["arena_nbytes"]], whole[scales:end].view(np.float32))
            whole.flush()  # (msync: every byte on disk before the name says it is complete)
            del whole
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), 0o644)  # (mkstemp's 0600 would hide it from other users of the model)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def mapped(source: str, header_end: int, layouts: list[str], config, arena_nbytes: int, n_scales: int,
           fill) -> tuple[np.ndarray, np.ndarray, Path]:
    """Read-only maps of the arena bytes and row scales of `source`'s weights in `layouts` (see the
    module's docstring), and the cache file's path. A valid cache beside the model or in
    `cache_dir()` is used as it is; else one is written (the first of those places that takes it)
    by fill(arena bytes, row scales), which fills writable maps exactly as the arena would be
    filled. A stale or damaged cache is rebuilt with a warning."""
    expected = expected_header(source, header_end, layouts, config, arena_nbytes, n_scales)
    problems = []
    for path in candidate_paths(source, layouts):
        if os.path.exists(path):
            opened = _open(path, expected)
            if not isinstance(opened, str):
                return (*opened, path)
            problems.append(f"{path}: {opened}")
    for problem in problems:
        warnings.warn(f"weight cache {problem}; rebuilding it", stacklevel=3)
    failures = []
    for path in candidate_paths(source, layouts):
        try:
            fd, temporary = _reserve(path, _layout(expected)[3])
        except OSError as e:
            failures.append(f"{path.parent}: {e.strerror or e}")
            continue
        _write(fd, temporary, path, expected, fill)
        opened = _open(path, expected)
        if isinstance(opened, str):
            raise ValueError(f"weight cache {path}: {opened} right after it was written")
        return (*opened, path)
    raise ValueError("mmap: no directory takes the weight cache (" + "; ".join(failures) + ")")
