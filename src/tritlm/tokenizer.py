"""Tokenizers of GGUF files and Hugging Face directories, on top of HF `tokenizers`.

Encoding runs in `tokenizers` (Rust); this module only rebuilds its pipeline from a GGUF vocabulary
the way llama.cpp reads that vocabulary:

- ``gpt2``: byte-level BPE with the merges from the file, split first by the pre-tokenizer regex
  that ``tokenizer.ggml.pre`` names (absent -> Llama-3's, which the official 2B4T file needs).
- ``llama``: SentencePiece BPE. The file has scores instead of merges: "a b" is a merge when a, b
  and a+b are all pieces, ranked by the score of a+b (as HF's Llama converter does); characters
  outside the vocabulary fall back to <0xXX> byte pieces; spaces become U+2581 and a U+2581 is
  prepended to the text and after every special token (llama.cpp, HF's "legacy" Llama).

Decoding is done here, from each token's bytes, so that `IncrementalDecoder` can stream exactly
what `decode` returns without ever cutting a UTF-8 character.
"""

from __future__ import annotations

import codecs
import json
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

from .formats.files import MAX_JSON, model_file, parse_json
from .models.config import MAX_SIZE, checked, is_kind, short

__all__ = ["Tokenizer", "IncrementalDecoder", "PRE_TOKENIZERS"]

# GGUF token types (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")  # the same but one digit per piece
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# llama.cpp's fallback for "default": four regexes applied one after the other
_LLAMACPP_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+",
                     r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
                     r"\p{N}+", r"[0-9][0-9][0-9]")

# tokenizer.ggml.pre -> (split regexes, ignore_merges). llama.cpp sets ignore_merges (a word that
# is itself a token is not run through the merges) for its Llama-3 group only.
PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {
    **{name: ((_LLAMA3,), True) for name in (
        "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon_e", "falcon-h1", "pixtral")},
    "qwen2": ((_QWEN2,), False),
    "gpt-2": ((_GPT2,), False),
    "gpt2": ((_GPT2,), False),
    "default": (_LLAMACPP_DEFAULT, False),
}

# texts of the tokens that end a turn in the families tritlm runs
_EOT_TEXTS = ("<|eot_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>", "<|eom_id|>",
              "<end_of_turn>")
_SPACE = "\u2581"  # SentencePiece's visible space
MAX_MERGED = 256  # characters: the longest SentencePiece piece made by merges
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _bytelevel_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet, char -> byte: printable Latin-1 bytes stand for themselves,
    the other 68 bytes are shifted to U+0100 onwards in byte order."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in keep}
    shifted = (b for b in range(256) if b not in keep)
    table.update((chr(0x100 + i), b) for i, b in enumerate(shifted))
    return table


_BYTELEVEL = _bytelevel_table()


def _utf8(token: str) -> bytes:
    # GGUF readers keep stray non-UTF-8 bytes of a token as surrogate escapes: give them back
    return token.encode("utf-8", "surrogateescape")


def _valid(token: str) -> str:
    """`token` as `tokenizers` can take it: no lone surrogates."""
    try:
        token.encode("utf-8")
        return token
    except UnicodeEncodeError:
        return _utf8(token).decode("utf-8", "replace")


def _value(md: Mapping, key: str, kind: type, default=None, where: str = ""):
    """md[key], which must be a `kind` (see `checked`); `default` when absent. `where`: the file,
    for the error message."""
    value = md.get(key)
    return default if value is None else checked(value, kind, f"{where}{key}")


def _array(md: Mapping, key: str, kind: type, where: str = "") -> list | None:
    """md[key] as a list of `kind`s, or None when absent."""
    value = md.get(key)
    if value is None:
        return None
    if isinstance(value, (tuple, np.ndarray)) and np.ndim(value) == 1:
        value = list(value) if isinstance(value, tuple) else value.tolist()
    items = checked(value, list, f"{where}{key}")
    for item in items:
        if not is_kind(item, kind):
            checked(item, kind, f"every item of {where}{key}")  # raises, naming the key
    return items


def _opt_id(md: Mapping, key: str, n: int) -> int | None:
    v = _value(md, key, int)
    if v is None:
        return None
    if not 0 <= v < 2**31 - 1:  # converters write -1 or 0xFFFFFFFF for "none"
        return None
    if v >= n:
        raise ValueError(f"{key} = {v} is outside the vocabulary of {n} tokens")
    return v


def _read_text(directory: Path, name: str) -> str:
    """The text of a file of the model directory (never one a symlink leads out to), bounded."""
    path = model_file(directory, name)
    with open(path, "rb") as f:
        data = f.read(MAX_JSON + 1)
    if len(data) > MAX_JSON:
        raise ValueError(f"{path}: larger than {MAX_JSON >> 20} MiB, too large for a tokenizer file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None


def _read_json(directory: Path, name: str) -> dict:
    """The JSON object in a file of the model directory, {} when there is no such file."""
    path = directory / name
    if not path.is_file() and not path.is_symlink():
        return {}
    return checked(parse_json(_read_text(directory, name).encode(), str(path)), dict, str(path))


def _merge(entry: str) -> tuple[str, str]:
    pair = tuple(_valid(entry).split(" "))
    if len(pair) != 2 or not all(pair):
        raise ValueError(f"tokenizer.ggml.merges entry {short(entry)} is not two tokens "
                         "separated by one space")
    return pair


def _bpe(vocab, merges, **kw) -> _HFTokenizer:
    try:
        return _HFTokenizer(models.BPE(vocab, merges, **kw))
    except Exception as e:  # tokenizers raises a bare Exception for a merge of unknown tokens
        raise ValueError(f"inconsistent BPE vocabulary: {e}") from e


def _spm_merges(tokens: list[str], types: list[int], scores) -> list[tuple[str, str]]:
    """Merges for a SentencePiece BPE vocabulary: (l, r) when l, r, l+r are normal pieces,
    highest score of l+r first. Equal scores (converters that write -1000 for every piece) fall
    back to vocabulary order, which SentencePiece BPE models are sorted in. Pieces longer than
    MAX_MERGED (none in real vocabularies) are left unmerged: splitting each costs its length
    squared, which a hostile file could make hours."""
    ids: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if types[i] == NORMAL:
            ids.setdefault(t, i)
    found = []
    for piece, i in ids.items():
        if len(piece) > MAX_MERGED:
            continue
        score = float(scores[i]) if scores is not None else 0.0
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in ids and right in ids:
                found.append((-score, i, -k, left, right))
    found.sort(key=lambda m: m[:3])
    return [(m[3], m[4]) for m in found]


def _pre_name(pre_tokenizer) -> str:
    """The llama.cpp pre-tokenizer name of a tokenizer.json `pre_tokenizer`, by its split regex."""
    text = json.dumps(pre_tokenizer)
    names = {_LLAMA3: "llama-bpe", _QWEN2: "qwen2", _GPT2: "gpt-2"}
    for regex, name in names.items():
        if json.dumps(regex)[1:-1] in text:
            return name
    if pre_tokenizer and pre_tokenizer.get("type") == "ByteLevel" and pre_tokenizer.get("use_regex", True):
        return "gpt-2"  # ByteLevel's built-in split is GPT-2's regex
    raise ValueError("unsupported pre-tokenizer for GGUF export (supported: Llama-3, Qwen2 and "
                     "GPT-2 splits)")


class Tokenizer:
    """Text <-> token ids for one model. Build it with `from_gguf` or `from_hf`."""

    def __init__(self, hf: _HFTokenizer, tokens: list[str | None], kinds: list[str], *,
                 special: Iterable[int], bos_id: int | None, eos_id: int | None,
                 add_bos: bool, add_eos: bool = False, strip_space: bool = False,
                 chat_template: str | None = None, extra_eot: Iterable[int] = ()):
        # kinds[i]: "bytelevel" | "spm" | "byte" | "raw" | "void": how token i's text turns
        # into bytes
        self._hf = hf
        self._hf_plain: _HFTokenizer | None = None  # built on first encode(special=False)
        self._tokens = tokens
        self._ids = {}
        for i, t in enumerate(tokens):
            if t is not None:
                self._ids.setdefault(t, i)
        self._kinds = kinds
        self._pieces = [self._piece_bytes(t, k) for t, k in zip(tokens, kinds)]
        self._special = frozenset(special)
        self._bos, self._eos = bos_id, eos_id
        self._add_bos, self._add_eos = add_bos, add_eos
        self._strip_space = strip_space
        self._chat_template = chat_template
        eot = {i for i in (eos_id, *extra_eot) if i is not None}
        eot.update(self._ids[t] for t in _EOT_TEXTS if t in self._ids)
        self._eot = frozenset(eot)

    @staticmethod
    def _piece_bytes(token: str | None, kind: str) -> bytes:
        if token is None or kind == "void":
            return b""
        if kind == "bytelevel":
            try:
                return bytes(_BYTELEVEL[c] for c in token)
            except KeyError:  # not a byte-level string after all: take it as text
                return _utf8(token)
        if kind == "byte":
            return bytes([int(_BYTE_PIECE.fullmatch(token).group(1), 16)])
        if kind == "spm":
            return _utf8(token.replace(_SPACE, " "))
        return _utf8(token)

    # ----------------------------------------------------------------------------- builders

    @classmethod
    def of_model(cls, path, metadata: Mapping, vocab_size: int) -> Tokenizer:
        """The tokenizer of a model `tritlm.models.loader.load` has loaded: from its Hugging Face
        files if `path` is a directory, else from its GGUF `metadata`, whose token list has
        exactly vocab_size tokens (`loader.gguf_config` checks it)."""
        if Path(path).is_dir():
            return cls.from_hf(path, vocab_size)
        return cls.from_gguf(metadata)

    @classmethod
    def from_gguf(cls, metadata: Mapping) -> Tokenizer:
        """From the key/value metadata of a GGUF file (``tokenizer.ggml.*``)."""
        md = metadata
        model = _value(md, "tokenizer.ggml.model", str, "")
        tokens = _array(md, "tokenizer.ggml.tokens", str)
        if tokens is None:
            raise ValueError("GGUF metadata has no tokenizer.ggml.tokens")
        n = len(tokens)
        types = _array(md, "tokenizer.ggml.token_type", int)
        types = [NORMAL] * n if types is None else types
        if len(types) != n:
            raise ValueError(f"tokenizer.ggml.token_type has {len(types)} entries for {n} tokens")
        names = [_valid(t) for t in tokens]  # the spelling handed to `tokenizers`
        vocab: dict[str, int] = {}
        for i, t in enumerate(names):
            vocab.setdefault(t, i)
        pre = _value(md, "tokenizer.ggml.pre", str)

        if model == "gpt2":
            if pre is None:  # the official 2B4T file has no pre key and needs Llama-3's regex
                pre = "llama3"
            if pre not in PRE_TOKENIZERS:
                raise ValueError(f"unsupported tokenizer.ggml.pre {short(pre)}; tritlm supports "
                                 f"{', '.join(sorted(PRE_TOKENIZERS))} (or the key absent)")
            regexes, ignore_merges = PRE_TOKENIZERS[pre]
            merges = _array(md, "tokenizer.ggml.merges", str)
            if merges is None:
                raise ValueError("a gpt2 (BPE) vocabulary needs tokenizer.ggml.merges")
            merges = [_merge(m) for m in merges]
            hf = _bpe(vocab, merges, ignore_merges=ignore_merges)
            hf.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(r), "isolated") for r in regexes]
                + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
            hf.decoder = decoders.ByteLevel()
            text_kind, space_prefix = "bytelevel", False
            add_bos_default = ignore_merges  # llama.cpp turns both on for its Llama-3 group
        elif model == "llama":
            space_prefix = _value(md, "tokenizer.ggml.add_space_prefix", bool, True)
            unk = _opt_id(md, "tokenizer.ggml.unknown_token_id", n)
            scores = _array(md, "tokenizer.ggml.scores", float)
            if scores is not None and (len(scores) != n or any(map(math.isnan, scores))):
                raise ValueError(f"tokenizer.ggml.scores must be {n} numbers, one per token")
            merges = _spm_merges(names, types, scores)
            hf = _bpe(vocab, merges, unk_token=None if unk is None else names[unk],
                      fuse_unk=True, byte_fallback=BYTE in types)
            # Prepend is a normalizer, so it runs on every stretch between added tokens: that
            # gives llama.cpp's leading space after each special token
            steps = [normalizers.Prepend(_SPACE)] if space_prefix else []
            hf.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", _SPACE)])
            hf.decoder = decoders.Sequence(
                [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
                + ([decoders.Strip(" ", 1, 0)] if space_prefix else []))
            text_kind, add_bos_default = "spm", True
        else:
            raise ValueError(f"unsupported tokenizer.ggml.model {short(model)}; tritlm reads 'gpt2' "
                             "(byte-level BPE) and 'llama' (SentencePiece BPE)")

        # control and unknown tokens are special (matched in text only when asked); user-defined
        # ones are matched always, as llama.cpp and HF do with non-special added tokens
        hf.add_special_tokens([AddedToken(names[i], special=True, normalized=False)
                               for i in range(n) if types[i] in (CONTROL, UNKNOWN)])
        hf.add_tokens([AddedToken(names[i], special=False, normalized=False)
                       for i in range(n) if types[i] == USER_DEFINED])
        # unused slots (converters' [PAD123] fillers) decode to nothing, as in llama.cpp
        kinds = [("byte" if t == BYTE and _BYTE_PIECE.fullmatch(tok) else text_kind if t == NORMAL
                  else "void" if t == UNUSED else "raw") for tok, t in zip(tokens, types)]
        add_bos = _value(md, "tokenizer.ggml.add_bos_token", bool)
        return cls(hf, tokens, kinds,
                   special=[i for i, t in enumerate(types) if t in (CONTROL, UNKNOWN)],
                   bos_id=_opt_id(md, "tokenizer.ggml.bos_token_id", n),
                   eos_id=_opt_id(md, "tokenizer.ggml.eos_token_id", n),
                   add_bos=add_bos_default if add_bos is None else add_bos,
                   add_eos=_value(md, "tokenizer.ggml.add_eos_token", bool, False),
                   strip_space=space_prefix,
                   chat_template=_value(md, "tokenizer.chat_template", str),
                   extra_eot=[i for k in ("eot", "eom")
                              if (i := _opt_id(md, f"tokenizer.ggml.{k}_token_id", n)) is not None])

    @classmethod
    def from_hf(cls, directory: str | Path, vocab_size: int = MAX_SIZE) -> Tokenizer:
        """From a Hugging Face directory: tokenizer.json plus tokenizer_config.json,
        special_tokens_map.json, generation_config.json and chat_template.jinja if present.
        Every token id must be below `vocab_size` (the model's)."""
        d = Path(directory)
        path = d / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"{d} has no tokenizer.json")
        text = _read_text(d, "tokenizer.json")
        spec = checked(parse_json(text.encode(), str(path)), dict, str(path))
        # decoding takes each token's bytes; these would add text to them, or make encoding random
        model = spec.get("model")
        odd = [k for k in ("continuing_subword_prefix", "end_of_word_suffix", "dropout")
               if isinstance(model, dict) and model.get(k)]
        if odd:
            raise ValueError(f"{path}: model.{odd[0]} is not supported")
        try:
            hf = _HFTokenizer.from_str(text)
        except BaseException as e:  # a bare Exception, or a Rust panic (pyo3's PanicException)
            if not isinstance(e, Exception) and type(e).__name__ != "PanicException":
                raise
            raise ValueError(f"{path}: not a tokenizer the tokenizers library can read ({e})") from None
        # ids are checked before anything is encoded: the library aborts the process on some
        # ids beyond its vocabulary's size
        ids = hf.get_vocab(with_added_tokens=False).values()
        if len(set(ids)) != len(ids):
            raise ValueError(f"{path}: model.vocab gives two tokens the same id")
        n = max([hf.get_vocab_size(with_added_tokens=True), *(i + 1 for i in hf.get_vocab(with_added_tokens=True).values())])
        if n > vocab_size:
            raise ValueError(f"{path}: token ids up to {n - 1}, beyond the model's vocabulary "
                             f"of {vocab_size}")

        cfg, smap, gen = (_read_json(d, name) for name in (
            "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"))

        def special_id(name):
            file, v = "tokenizer_config.json", cfg.get(name)
            if not v:
                file, v = "special_tokens_map.json", smap.get(name)
            v = v.get("content") if isinstance(v, dict) else v
            if v is None:
                return None
            token_id = hf.token_to_id(checked(v, str, f"{d / file}: {name}"))
            if token_id is None:
                raise ValueError(f"{d / file}: {name} {short(v)} is not in the vocabulary")
            return token_id
        bos_id, eos_id = special_id("bos_token"), special_id("eos_token")

        # the BOS/EOS the model adds: tokenizer_config's flags, else what the post-processor does
        try:
            probe = hf.encode("a", add_special_tokens=True).ids
        except Exception as e:  # the library reports a broken model (no unknown token...) so
            raise ValueError(f"{path}: the tokenizer cannot encode text ({e})") from None
        in_cfg = f"{d / 'tokenizer_config.json'}: "
        add_bos = _value(cfg, "add_bos_token", bool, where=in_cfg)
        if add_bos is None:
            add_bos = bos_id is not None and len(probe) > 1 and probe[0] == bos_id
        add_eos = _value(cfg, "add_eos_token", bool, where=in_cfg)
        if add_eos is None:
            add_eos = eos_id is not None and len(probe) > 1 and probe[-1] == eos_id

        def has(node, kind, **attrs):  # is there a `kind` step (with attrs) in this pipeline?
            if not isinstance(node, dict):
                return False
            if node.get("type") == kind and all(node.get(k) == v for k, v in attrs.items()):
                return True
            steps = (node.get("decoders") or []) + (node.get("pretokenizers") or [])
            return any(has(x, kind, **attrs) for x in steps)
        dec = spec.get("decoder")
        if has(dec, "ByteLevel") or (dec is None and has(spec.get("pre_tokenizer"), "ByteLevel")):
            text_kind, strip = "bytelevel", False
        elif has(dec, "Metaspace") or has(dec, "Replace", pattern={"String": _SPACE}):
            text_kind = "spm"
            strip = has(dec, "Strip") or any(
                has(dec, "Metaspace", prepend_scheme=s) for s in ("always", "first"))
        else:
            raise ValueError(f"{d / 'tokenizer.json'}: unsupported decoder "
                             f"{(dec or {}).get('type')!r}; tritlm decodes byte-level BPE and "
                             "SentencePiece-style vocabularies")

        added = hf.get_added_tokens_decoder()
        tokens = [hf.id_to_token(i) for i in range(n)]
        byte_fallback = bool(spec.get("model", {}).get("byte_fallback"))

        def kind(i, t):
            if i in added or t is None:
                return "raw"
            if byte_fallback and _BYTE_PIECE.fullmatch(t):
                return "byte"
            return text_kind
        kinds = [kind(i, t) for i, t in enumerate(tokens)]

        where = f"{in_cfg}chat_template"
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named ones, {"name": ..., "template": ...}: the default
            named = {checked(t, dict, where).get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        if template is None and (d / "chat_template.jinja").is_file():
            template = _read_text(d, "chat_template.jinja")
        if template is None:
            where = f"{d / 'chat_template.json'}: chat_template"
            template = _read_json(d, "chat_template.json").get("chat_template")
        template = None if template is None else checked(template, str, where)

        gen_eos = gen.get("eos_token_id")  # one id or a list of them
        gen_eos = [gen_eos] if is_kind(gen_eos, int) else \
            _array(gen, "eos_token_id", int, f"{d / 'generation_config.json'}: ") or []
        return cls(hf, tokens, kinds, special=[i for i, a in added.items() if a.special],
                   bos_id=bos_id, eos_id=eos_id, add_bos=add_bos, add_eos=add_eos,
                   strip_space=strip, chat_template=template,
                   extra_eot=[i for i in gen_eos if 0 <= i < n])

    # ----------------------------------------------------------------------------- encoding

    def encode(self, text: str, add_bos: bool | None = None, special: bool = True, *,
               add_eos: bool | None = None) -> list[int]:
        """Token ids of `text`. add_bos/add_eos None: what the model asks for. special: match
        control tokens such as <|eot_id|> written in the text (False: encode them as text)."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, not {type(text).__name__}")
        if special:
            hf = self._hf
        else:
            if self._hf_plain is None:
                plain = _HFTokenizer.from_str(self._hf.to_str())
                plain.encode_special_tokens = True
                self._hf_plain = plain
            hf = self._hf_plain
        # encode_batch lets go of the GIL (encode holds it): a long text doesn't stall other threads
        try:
            ids = hf.encode_batch([text], add_special_tokens=False)[0].ids
        except Exception as e:  # (the library raises a bare Exception for text its model can't take)
            raise ValueError(f"the tokenizer cannot encode this text: {e}") from None
        bos = self._marker(add_bos, self._add_bos, self._bos, "BOS")
        eos = self._marker(add_eos, self._add_eos, self._eos, "EOS")
        return bos + ids + eos

    @staticmethod
    def _marker(flag, default, tid, name) -> list[int]:
        if not (default if flag is None else flag):
            return []
        if tid is None:
            if flag:  # asked for explicitly
                raise ValueError(f"this vocabulary has no {name} token")
            return []
        return [tid]

    # ----------------------------------------------------------------------------- decoding

    def token_bytes(self, token_id: int, skip_special: bool = False) -> bytes:
        """The bytes token `token_id` stands for (b"" for a skipped special token)."""
        if not 0 <= token_id < len(self._pieces):
            raise ValueError(f"token id {token_id} is outside the vocabulary of "
                             f"{len(self._pieces)} tokens")
        if skip_special and token_id in self._special:
            return b""
        return self._pieces[token_id]

    def decode(self, ids: Iterable[int], skip_special: bool = False, *,
               strip_leading_space: bool | None = None) -> str:
        """Text of `ids`. Bytes that are not valid UTF-8 become U+FFFD. SentencePiece
        vocabularies drop one leading space (the one encode prepends) unless
        strip_leading_space=False, which suits decoding a continuation."""
        text = b"".join(self.token_bytes(int(i), skip_special) for i in ids).decode(
            "utf-8", "replace")
        if self._strips(strip_leading_space) and text.startswith(" "):
            text = text[1:]
        return text

    def _strips(self, strip_leading_space: bool | None) -> bool:
        return self._strip_space if strip_leading_space is None else strip_leading_space

    # ----------------------------------------------------------------------------- vocabulary

    def gguf_metadata(self) -> dict:
        """This vocabulary as GGUF `tokenizer.*` metadata, laid out as llama.cpp's converter
        writes it (byte-level BPE vocabularies; SentencePiece ones raise ValueError)."""
        spec = json.loads(self._hf.to_str())
        model = spec.get("model") or {}
        if model.get("type") != "BPE" or model.get("byte_fallback") or any(
                k == "spm" for k in self._kinds):
            raise ValueError("GGUF tokenizer metadata can be written for byte-level BPE vocabularies only")
        pre = _pre_name(spec.get("pre_tokenizer"))
        kind_type = {"bytelevel": NORMAL, "byte": BYTE, "void": UNUSED}
        types = [CONTROL if i in self._special else kind_type.get(k, USER_DEFINED)
                 for i, k in enumerate(self._kinds)]
        metadata = {
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": pre,
            "tokenizer.ggml.tokens": [t if t is not None else f"[PAD{i}]" for i, t in enumerate(self._tokens)],
            "tokenizer.ggml.token_type": np.asarray(types, np.int32),
            "tokenizer.ggml.merges": [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])],
            "tokenizer.ggml.add_bos_token": self._add_bos,
        }
        for name, token_id in (("bos", self._bos), ("eos", self._eos)):
            if token_id is not None:
                metadata[f"tokenizer.ggml.{name}_token_id"] = token_id
        if self._chat_template:
            metadata["tokenizer.chat_template"] = self._chat_template
        return metadata

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    @property
    def bos_id(self) -> int | None:
        return self._bos

    @property
    def eos_id(self) -> int | None:
        return self._eos

    @property
    def add_bos(self) -> bool:
        return self._add_bos

    @property
    def eot_ids(self) -> frozenset[int]:
        """Ids that end a turn: EOS, and <|eot_id|>, <|end_of_text|>, <|im_end|>, ... if present."""
        return self._eot

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    def token_text(self, token_id: int) -> str:
        """The token as the vocabulary spells it (e.g. 'Ġthe', '▁the', '<0x0A>', '<|eot_id|>')."""
        self.token_bytes(token_id)  # range check
        return self._tokens[token_id] or ""

    def token_to_id(self, text: str) -> int | None:
        """The id of the vocabulary entry spelled `text`, or None."""
        return self._ids.get(text)

    def is_special(self, token_id: int) -> bool:
        """Whether `decode(..., skip_special=True)` drops this token."""
        return token_id in self._special

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self._bos}, "
                f"eos_id={self._eos}, eot_ids={sorted(self._eot)})")


class IncrementalDecoder:
    """Streams the text of ids pushed one at a time. The pushes plus `flush()` concatenate to
    `tokenizer.decode(all_ids, ...)` with the same options; a UTF-8 character split over byte
    tokens comes out only once complete."""

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = False,
                 strip_leading_space: bool | None = None):
        self._tok = tokenizer
        self._skip = skip_special
        self._strip = tokenizer._strips(strip_leading_space)
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def push(self, token_id: int) -> str:
        return self._emit(self._utf8.decode(self._tok.token_bytes(int(token_id), self._skip)))

    def flush(self) -> str:
        """Whatever is held back: an unfinished character comes out as U+FFFD."""
        return self._emit(self._utf8.decode(b"", final=True))

    def _emit(self, text: str) -> str:
        # the leading-space rule looks at the first character of the whole text only
        if self._strip and text:
            self._strip = False
            if text[0] == " ":
                text = text[1:]
        return text
