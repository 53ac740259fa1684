"""Opening a model's files safely: names confined to the model directory, JSON whose every
problem is a ValueError, memory maps whose closing never masks an error.

Error messages name the file and the problem, never quote the file's bytes: a hostile model
could otherwise make tritlm print parts of a file it was tricked into opening."""

from __future__ import annotations

import json
import mmap
import os

MAX_JSON = 100 << 20  # bytes: safetensors' own header limit, far above any config or index


def model_file(directory: str | os.PathLike, name) -> str:
    """`directory`/`name` if it is a regular file inside the directory once every symlink is
    resolved, else ValueError. `name` comes from the model's own files (an index names its
    shards), so an absolute name, a ".." or a symlink leading out is refused. One exception:
    in the Hugging Face hub cache, files of `snapshots/<revision>/` link to `../../blobs/`."""
    directory = os.fspath(directory)
    if not isinstance(name, str) or not name or "\0" in name or os.path.isabs(name) \
            or ".." in name.replace("\\", "/").split("/"):
        raise ValueError(f"{directory}: {_short(name)} is not the name of a file in the model directory")
    path = os.path.join(directory, name)
    root = os.path.realpath(directory)
    roots = [root]
    if os.path.basename(os.path.dirname(root)) == "snapshots":
        roots.append(os.path.join(os.path.dirname(os.path.dirname(root)), "blobs"))
    real = os.path.realpath(path)
    if not any(os.path.commonpath([real, r]) == r for r in roots):
        raise ValueError(f"{path} leads outside the model directory")
    if not os.path.isfile(path):  # (not `real`: "shard/" must not be read as "shard")
        raise ValueError(f"{path}: no such file")
    return path


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"


def parse_json(data: bytes, what: str):
    """`data` parsed as JSON; any problem is a ValueError naming `what` and where it is."""
    try:
        return json.loads(data)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} is not valid JSON: not UTF-8 at byte {e.start}") from None
    except RecursionError:
        raise ValueError(f"{what} is not valid JSON for tritlm: nested too deeply") from None


def read_json(path: str) -> object:
    with open(path, "rb") as f:
        data = f.read(MAX_JSON + 1)
    if len(data) > MAX_JSON:
        raise ValueError(f"{path}: larger than {MAX_JSON >> 20} MiB, too large for a model's JSON file")
    return parse_json(data, path)


def close_map(m: mmap.mmap) -> None:
    """Close a memory map, unless arrays handed out still view it: then it closes when the last
    of them goes. Never raises (a close on the way out of an error must not replace it)."""
    try:
        m.close()
    except BufferError:
        pass
