"""tritlm.tokenizer against oracles: HF `tokenizers` / transformers built from the same files,
and a plain transcription of llama.cpp's SentencePiece algorithm. Vocabularies are trained here."""

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import (AddedToken, Regex, SentencePieceBPETokenizer, decoders, models,
                        normalizers, pre_tokenizers, processors, trainers)
from tokenizers import Tokenizer as HFTokenizer

from tritlm.tokenizer import IncrementalDecoder, Tokenizer

# Llama-3's split regex, as its tokenizer.json spells it
LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
             r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
            r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|reserved_special_token_0|>", "<|eot_id|>"]
USER_TOKEN = "<tool>"  # a non-special added token: GGUF type 4 (user-defined)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away.",
    "Naïve café owners' résumés: déjà vu, crème brûlée, Ŧhe Ærøskøbing façade!",
    "東京は日本の首都です。你好，世界！我们喜欢学习语言。한국어도 조금.",
    "Emoji time 🚀🚀 👍🏽 🇫🇷 and numbers 1234567 89 2024-06-01 3.14159 100000",
    "def f(x):\n    return x ** 2  # square\n\n\nprint(f(12))\r\n\ttabbed",
    "I'm sure THEY'LL say we've done it, didn't we? You'd know. She's here.",
]
TEXTS = [
    "", " ", "Hello world", "  leading and trailing spaces   ", "naïve CAFÉ déjà-vu",
    "中文测试，日本語のテキスト。", "rocket 🚀🛸 thumbs 👍🏽 flag 🇯🇵", "1234567890123 and 3.14159 and 42",
    "line one\nline two\n\n\nthree\r\n  \n\tindented", "I'M sure you'LL see; she'd've known",
    "<|begin_of_text|>System: hi<|eot_id|>User: x<|eot_id|>Assistant: ",
    "text<|eot_id|><|eot_id|>more <|end_of_text|>", "call <tool> now<tool>", "<|not_a_token|>",
    "The quick brown fox jumps over the lazy dog.", "wordsthatneverappeared zyxw Ω≈ç√",
    "fox: une crème brûlée",
]
# words made single tokens that no merge sequence builds: only ignore_merges finds them
WHOLE_WORDS = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
               .pre_tokenize_str(w)[0][0] for w in (" crème", " brûlée", "fox")]


def _train_llama3_style():
    """A tiny Llama-3-like tokenizer: byte-level BPE, Llama-3 split, specials appended at the
    end of the vocabulary, a post-processor that adds <|begin_of_text|>."""
    tok = HFTokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_RE), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=480, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for w in WHOLE_WORDS:  # like Llama-3's tiktoken-born vocab: tokens the merges do not reach
        vocab.setdefault(w, len(vocab))
    tok = HFTokenizer.from_str(json.dumps(spec))
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    tok.add_tokens([AddedToken(USER_TOKEN, special=False, normalized=False)])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
        special_tokens=[("<|begin_of_text|>", bos)])
    return tok


def _gguf_from_hf_dir(d, pre):
    """GGUF tokenizer metadata laid out as llama.cpp's convert_hf_to_gguf does for a BPE model:
    added tokens are CONTROL when special (or looking like <|...|>), else USER_DEFINED; merges
    and special ids from gguf-py's SpecialVocab."""
    import gguf

    tok = HFTokenizer.from_file(str(d / "tokenizer.json"))
    vocab = tok.get_vocab(with_added_tokens=True)
    reverse = {i: t for t, i in vocab.items()}
    added = tok.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(max(reverse) + 1):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        t = reverse[i]
        if i in added:
            looks = t.startswith("<|") and t.endswith("|>")
            types.append(gguf.TokenType.CONTROL if added[i].special or looks
                         else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(t)
    sv = gguf.SpecialVocab(d, load_merges=True, n_vocab=len(tokens))
    md = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens,
          "tokenizer.ggml.token_type": [int(t) for t in types],
          "tokenizer.ggml.merges": list(sv.merges)}
    for typ, tid in sv.special_token_ids.items():
        md[f"tokenizer.ggml.{typ}_token_id"] = tid
    for typ, flag in sv.add_special_token.items():
        md[f"tokenizer.ggml.add_{typ}_token"] = flag
    if sv.chat_template is not None:
        md["tokenizer.chat_template"] = sv.chat_template
    if pre is not None:
        md["tokenizer.ggml.pre"] = pre
    return md


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama3")
    _train_llama3_style().save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({  # Llama-3 has no add_bos_token key
        "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
        "chat_template": "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"}))
    return d


@pytest.fixture(scope="module")
def oracle(llama3_dir):
    return HFTokenizer.from_file(str(llama3_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def bytelevel(llama3_dir):
    return Tokenizer.from_hf(llama3_dir)


def _plain(hf):  # the oracle with special tokens encoded as text
    copy = HFTokenizer.from_str(hf.to_str())
    copy.encode_special_tokens = True
    return copy


@pytest.mark.parametrize("pre", [None, "llama-bpe", "llama3", "falcon3"])
def test_bytelevel_gguf_matches_hf(llama3_dir, oracle, pre):
    tok = Tokenizer.from_gguf(_gguf_from_hf_dir(llama3_dir, pre))
    plain = _plain(oracle)
    for text in TEXTS:
        assert tok.encode(text) == oracle.encode(text).ids, text
        assert tok.encode(text, add_bos=False) == oracle.encode(
            text, add_special_tokens=False).ids, text
        assert tok.encode(text, add_bos=False, special=False) == plain.encode(
            text, add_special_tokens=False).ids, text


def test_llama3_split_is_exercised(llama3_dir, oracle):
    # the texts must reach what sets Llama-3 apart: digit triples, newline runs, whole words
    tok = Tokenizer.from_gguf(_gguf_from_hf_dir(llama3_dir, None))
    pieces = [tok.token_text(i) for i in tok.encode("1234567", add_bos=False)]
    assert "".join(pieces) == "1234567" and all(len(p) <= 3 for p in pieces)
    for w in WHOLE_WORDS:
        word = tok.decode([tok.token_to_id(w)])
        assert tok.encode(word, add_bos=False) == [tok.token_to_id(w)]
        no_ignore = json.loads(oracle.to_str())
        no_ignore["model"]["ignore_merges"] = False
        assert len(HFTokenizer.from_str(json.dumps(no_ignore)).encode(
            word, add_special_tokens=False).ids) > 1


def test_gguf_equals_from_hf(llama3_dir):
    a = Tokenizer.from_gguf(_gguf_from_hf_dir(llama3_dir, None))
    b = Tokenizer.from_hf(llama3_dir)
    assert a.vocab_size == b.vocab_size
    assert [a.token_text(i) for i in range(a.vocab_size)] == \
        [b.token_text(i) for i in range(b.vocab_size)]
    assert {i for i in range(a.vocab_size) if a.is_special(i)} == \
        {i for i in range(b.vocab_size) if b.is_special(i)} == \
        {b.token_to_id(s) for s in SPECIALS}
    assert (a.bos_id, a.eos_id, a.add_bos) == (b.bos_id, b.eos_id, b.add_bos) == (
        b.token_to_id("<|begin_of_text|>"), b.token_to_id("<|end_of_text|>"), True)
    assert a.eot_ids == b.eot_ids == {b.token_to_id("<|eot_id|>"), b.eos_id}
    assert a.chat_template == b.chat_template is not None
    for text in TEXTS:
        for special in (True, False):
            assert a.encode(text, special=special) == b.encode(text, special=special), text


_BYTES = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)


def test_from_hf_side_files(llama3_dir, tmp_path):
    # chat_template.jinja, named templates, generation_config's list of EOS ids
    (tmp_path / "tokenizer.json").write_text((llama3_dir / "tokenizer.json").read_text())
    (tmp_path / "chat_template.jinja").write_text("{{ messages }}")
    eot = HFTokenizer.from_file(str(llama3_dir / "tokenizer.json")).token_to_id("<|eot_id|>")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [eot, 5]}))
    tok = Tokenizer.from_hf(tmp_path)
    assert tok.chat_template == "{{ messages }}"
    assert tok.eot_ids == {eot, 5, tok.token_to_id("<|end_of_text|>")}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}))
    assert Tokenizer.from_hf(tmp_path).chat_template == "D"
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_hf(tmp_path / "missing")


@pytest.mark.parametrize("pre, pre_tokenizer", [
    ("gpt-2", pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)),
    ("qwen2", pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_RE), "isolated"),
                                       _BYTES]))])
def test_other_split_regexes(llama3_dir, oracle, pre, pre_tokenizer):
    # same vocabulary, another pre-tokenizer; llama.cpp uses the merges for every word here
    spec = json.loads(oracle.to_str())
    spec["model"]["ignore_merges"] = False
    ref = HFTokenizer.from_str(json.dumps(spec))
    ref.pre_tokenizer = pre_tokenizer
    tok = Tokenizer.from_gguf(_gguf_from_hf_dir(llama3_dir, pre))
    for text in TEXTS:
        assert tok.encode(text, add_bos=False) == ref.encode(text, add_special_tokens=False).ids


def test_decode_matches_hf(llama3_dir, oracle):
    tok = Tokenizer.from_gguf(_gguf_from_hf_dir(llama3_dir, None))
    for text in TEXTS:
        ids = oracle.encode(text).ids
        assert tok.decode(ids) == oracle.decode(ids, skip_special_tokens=False)
        assert tok.decode(ids, skip_special=True) == oracle.decode(ids, skip_special_tokens=True)
        if "<|" not in text:
            assert tok.decode(ids, skip_special=True) == text


def test_bos_eos_flags_and_errors(llama3_dir):
    md = _gguf_from_hf_dir(llama3_dir, None)
    tok = Tokenizer.from_gguf({**md, "tokenizer.ggml.add_bos_token": False,
                               "tokenizer.ggml.add_eos_token": True})
    body = tok.encode("hi", add_bos=False, add_eos=False)
    assert tok.encode("hi") == body + [tok.eos_id]
    assert tok.encode("hi", add_bos=True) == [tok.bos_id] + body + [tok.eos_id]
    with pytest.raises(ValueError, match="llama-bpe"):
        Tokenizer.from_gguf({**md, "tokenizer.ggml.pre": "no-such-pre"})
    with pytest.raises(ValueError, match="tokenizer.ggml.model"):
        Tokenizer.from_gguf({**md, "tokenizer.ggml.model": "bert"})
    with pytest.raises(ValueError, match="outside"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="no BOS"):
        Tokenizer.from_gguf({k: v for k, v in md.items() if "bos" not in k}).encode(
            "x", add_bos=True)


def test_malformed_vocabularies(llama3_dir):
    md = _gguf_from_hf_dir(llama3_dir, None)
    with pytest.raises(ValueError, match="merges"):
        Tokenizer.from_gguf({k: v for k, v in md.items() if k != "tokenizer.ggml.merges"})
    with pytest.raises(ValueError, match="two tokens"):
        Tokenizer.from_gguf({**md, "tokenizer.ggml.merges": ["abc"]})
    with pytest.raises(ValueError, match="inconsistent"):
        Tokenizer.from_gguf({**md, "tokenizer.ggml.merges": ["zzq qqz"]})
    with pytest.raises(ValueError, match="token_type"):
        Tokenizer.from_gguf({**md, "tokenizer.ggml.token_type": [1]})
    with pytest.raises(ValueError, match="outside"):
        Tokenizer.from_gguf({**md, "tokenizer.ggml.eos_token_id": 10**6})


def test_unused_slots_decode_to_nothing(llama3_dir):
    # converters fill ids missing from the HF vocabulary with "[PAD<id>]" of type UNUSED
    md = _gguf_from_hf_dir(llama3_dir, None)
    n = len(md["tokenizer.ggml.tokens"])
    tok = Tokenizer.from_gguf({**md, "tokenizer.ggml.tokens": md["tokenizer.ggml.tokens"] + [
        f"[PAD{n}]"], "tokenizer.ggml.token_type": md["tokenizer.ggml.token_type"] + [5]})
    assert tok.vocab_size == n + 1 and tok.decode([n]) == ""
    assert tok.encode(f"[PAD{n}]", add_bos=False) == Tokenizer.from_hf(llama3_dir).encode(
        f"[PAD{n}]", add_bos=False)


def test_non_utf8_token_bytes_survive():
    # a GGUF reader hands stray non-UTF-8 bytes over as surrogate escapes (b"\xe9" -> "\udce9")
    tokens = ["<unk>", "<s>", "</s>", "\u2581a", "\udce9x"]
    tok = Tokenizer.from_gguf({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
                               "tokenizer.ggml.token_type": [2, 3, 3, 1, 1],
                               "tokenizer.ggml.scores": [0.0] * 5})
    assert tok.token_bytes(4) == b"\xe9x" and tok.token_text(4) == "\udce9x"
    assert tok.decode([3, 4]) == "a\ufffdx"


# ------------------------------------------------------------------------- SentencePiece


SPM_SPECIAL = "<|im_end|>"


def _spm_gguf():
    """A SentencePiece-style ("llama") GGUF vocabulary laid out like Llama-2's: <unk> <s> </s>,
    the 256 <0xXX> byte pieces, the trained pieces with falling scores, then a user-defined and a
    control token."""
    spt = SentencePieceBPETokenizer(replacement="\u2581", add_prefix_space=True)
    spt.train_from_iterator(CORPUS * 4, vocab_size=420, min_frequency=1, show_progress=False,
                            special_tokens=["<unk>", "<s>", "</s>"])
    trained = sorted(spt.get_vocab().items(), key=lambda kv: kv[1])[3:]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0] * len(tokens)
    for k, (piece, _) in enumerate(trained):
        tokens.append(piece)
        types.append(1)
        scores.append(-float(k))
    tokens += [USER_TOKEN, SPM_SPECIAL]
    types += [4, 3]
    scores += [-1000.0, -1000.0]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0}


def _spm_hf_json(md):
    """The tokenizer.json HF publishes for Llama-2 (legacy layout: Prepend + Replace
    normalizer, byte fallback, Strip decoder), with merges from transformers' converter."""
    from transformers.tokenization_utils_base import generate_merges

    tokens, types, scores = (md[f"tokenizer.ggml.{k}"] for k in ("tokens", "token_type", "scores"))
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = generate_merges(vocab, {t: scores[i] for t, i in vocab.items()})
    tok = HFTokenizer(models.BPE(vocab, merges, unk_token="<unk>", fuse_unk=True,
                                 byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                           normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<unk>", "<s>", "</s>", SPM_SPECIAL)])
    tok.add_tokens([AddedToken(USER_TOKEN, special=False, normalized=False)])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    return tok


def llamacpp_spm(text, md, special=True):
    """llama.cpp's SPM tokenizer written out plainly: split off special (control, unknown; only
    when `special`) and user-defined tokens; before each text piece that starts the text or
    follows a token put a space; spaces -> U+2581; then repeatedly merge the adjacent pair whose
    concatenation is a piece with the highest score (leftmost on ties); unknown symbols -> bytes."""
    tokens, types, scores = (md[f"tokenizer.ggml.{k}"] for k in ("tokens", "token_type", "scores"))
    ids = {}
    for i, t in enumerate(tokens):
        ids.setdefault(t, i)
    split = [t for i, t in enumerate(tokens) if types[i] == 4 or (special and types[i] in (2, 3))]
    parts = re.split("(" + "|".join(map(re.escape, sorted(split, key=len, reverse=True))) + ")",
                     text) if split else [text]
    prefix = md.get("tokenizer.ggml.add_space_prefix", True)
    out, after_token = [], True
    for k, part in enumerate(parts):
        if k % 2:
            out.append(ids[part])
            after_token = True
            continue
        if not part:
            continue
        syms = list(((" " if after_token and prefix else "") + part).replace(" ", "\u2581"))
        after_token = False
        while True:
            best = None
            for j in range(len(syms) - 1):
                i = ids.get(syms[j] + syms[j + 1])
                if i is not None and (best is None or scores[i] > best[0]):
                    best = (scores[i], j)
            if best is None:
                break
            j = best[1]
            syms[j:j + 2] = [syms[j] + syms[j + 1]]
        for s in syms:
            out += [ids[s]] if s in ids else [ids[f"<0x{b:02X}>"] for b in s.encode()]
    return out


SPM_TEXTS = TEXTS + ["<s>after bos", "x</s>y", f"a{SPM_SPECIAL}b", "<unk> stays", " <s> x",
                     "unseen ☃ 🦄 ∰", "tab\there", "the the the"]


@pytest.fixture(scope="module")
def spm():
    md = _spm_gguf()
    return md, Tokenizer.from_gguf(md), _spm_hf_json(md)


def test_spm_matches_llamacpp_and_hf(spm):
    md, tok, ref = spm
    plain = _plain(ref)
    for text in SPM_TEXTS:
        for special, hf in ((True, ref), (False, plain)):
            got = tok.encode(text, add_bos=False, special=special)
            assert got == llamacpp_spm(text, md, special), (text, special)
            assert got == hf.encode(text, add_special_tokens=False).ids, (text, special)
        assert tok.encode(text) == ref.encode(text).ids
    # the texts reach byte fallback and merges
    ids = tok.encode("unseen ☃", add_bos=False)
    assert any(tok.token_text(i).startswith("<0x") for i in ids)
    assert len(tok.encode("The quick brown fox", add_bos=False)) < len("The quick brown fox")


def test_spm_without_space_prefix(spm):
    # Gemma-style files set tokenizer.ggml.add_space_prefix = false
    md = {**spm[0], "tokenizer.ggml.add_space_prefix": False}
    tok = Tokenizer.from_gguf(md)
    for text in SPM_TEXTS:
        assert tok.encode(text, add_bos=False) == llamacpp_spm(text, md), text
        assert tok.decode(tok.encode(text, special=False), skip_special=True) == text


def test_spm_decode_matches_hf(spm, tmp_path):
    md, tok, ref = spm
    for text in SPM_TEXTS:
        ids = ref.encode(text).ids
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=False), text
        assert tok.decode(ids, skip_special=True) == ref.decode(ids, skip_special_tokens=True)
    # a continuation keeps its space when asked
    the = tok.token_to_id("\u2581the")
    assert tok.decode([the]) == "the" and tok.decode([the], strip_leading_space=False) == " the"


def test_spm_from_hf_agrees_with_transformers(spm, tmp_path):
    from transformers import PreTrainedTokenizerFast

    md, tok, ref = spm
    ref.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}))
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"),
                                 bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    mine = Tokenizer.from_hf(tmp_path)
    assert (mine.bos_id, mine.eos_id, mine.add_bos) == (1, 2, True)
    for text in SPM_TEXTS:
        assert mine.encode(text) == tok.encode(text) == hf.encode(text), text
        ids = tok.encode(text)
        assert mine.decode(ids, skip_special=True) == hf.decode(ids, skip_special_tokens=True)


# ------------------------------------------------------------------------- streaming


def _stream(tok, ids, **kw):
    dec = IncrementalDecoder(tok, **kw)
    pieces = [dec.push(i) for i in ids]
    return pieces, dec.flush()


_chars = st.one_of(st.sampled_from(list("aé中🦄 \n\t€ß👍🏽")),
                   st.characters(codec="utf-8", exclude_characters="\u2581"))


@settings(max_examples=150, deadline=None)
@given(text=st.text(_chars, max_size=30))
def test_incremental_decoder_bytelevel(bytelevel, text):
    tok = bytelevel
    ids = tok.encode(text, special=False)
    for skip in (False, True):
        pieces, tail = _stream(tok, ids, skip_special=skip)
        assert "".join(pieces) + tail == tok.decode(ids, skip_special=skip)
        assert not any("\ufffd" in p for p in pieces) and tail == ""
    assert "".join(_stream(tok, ids, skip_special=True)[0]) == text


@settings(max_examples=150, deadline=None)
@given(text=st.text(_chars, max_size=30))
def test_incremental_decoder_spm(spm, text):
    md, tok, ref = spm
    ids = tok.encode(text, special=False)
    for skip in (False, True):
        pieces, tail = _stream(tok, ids, skip_special=skip)
        assert "".join(pieces) + tail == tok.decode(ids, skip_special=skip)
        assert not any("\ufffd" in p for p in pieces) and tail == ""
    assert "".join(_stream(tok, ids, skip_special=True)[0]) == text
    body = ids[1:]  # a continuation: the leading space stays
    assert "".join(_stream(tok, body, strip_leading_space=False)[0]) == \
        tok.decode(body, strip_leading_space=False)


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_incremental_decoder_any_ids(spm, data):
    # arbitrary byte tokens make invalid UTF-8: the stream still equals decode, U+FFFD and all
    md, tok, ref = spm
    ids = data.draw(st.lists(st.one_of(st.integers(0, tok.vocab_size - 1),
                                       st.integers(3, 258)), max_size=20))
    pieces, tail = _stream(tok, ids)
    assert "".join(pieces) + tail == tok.decode(ids)


@pytest.mark.parametrize("style", ["llama3", "gpt2"])
def test_gguf_metadata_round_trip(llama3_dir, oracle, tmp_path, style):
    """from_hf -> gguf_metadata -> from_gguf encodes as the HF tokenizer does."""
    from tiny_models import write_tokenizer

    directory = llama3_dir if style == "llama3" else write_tokenizer(tmp_path)
    truth = oracle if style == "llama3" else HFTokenizer.from_file(f"{directory}/tokenizer.json")
    metadata = Tokenizer.from_hf(directory).gguf_metadata()
    assert metadata["tokenizer.ggml.pre"] == ("llama-bpe" if style == "llama3" else "gpt-2")
    rebuilt = Tokenizer.from_gguf(metadata)
    for text in ["Hello world 12345 ☃ 日本語", "  spaces\n\nnewlines\tand tabs", "<|eot_id|> x"]:
        assert rebuilt.encode(text, add_bos=False) == truth.encode(text, add_special_tokens=False).ids
