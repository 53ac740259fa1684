"""Training text: files and folders -> documents -> a byte-level BPE -> token streams."""

from __future__ import annotations

import fnmatch
import json
import os
import zlib
from pathlib import Path

import numpy as np

SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
DEFAULT_EXCLUDE = ("*/site-packages/*", "*/__pycache__/*", "*/.*")  # matched against "/" + name


def find_files(paths, include=("*",), exclude=DEFAULT_EXCLUDE) -> list[tuple[Path, str]]:
    """(file, name) of every file under `paths` (files or folders, searched recursively) whose
    file name matches an `include` pattern and whose name matches no `exclude` pattern. A name
    is the path below the folder given ("json/decoder.py"; a file given: its file name), so it
    is the same on every machine. Sorted, so runs repeat."""
    found = {}
    for p in map(Path, paths):
        if p.is_file():
            found[p] = p.name
        elif p.is_dir():
            for root, dirs, names in os.walk(p):
                dirs.sort()
                for name in sorted(names):
                    f = Path(root, name)
                    rel = f.relative_to(p).as_posix()
                    if (any(fnmatch.fnmatch(name, pat) for pat in include)
                            and not any(fnmatch.fnmatch("/" + rel, pat) for pat in exclude)):
                        found[f] = rel
        else:
            raise ValueError(f"{p}: no such file or folder")
    return sorted(found.items())


def read_documents(files) -> list[tuple[str, str]]:
    """(name, text) of every (file, name) that is UTF-8 text and not empty."""
    docs = []
    for f, name in files:
        try:
            text = Path(f).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary or unreadable: not training text
        if text.strip():
            docs.append((name, text))
    if not docs:
        raise ValueError("the corpus is empty: no non-empty UTF-8 text files were found")
    return docs


def split_documents(docs, eval_fraction: float):
    """(train, held_out): a document is held out when a hash of its name says so, so the split
    depends neither on the other files nor on where the folder is. A corpus of one document is
    split by text: its last `eval_fraction` is held out."""
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"the eval fraction must be in [0, 1), got {eval_fraction}")
    if eval_fraction == 0:
        return docs, []
    if len(docs) == 1:
        name, text = docs[0]
        cut = int(len(text) * (1 - eval_fraction))
        return [(name, text[:cut])], [(name, text[cut:])]
    held = [zlib.crc32(n.encode()) % 10_000 < eval_fraction * 10_000 for n, _ in docs]
    if all(held) or not any(held):  # keep both sides non-empty: hold out the last document
        held = [False] * (len(docs) - 1) + [True]
    return ([d for d, h in zip(docs, held) if not h], [d for d, h in zip(docs, held) if h])


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def train_tokenizer(texts, vocab_size: int, directory) -> None:
    """A byte-level BPE (Llama-3 split, its special tokens) trained on `texts`, saved in
    `directory` as tokenizer.json and tokenizer_config.json."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"the vocabulary needs at least {256 + len(SPECIAL_TOKENS)} tokens "
                         "(every byte plus the special tokens)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    # Llama-3's setting, which tritlm's GGUF reader applies for this split: a word that is
    # a token is taken whole
    spec = json.loads(tokenizer.to_str())
    spec["model"]["ignore_merges"] = True
    os.makedirs(directory, exist_ok=True)
    Path(directory, "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    Path(directory, "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": SPECIAL_TOKENS[0], "eos_token": SPECIAL_TOKENS[1], "add_bos_token": True}))


def encode_documents(tokenizer, docs) -> np.ndarray:
    """One int32 stream: BOS, the document's tokens, EOS, for each document in turn. Control
    tokens written in the text are encoded as text, as `tritlm.LLM.tokenize` does."""
    parts = [np.asarray(tokenizer.encode(text, add_bos=True, add_eos=True, special=False), np.int32)
             for _, text in docs]
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)
