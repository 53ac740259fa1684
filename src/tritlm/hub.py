"""Model references, resolved in one place before anything loads: a local path as it is, or a
Hugging Face Hub id, `org/repo` or `org/repo:FILE-OR-QUANT`, fetched through huggingface_hub
into its standard cache (HF_HOME, shared with other tools; its progress bars, resumed
downloads, HF_TOKEN or the saved login for gated repos).

From a repo with GGUF files one file is fetched: the only one, or the one named by file name or
by a type tag such as `i2_s` or `tq2_0`. From a Hugging Face checkpoint, only what loading reads:
config, weights and their index, tokenizer and chat template files, sentence-transformers
pooling settings; never optimizer states or other formats.

Every LFS weight file's sha256 is checked against the Hub's record before its first use; a
mismatch deletes the file. A file that passed is remembered (its size and mtime, in
HF_HOME/tritlm/verified/), so it is hashed once. With `offline` (or HF_HUB_OFFLINE=1) nothing
reaches the network: a cached model loads, an uncached one is an error saying how to fetch it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from pathlib import Path

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# what loading a Hugging Face directory reads besides the weights (formats/hf.py, tokenizer.py),
# and sentence-transformers' module list and pooling settings
HF_FILES = ("config.json", "model.safetensors.index.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "modules.json",
            "config_sentence_transformers.json", "sentence_bert_config.json")
_POOLING = re.compile(r"\d+_Pooling/config\.json")


def parse_reference(ref: str) -> tuple[str, str | None] | None:
    """`org/repo[:FILE-OR-QUANT]` -> (repo id, selector or None); None if `ref` is not one."""
    repo, colon, selector = ref.partition(":")
    if not _REPO_ID.fullmatch(repo) or (colon and not selector):
        return None
    return repo, selector or None


def resolve_model(model: str | os.PathLike | None, *, revision: str | None = None,
                  offline: bool = False) -> str | None:
    """The local path of `model`: a path that exists as it is (it always wins over a Hub id), a Hub
    id fetched or found in the cache (`fetch`). None stays None (the caller's default model);
    anything else is returned unchanged, for loading to name the missing file."""
    if model is None:
        return None
    text = os.fspath(model)
    if os.path.exists(text) or parse_reference(text) is None:
        return text
    return fetch(text, revision=revision, offline=offline)


def fetch(ref: str, *, filename: str | None = None, revision: str | None = None,
          offline: bool = False) -> str:
    """The local path of Hub model `ref` (`org/repo[:FILE-OR-QUANT]`; or `filename` picks the GGUF
    file): a GGUF file, or the snapshot directory of a Hugging Face checkpoint, downloaded into
    the Hub cache unless it is there, its weights' sha256 checked. revision: a branch, tag or
    commit (default main). offline, or HF_HUB_OFFLINE=1: the cache only."""
    parsed = parse_reference(ref)
    if parsed is None:
        raise ValueError(f"{ref!r} is not a Hub model id: give org/repo or org/repo:FILE-OR-QUANT")
    repo, selector = parsed
    if filename and selector and filename != selector:
        raise ValueError(f"{ref}: the file is given twice ({selector!r} and filename={filename!r})")
    selector = filename or selector
    from huggingface_hub import HfApi, errors

    if offline or _offline_env():
        return _from_cache(ref, repo, selector, revision, "offline mode is on")
    try:
        info = HfApi().model_info(repo, revision=revision, files_metadata=True)
    except errors.RevisionNotFoundError:
        raise ValueError(f"{repo} has no revision {revision!r} on the Hub") from None
    except errors.GatedRepoError:
        raise ValueError(f"{repo} is gated: accept its terms on its Hub page, then log in "
                         "(`hf auth login`) or set HF_TOKEN") from None
    except errors.RepositoryNotFoundError:
        raise ValueError(f"{ref}: no such local file, nor a model repo on the Hub (if it is private, "
                         "log in with `hf auth login` or set HF_TOKEN)") from None
    except Exception as e:  # no network, the Hub down, ...: the cache may have it
        return _from_cache(ref, repo, selector, revision, f"the Hub could not be reached ({_line(e)})")
    try:
        return _download(info, repo, selector, revision)
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"{ref}: download failed ({_line(e)}); run the command again to retry") from None


def _download(info, repo: str, selector: str | None, revision: str | None) -> str:
    from huggingface_hub import hf_hub_download, snapshot_download

    files = {s.rfilename: s for s in info.siblings or []}
    expected = {name: s.lfs.sha256 for name, s in files.items() if s.lfs}
    ggufs = sorted(f for f in files if f.lower().endswith(".gguf"))
    if ggufs:
        name = choose_gguf(repo, ggufs, selector, {f: files[f].size for f in ggufs})
        path = hf_hub_download(repo, name, revision=revision)
        _verify(Path(path), expected.get(name), f"{repo}/{name}")
        return path
    if selector:
        raise ValueError(f"{repo} has no GGUF file to pick {selector!r} from")
    if "config.json" not in files:
        raise ValueError(f"{repo} holds neither a GGUF file nor a Hugging Face checkpoint (config.json)")
    if "model.safetensors.index.json" in files:  # the shards its index names, nothing else
        index = hf_hub_download(repo, "model.safetensors.index.json", revision=revision)
        with open(index, encoding="utf-8") as f:
            weights = sorted(set(json.load(f).get("weight_map", {}).values()))
    else:
        weights = [f for f in ("model.safetensors",) if f in files]
    if not weights:
        raise ValueError(f"{repo} has no safetensors weights (model.safetensors or its index)")
    wanted = [f for f in files if f in HF_FILES or _POOLING.fullmatch(f)] + weights
    snapshot = snapshot_download(repo, revision=revision, allow_patterns=[glob.escape(f) for f in wanted])
    for path in weight_files(snapshot):
        _verify(path, expected.get(path.name), f"{repo}/{path.name}")
    return snapshot


def _from_cache(ref: str, repo: str, selector: str | None, revision: str | None, why: str) -> str:
    """The model from the Hub cache alone, its weights checked against the sha256 the Hub gave
    each blob its name by (if the verification at download time did not record them)."""
    snapshot = _cached_snapshot(repo, revision)
    if snapshot is None:
        at = f" at {revision}" if revision else ""
        raise ValueError(f"{repo}{at} is not in the Hub cache ({cache_dir()}) and {why}: fetch it with "
                         f"`tritlm pull {ref}{' --revision ' + revision if revision else ''}` where the Hub "
                         "can be reached (no local file by that name either)")
    ggufs = sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.suffix.lower() == ".gguf")
    if ggufs:
        path = snapshot / choose_gguf(repo, ggufs, selector, cached=True)
    elif selector:
        raise ValueError(f"{repo}: no GGUF file in the cache to pick {selector!r} from")
    else:
        path = snapshot
    for file in weight_files(path):
        _verify(file, None, f"{repo}/{file.relative_to(snapshot).as_posix()}")
    return str(path)


def _cached_snapshot(repo: str, revision: str | None) -> Path | None:
    """The cache's snapshot folder of `repo` at `revision`, by the cache's layout: refs/<branch>
    holds the commit, snapshots/<commit>/ the files."""
    storage = Path(cache_dir()) / ("models--" + repo.replace("/", "--"))
    revision = revision or "main"
    commit = revision if _COMMIT.fullmatch(revision) else None
    ref = storage / "refs" / revision
    if commit is None and ref.is_file():
        commit = ref.read_text().strip()
    snapshot = storage / "snapshots" / commit if commit else None
    return snapshot if snapshot is not None and snapshot.is_dir() else None


def choose_gguf(repo: str, candidates: list[str], selector: str | None,
                sizes: dict[str, int | None] | None = None, cached: bool = False) -> str:
    """The GGUF file `selector` names, by file name (or its path in the repo) or by type tag
    (`i2_s` matches `ggml-model-i2_s.gguf`), case-insensitive; without one, the only candidate."""
    def listing(names):
        return ", ".join(f"{n} ({human_size(sizes[n])})" if sizes and sizes.get(n) else n for n in names)
    where = "cached GGUF files" if cached else "GGUF files"
    if selector is None:
        if len(candidates) == 1:
            return candidates[0]
        raise ValueError(f"{repo} has several {where}: {listing(candidates)}; choose one with "
                         f"{repo}:FILE or a type such as {repo}:i2_s")
    s = selector.lower()
    tag = re.compile(rf"(?:^|[-._]){re.escape(s)}(?:$|[-._])")
    matches = ([c for c in candidates if s in (c.lower(), c.lower().rsplit("/", 1)[-1])]
               or [c for c in candidates if tag.search(Path(c.lower()).stem)])
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ValueError(f"{repo}: {selector!r} matches several GGUF files: {listing(matches)}; "
                         f"give the file name, {repo}:FILE")
    hint = f"; fetch it with `tritlm pull {repo}:{selector}`" if cached else ""
    raise ValueError(f"{repo}: no {where[:-1]} matches {selector!r}; there are: {listing(candidates)}{hint}")


# ------------------------------------------------------------------------------- integrity


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The weight files of a model: the GGUF file itself, or a directory's safetensors files."""
    path = Path(path)
    return sorted(path.glob("*.safetensors")) if path.is_dir() else [path]


def sha256_file(path: str | os.PathLike) -> str:
    """The file's sha256 (hex), with a progress bar on a terminal: large files take seconds."""
    from tqdm import tqdm

    digest = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=os.path.getsize(path), unit="B", unit_scale=True, leave=False,
                                     desc=f"sha256 {os.path.basename(path)}", disable=None) as bar:
        while chunk := f.read(1 << 23):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _verify(path: Path, expected: str | None, label: str) -> None:
    """Check a cached weight file against the Hub's sha256 (`expected`, from the repo's file
    metadata; else its blob's name, which the Hub's ETag for an LFS file is), once per blob."""
    blob = path.resolve()
    expected = expected or (blob.name if _SHA256.fullmatch(blob.name) else None)
    if expected is None:
        return  # not an LFS file: the Hub records no sha256 for it
    stat = blob.stat()
    stamp = f"{stat.st_size} {stat.st_mtime_ns}"
    record = Path(_hf_home()) / "tritlm" / "verified" / expected
    if record.is_file() and record.read_text() == stamp:
        return
    actual = sha256_file(path)
    if actual != expected:
        path.unlink(missing_ok=True)
        blob.unlink(missing_ok=True)
        raise ValueError(f"{label}: sha256 {actual} is not the Hub's {expected}: the download is "
                         "corrupt and was deleted; run the command again to download it again")
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(stamp)
    except OSError:
        pass  # a read-only cache: it is checked again next time


# ----------------------------------------------------------------------------- the cache


def cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _hf_home() -> str:
    from huggingface_hub import constants

    return constants.HF_HOME


def _offline_env() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def model_name(path: str) -> str:
    """`org/repo` for a file or snapshot in the Hub cache (models--org--repo/snapshots/...),
    else the file or directory name."""
    parts = Path(path).parts
    for part, next_part in zip(parts, parts[1:]):
        if part.startswith("models--") and next_part == "snapshots":
            return part.removeprefix("models--").replace("--", "/")
    return os.path.basename(path.rstrip("/"))


def human_size(n: int) -> str:
    for unit, scale, digits in (("GB", 1e9, 2), ("MB", 1e6, 1), ("kB", 1e3, 1)):
        if n >= scale:
            return f"{n / scale:.{digits}f} {unit}"
    return f"{n} B"


def _line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
