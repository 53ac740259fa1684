"""A mutation fuzzer for model files, shared by tests/test_fuzz.py (a short seeded run) and
benchmarks/fuzz.py (long runs).

Seeds are tiny valid models (`write_seeds`): GGUF files, a Hugging Face directory with one
model.safetensors of packed ternary weights, and one with bf16 weights in two shards behind
model.safetensors.index.json; both directories have tokenizer.json and tokenizer_config.json.
A mutator turns a seed into an `Input` (files, and what was changed); a `ForkServer` loads each
input with `tritlm.LLM` and, if it loads, computes one token's logits, in a child forked from a
server process that imported tritlm once, under a time limit and an address-space limit.

Outcomes: "loaded", "ValueError" and "OSError" are what the API documents (subclasses count);
failures are "crash" (a signal, or an exit without a report), "hang" (killed at the deadline),
"other" (any other exception) and "escaped" (the load opened a file outside the model
directory: a decoy, or /etc/passwd).

Everything lives in one work directory: the seeds, the decoys (work/decoys: files outside every
model directory that mutations point to, absolutely or as ../decoys/...) and the inputs, each
written to a directory of its own (work/input<n>), removed once loaded.

Mutators have an area: "format" ones change the files' structure (lengths, counts, offsets,
dimensions, types, dtypes, shard paths, files replaced or linked), which the parsers in
tritlm.formats must reject or read; "content" ones change values that the model loader,
config or tokenizer interpret (GGUF metadata numbers, config.json, the tokenizer files).
"""

from __future__ import annotations

import faulthandler
import json
import os
import random
import resource
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field

import numpy as np

KINDS = ("gguf", "safetensors", "hf")
PASSING = ("loaded", "ValueError", "OSError")
FAILING = ("crash", "hang", "other", "escaped")
OUTCOMES = PASSING + FAILING

# values an overwritten length, count, offset, dimension or number takes (masked to its width)
BOUNDARY = (0, 1, -1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1)
BOUNDARY_JSON = (0, -1, 1, 2**31, 2**32 - 1, 2**53 + 1, 2**63, 2**64 - 1, 2**64, -(2**63), 10**100,
                 0.5, -0.0, 1e308, -1e308, float("nan"), float("inf"), float("-inf"))
ODD_JSON = (None, True, False, "", "x", "é☃\u0000", [], {}, [1, "a"], {"a": None})
GGUF_TYPES = (0, 1, 8, 14, 30, 34, 35, 36)  # the tensor types tritlm reads
SAFETENSORS_DTYPES = ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL")
DECOY_TEXT = b"DECOY-CONTENT-7f3a\n"  # first bytes of the decoy files: must never be echoed
NEST = "\u0000NEST\u0000"  # placeholder for a deeply nested value, expanded after json.dumps


# ------------------------------------------------------------------------------------- seeds

@dataclass
class Symlink:
    target: str


DIRECTORY = "<directory>"  # a file's content that makes it a directory


@dataclass
class Input:
    """A model to load: files by relative path (bytes, a Symlink or DIRECTORY), the path given
    to tritlm.LLM ("." for the directory itself) and the mutations that made it."""
    kind: str
    files: dict
    target: str
    steps: list = field(default_factory=list)
    seed: Input | None = field(default=None, repr=False)  # what it was made from

    def write(self, directory: str) -> str:
        os.makedirs(directory)
        for name, content in self.files.items():
            path = os.path.join(directory, name)
            if content is DIRECTORY:
                os.makedirs(path, exist_ok=True)
            elif isinstance(content, Symlink):
                os.symlink(content.target, path)
            else:
                with open(path, "wb") as f:
                    f.write(content)
        return os.path.normpath(os.path.join(directory, self.target))

    def describe(self) -> str:
        return f"{self.kind} input: " + ("; ".join(self.steps) or "the seed, unchanged")


def safetensors_bytes(tensors: dict) -> bytes:
    """name -> (dtype, array) as one safetensors file."""
    header, offset, data = {"__metadata__": {"format": "pt"}}, 0, []
    for name, (dtype, array) in tensors.items():
        raw = np.ascontiguousarray(array).tobytes()
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        data.append(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(data)


def _hf_tensors(config: dict, packed: bool, rng) -> dict:
    """A transformers BitNet state dict for `config`: bf16 master weights, or packed uint8
    ternary weights with a bf16 weight_scale."""
    from tritlm.quant import layouts
    from tritlm.quant.blocks import f32_to_bf16

    h, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = h // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    bf16 = lambda a: ("BF16", f32_to_bf16(a))  # noqa: E731
    tensors = {"model.embed_tokens.weight": bf16(rng.standard_normal((v, h), np.float32)),
               "model.norm.weight": bf16(np.ones(h, np.float32))}
    linears = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
               "self_attn.o_proj": (h, q), "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h),
               "mlp.down_proj": (h, f)}
    norms = {"input_layernorm": h, "post_attention_layernorm": h, "self_attn.attn_sub_norm": h,
             "mlp.ffn_sub_norm": f}
    for i in range(config["num_hidden_layers"]):
        for name, shape in linears.items():
            key = f"model.layers.{i}.{name}.weight"
            if packed:
                tensors[key] = ("U8", layouts.pack_hf(rng.integers(-1, 2, shape).astype(np.int8)))
                tensors[key + "_scale"] = bf16(np.full(1, 0.05, np.float32))
            else:
                tensors[key] = bf16(rng.standard_normal(shape, np.float32) * 0.05)
        for name, n in norms.items():
            tensors[f"model.layers.{i}.{name}.weight"] = bf16(1 + 0.1 * rng.standard_normal(n, np.float32))
    return tensors


def write_hf(directory: str, packed: bool, shards: int, seed: int = 0) -> None:
    """A tiny random BitNet checkpoint as transformers saves it: config.json, tokenizer.json,
    tokenizer_config.json, and the weights (packed or bf16) in `shards` safetensors files."""
    from tiny_models import tiny_config, write_tokenizer

    rng = np.random.default_rng(seed)
    config = tiny_config(model_type="bitnet", architectures=["BitNetForCausalLM"],
                         quantization_config={"quant_method": "bitnet", "linear_class": "autobitlinear",
                                              "quantization_mode": "offline" if packed else "online"})
    write_tokenizer(directory, config["vocab_size"])
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    tensors = list(_hf_tensors(config, packed, rng).items())
    if shards == 1:
        with open(os.path.join(directory, "model.safetensors"), "wb") as f:
            f.write(safetensors_bytes(dict(tensors)))
        return
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = dict(tensors[i::shards])
        weight_map.update(dict.fromkeys(part, name))
        with open(os.path.join(directory, name), "wb") as f:
            f.write(safetensors_bytes(part))
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)


def decoys(work: str) -> str:
    return os.path.join(work, "decoys")


def write_seeds(work: str) -> dict:
    """Write the seeds and the decoys in the work directory; kind -> list of seed Inputs."""
    from tritlm.api import default_model_path
    from tritlm.bench.dummy import write_dummy
    from tritlm.models.config import ModelConfig

    os.makedirs(decoys(work))
    for name in ("secret.txt", "config.json", "tokenizer.json", "model.safetensors"):
        with open(os.path.join(decoys(work), name), "wb") as f:
            f.write(DECOY_TEXT)

    def tiny(arch, hidden, ffn):
        return ModelConfig(arch=arch, vocab_size=300, hidden_size=hidden, intermediate_size=ffn,
                           n_layers=2, n_heads=4, n_kv_heads=2, context_length=256,
                           rope_theta=10000.0, norm_eps=1e-5)

    gguf = []
    for i, (arch, hidden, ternary, embedding) in enumerate(
            [("bitnet-b1.58", 128, "I2_S", "F16"), ("bitnet", 256, "TQ2_0", "Q8_0"),
             ("llama", 256, "TQ1_0", "Q6_K")]):
        path = os.path.join(work, f"seed{i}.gguf")
        write_dummy(path, tiny(arch, hidden, 2 * hidden), ternary_type=ternary, embedding_type=embedding)
        gguf.append(path)
    gguf.append(default_model_path())
    seeds = {"gguf": [Input("gguf", {"model.gguf": _read(p)}, "model.gguf") for p in gguf]}
    for kind, packed, shards in [("safetensors", True, 1), ("hf", False, 2)]:
        d = os.path.join(work, f"seed-{kind}")
        os.makedirs(d)
        write_hf(d, packed, shards)
        seeds[kind] = [Input(kind, {n: _read(os.path.join(d, n)) for n in sorted(os.listdir(d))}, ".")]
    return seeds


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# ---------------------------------------------------------------------------------- mutators

def _number(rng: random.Random, old: int, bits: int) -> int:
    """A boundary value, a neighbour of `old` or random bits, as an unsigned `bits`-bit field."""
    pick = rng.random()
    if pick < 0.6:
        value = rng.choice(BOUNDARY)
    elif pick < 0.85:
        value = old + rng.choice((-1, 1, old, -old // 2))
    else:
        value = rng.getrandbits(bits)
    return value & ((1 << bits) - 1)


_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_fields(raw: bytes) -> tuple[list, int]:
    """(offset, bytes, role) of every number in a valid GGUF file's header, and where the
    header ends. Roles: version, count, length (of a string or array), type (of a metadata
    value or array element), value (a metadata number), n_dims, dim, dims (all of a tensor's),
    tensor type, offset."""
    fields = [(4, 4, "version"), (8, 8, "count"), (16, 8, "count")]
    n_tensors, n_kv = struct.unpack_from("<QQ", raw, 8)
    pos = 24

    def string(pos):
        fields.append((pos, 8, "length"))
        return pos + 8 + struct.unpack_from("<Q", raw, pos)[0]

    def value(pos, vtype):
        if vtype == 8:
            return string(pos)
        if vtype == 9:
            etype, count = struct.unpack_from("<IQ", raw, pos)
            fields.extend([(pos, 4, "type"), (pos + 4, 8, "length")])
            pos += 12
            if etype in _GGUF_SIZES and etype != 7:  # one field stands for a numeric array
                fields.append((pos, _GGUF_SIZES[etype], "value"))
                return pos + count * _GGUF_SIZES[etype]
            for _ in range(count):
                pos = value(pos, etype)
            return pos
        fields.append((pos, _GGUF_SIZES[vtype], "value"))
        return pos + _GGUF_SIZES[vtype]

    for _ in range(n_kv):
        pos = string(pos)
        fields.append((pos, 4, "type"))
        pos = value(pos + 4, struct.unpack_from("<I", raw, pos)[0])
    for _ in range(n_tensors):
        pos = string(pos)
        n_dims = struct.unpack_from("<I", raw, pos)[0]
        fields.extend([(pos, 4, "n_dims"), (pos + 4, 8 * n_dims, "dims")])
        fields.extend((pos + 4 + 8 * d, 8, "dim") for d in range(n_dims))
        pos += 4 + 8 * n_dims
        fields.extend([(pos, 4, "tensor type"), (pos + 4, 8, "offset")])
        pos += 12
    return fields, pos


class Mutator:
    """Turns seeds into inputs: 1 to 3 mutations of the kind's mutators in `areas`."""

    def __init__(self, seeds: dict, work: str, areas=("format", "content")):
        self.seeds, self.decoys = seeds, decoys(work)
        self._gguf = {id(s): gguf_fields(s.files["model.gguf"]) for s in seeds["gguf"]}
        table = {
            "gguf": [(self.gguf_field, "format", 4), (self.gguf_tensor_type, "format", 1),
                     (self.gguf_reshape, "format", 1),
                     (self.gguf_flip, "format", 2), (self.gguf_splice, "format", 1),
                     (self.truncate, "format", 1), (self.gguf_value, "content", 2)],
            "safetensors": [(self.safetensors_entry, "format", 4), (self.safetensors_json, "format", 2),
                            (self.safetensors_reshape, "format", 1),
                            (self.safetensors_length, "format", 1), (self.safetensors_flip, "format", 2),
                            (self.truncate, "format", 1)],
            "hf": [(self.shard_path, "format", 3), (self.index_json, "format", 2),
                   (self.replace_file, "format", 2), (self.shard, "format", 2),
                   (self.json_syntax, "format", 1), (self.config_json, "content", 3),
                   (self.tokenizer_json, "content", 2), (self.replace_tokenizer_file, "content", 1)],
        }
        self.table = {kind: [(f, w) for f, area, w in rows if area in areas] for kind, rows in table.items()}

    def __call__(self, rng: random.Random, kind: str) -> Input:
        seed = rng.choice(self.seeds[kind])
        x = Input(kind, dict(seed.files), seed.target, seed=seed)
        functions, weights = zip(*self.table[kind])
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            x.steps.append(rng.choices(functions, weights)[0](rng, x))
        return x

    # -------------------------------------------------------------------------- GGUF

    def _gguf_bytes(self, x: Input):
        return bytearray(x.files["model.gguf"]), *self._gguf[id(x.seed)]

    def gguf_field(self, rng, x, roles=("version", "count", "length", "type", "n_dims", "dim",
                                        "tensor type", "offset")):
        raw, fields, _ = self._gguf_bytes(x)
        role = rng.choice(roles)
        offset, size, _ = rng.choice([f for f in fields if f[2] == role])
        if offset + size > len(raw):
            return f"{role} at {offset}: beyond the end"
        old = int.from_bytes(raw[offset:offset + size], "little")
        new = rng.choice(GGUF_TYPES + (2, 38, 99, 2**32 - 1)) if role == "tensor type" else \
            _number(rng, old, 8 * size)
        raw[offset:offset + size] = new.to_bytes(size, "little")
        x.files["model.gguf"] = bytes(raw)
        return f"{role} at byte {offset}: {old} -> {new}"

    def gguf_tensor_type(self, rng, x):
        return self.gguf_field(rng, x, roles=("tensor type",))

    def gguf_value(self, rng, x):
        return self.gguf_field(rng, x, roles=("value",))

    def gguf_reshape(self, rng, x):
        """A tensor's dimensions changed, their product kept: the file stays consistent."""
        raw, fields, _ = self._gguf_bytes(x)
        offset, size, _ = rng.choice([f for f in fields if f[2] == "dims"])
        if offset + size > len(raw):
            return f"dims at {offset}: beyond the end"
        old = list(struct.unpack_from(f"<{size // 8}q", raw, offset))
        new = _reshape(rng, old)[:len(old)]
        new += [1] * (len(old) - len(new))
        struct.pack_into(f"<{len(new)}q", raw, offset, *new)
        x.files["model.gguf"] = bytes(raw)
        return f"dims at byte {offset}: {old} -> {new}"

    def gguf_flip(self, rng, x):
        raw, _, header_end = self._gguf_bytes(x)
        if not raw:
            return "model.gguf: empty, left as is"
        end = header_end if rng.random() < 0.8 else len(raw)
        spots = sorted(rng.randrange(min(end, len(raw))) for _ in range(rng.choice((1, 1, 2, 8))))
        for i in spots:
            raw[i] = rng.choice((0, 0xFF, 0x7F, 0x80, raw[i] ^ (1 << rng.randrange(8))))
        x.files["model.gguf"] = bytes(raw)
        return f"bytes changed at {spots}"

    def gguf_splice(self, rng, x):
        raw, _, header_end = self._gguf_bytes(x)
        if not raw:
            return "model.gguf: empty, left as is"
        at, n = rng.randrange(min(header_end, len(raw))), rng.choice((1, 4, 8, 13))
        if rng.random() < 0.5:
            del raw[at:at + n]
            step = f"{n} bytes deleted at {at}"
        else:
            raw[at:at] = bytes(rng.getrandbits(8) for _ in range(n))
            step = f"{n} random bytes inserted at {at}"
        x.files["model.gguf"] = bytes(raw)
        return step

    def truncate(self, rng, x, name=None):
        name = name or ("model.gguf" if x.kind == "gguf" else "model.safetensors")
        raw = x.files[name]
        n = rng.randrange(len(raw) + 1) if rng.random() < 0.5 else rng.randrange(min(len(raw), 4096) + 1)
        x.files[name] = raw[:n]
        return f"{name} truncated to {n} bytes"

    # ------------------------------------------------------------------- safetensors

    @staticmethod
    def _split(raw: bytes):
        """(header, data) of a safetensors file; header None if it is not a JSON object."""
        n = int.from_bytes(raw[:8], "little")
        header = _json(raw[8:8 + n])
        return header if isinstance(header, dict) else None, raw[8 + n:]

    def _store(self, x, name, header, data, step, keep_length=False):
        text = _dumps(header)
        length = int.from_bytes(x.files[name][:8], "little") if keep_length else len(text)
        x.files[name] = struct.pack("<Q", length) + text + data
        return f"{name}: {step}" + (" (header length kept)" if keep_length else "")

    def safetensors_entry(self, rng, x, name="model.safetensors"):
        """A tensor's dtype, shape or data_offsets changed."""
        header, data = self._split(x.files[name])
        names = [n for n, e in (header or {}).items() if n != "__metadata__" and isinstance(e, dict)]
        if not names:  # an earlier mutation broke the header
            return self.safetensors_flip(rng, x, name)
        tensor = rng.choice(names)
        entry = header[tensor]
        key = rng.choice(("dtype", "shape", "data_offsets"))
        old = entry.get(key)
        pick = rng.random()
        if key == "dtype":
            new = rng.choice(SAFETENSORS_DTYPES + ("F8_E4M3", "Q4", "", "bf16", 3, None))
        elif pick < 0.7 and isinstance(old, list) and old:
            new = list(old)
            new[rng.randrange(len(new))] = rng.choice(BOUNDARY_JSON + ODD_JSON + (2**62, 7))
        elif pick < 0.8 and isinstance(old, list):
            new = old + [rng.choice((0, 1, 2))] if rng.random() < 0.5 else old[:-1]
        elif pick < 0.9 and key == "data_offsets":
            other = header[rng.choice(names)].get(key)
            new = other if rng.random() < 0.5 or not isinstance(old, list) else old[::-1]
        else:
            new = rng.choice(ODD_JSON + BOUNDARY_JSON)
        entry[key] = new
        return self._store(x, name, header, data, f"{tensor!r} {key}: {old!r} -> {_short(new)}",
                           keep_length=rng.random() < 0.1)

    def safetensors_reshape(self, rng, x, name="model.safetensors"):
        """A tensor's shape and dtype changed, its size in bytes kept: the file stays consistent."""
        header, data = self._split(x.files[name])
        names = [n for n, e in (header or {}).items() if isinstance(e, dict) and isinstance(e.get("shape"), list)
                 and all(type(d) is int for d in e["shape"])]
        if not names:
            return self.safetensors_flip(rng, x, name)
        tensor = rng.choice(names)
        entry = header[tensor]
        old = (entry["dtype"], entry["shape"])
        same_size = [group for group in (("F32", "I32"), ("BF16", "F16", "I16"), ("U8", "I8", "BOOL"),
                                         ("F64", "I64")) if entry["dtype"] in group]
        if same_size and rng.random() < 0.3:
            entry["dtype"] = rng.choice(same_size[0])
        else:
            entry["shape"] = _reshape(rng, entry["shape"])
        return self._store(x, name, header, data, f"{tensor!r} (dtype, shape): {old} -> "
                           f"{(entry['dtype'], entry['shape'])}")

    def safetensors_json(self, rng, x, name="model.safetensors"):
        header, data = self._split(x.files[name])
        if header is None:
            return self.safetensors_flip(rng, x, name)
        header, step = mutate_json(rng, header, self._paths())
        return self._store(x, name, header, data, step, keep_length=rng.random() < 0.1)

    def safetensors_length(self, rng, x, name="model.safetensors"):
        raw = bytearray(x.files[name])
        old = int.from_bytes(raw[:8], "little")
        new = _number(rng, old, 64)
        raw[:8] = new.to_bytes(8, "little")
        x.files[name] = bytes(raw)
        return f"{name}: header length {old} -> {new}"

    def safetensors_flip(self, rng, x, name="model.safetensors"):
        raw = bytearray(x.files[name])
        header_end = 8 + int.from_bytes(raw[:8], "little") if len(raw) >= 8 else len(raw)
        end = min(len(raw), header_end if rng.random() < 0.8 else len(raw))
        if not end:
            return f"{name}: empty, left as is"
        spots = sorted(rng.randrange(end) for _ in range(rng.choice((1, 1, 2, 8))))
        for i in spots:
            raw[i] = rng.choice((0, 0xFF, ord('"'), ord("]"), ord("9"), raw[i] ^ (1 << rng.randrange(8))))
        x.files[name] = bytes(raw)
        return f"{name}: bytes changed at {spots}"

    # ---------------------------------------------------------------- HF directories

    INDEX = "model.safetensors.index.json"
    TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

    def _paths(self):
        """Path strings for a shard: absolute, climbing out, into the decoys, odd."""
        d = self.decoys
        return ("/etc/passwd", "../../etc/passwd", "../" * 12 + "etc/passwd", f"{d}/secret.txt",
                f"{d}/model.safetensors", "../decoys/model.safetensors", "../decoys/secret.txt",
                "sub/../../decoys/secret.txt", "./model-00001-of-00002.safetensors",
                "model-00001-of-00002.safetensors/", ".", "..", "", "/", "a\u0000b", "~/.ssh/id_rsa",
                "C:\\Windows\\win.ini", "\\\\server\\share\\x", "config.json", "missing.safetensors")

    def shard_path(self, rng, x):
        index = _json(x.files.get(self.INDEX))
        if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict) \
                or not index["weight_map"]:
            return self.replace_file(rng, x)
        wm = index["weight_map"]
        names = list(wm)
        path = rng.choice(self._paths())
        chosen = names if rng.random() < 0.3 else [rng.choice(names)]
        for n in chosen:
            wm[n] = path
        x.files[self.INDEX] = _dumps(index)
        return f"weight_map: {len(chosen)} tensors -> {path!r}"

    def index_json(self, rng, x):
        return self._json_file(rng, x, self.INDEX)

    def config_json(self, rng, x):
        return self._json_file(rng, x, "config.json")

    def tokenizer_json(self, rng, x):
        return self._json_file(rng, x, rng.choice(self.TOKENIZER_FILES))

    def _json_file(self, rng, x, name):
        tree = _json(x.files.get(name))
        if tree is None:
            return self.json_syntax(rng, x)
        tree, step = mutate_json(rng, tree, self._paths())
        x.files[name] = _dumps(tree)
        return f"{name}: {step}"

    def json_syntax(self, rng, x):
        """config.json or the index no longer JSON, or not an object: truncated, not UTF-8,
        nested too deep (its values are left alone: they are content)."""
        name = rng.choice([n for n in ("config.json", self.INDEX) if isinstance(x.files.get(n), bytes)]
                          or ["config.json"])
        raw = x.files.get(name) if isinstance(x.files.get(name), bytes) else b"{}"
        pick = rng.random()
        if pick < 0.4:
            n = rng.randrange(len(raw) + 1)
            x.files[name] = raw[:n]
            return f"{name} truncated to {n} bytes"
        if pick < 0.8:
            x.files[name] = rng.choice((b"\xff\xfe{", b"\xef\xbb\xbf" + raw, raw + b"\x80", b"", b"[]", b"null"))
            return f"{name}: not UTF-8, a BOM, or not an object"
        depth = rng.choice((1000, 100_000))
        x.files[name] = b"[" * depth + b"]" * depth
        return f"{name}: arrays nested {depth} deep"

    def replace_file(self, rng, x, names=None):
        """A file deleted, emptied, made a directory or a symlink (inside, outside, dangling,
        to itself)."""
        if names is None:
            names = [n for n in x.files if n not in self.TOKENIZER_FILES]
        name = rng.choice([n for n in names if n in x.files] or list(x.files))
        others = [n for n in x.files if n != name] or ["nowhere"]
        choices = {"deleted": None, "emptied": b"", "a directory": DIRECTORY,
                   "a symlink to /etc/passwd": Symlink("/etc/passwd"),
                   "a symlink out of the directory": Symlink(os.path.join(self.decoys, name if name in (
                       "config.json", "model.safetensors") else "secret.txt")),
                   "a relative symlink out of the directory": Symlink("../decoys/secret.txt"),
                   "a symlink to another file in the directory": Symlink(rng.choice(others)),
                   "a dangling symlink": Symlink("nowhere"), "a symlink to itself": Symlink(name)}
        how = rng.choice(list(choices))
        if choices[how] is None:
            del x.files[name]
        else:
            x.files[name] = choices[how]
        return f"{name} {how}"

    def replace_tokenizer_file(self, rng, x):
        return self.replace_file(rng, x, names=self.TOKENIZER_FILES)

    def shard(self, rng, x):
        names = [n for n, c in x.files.items() if n.endswith(".safetensors") and isinstance(c, bytes)]
        if not names:
            return self.replace_file(rng, x)
        name = rng.choice(names)
        mutate = rng.choice((self.safetensors_entry, self.safetensors_json, self.safetensors_length,
                             self.safetensors_flip, lambda rng, x, name: self.truncate(rng, x, name)))
        return mutate(rng, x, name=name)


def _reshape(rng: random.Random, shape: list) -> list:
    """Another shape of as many elements: reversed, flattened, a dimension moved or added."""
    n = int(np.prod(shape)) if shape else 1
    pick = rng.random()
    if pick < 0.3 and len(shape) > 1:
        return shape[::-1]
    if pick < 0.5:
        return [n]
    if pick < 0.8 and shape and shape[0] % 2 == 0:
        return [shape[0] // 2] + [2 * shape[1] if len(shape) > 1 else 2] + shape[2:]
    return shape + [1] if rng.random() < 0.5 else [1] + shape


def mutate_json(rng: random.Random, tree, paths=()):
    """One change to a JSON tree at a random node (picked by depth first, so the top-level keys
    are as likely as the leaves of a long list): deleted, nulled, another type, a boundary
    number, a path string, something huge, or nested 100000 deep. Returns (tree, what changed)."""
    nodes = []  # (container, key, depth)

    def walk(node, depth):
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, child in items:
            nodes.append((node, key, depth))
            walk(child, depth + 1)
    walk(tree, 0)
    if not nodes:
        return rng.choice((None, [], 0, "x", {"a": NEST})), "the whole tree replaced"
    depth = rng.choice(sorted({d for _, _, d in nodes}))
    container, key, _ = rng.choice([n for n in nodes if n[2] == depth])
    old = container[key]
    pick = rng.random()
    if pick < 0.15:
        del container[key]
        return tree, f"{key!r} deleted"
    if pick < 0.45:
        new = rng.choice(BOUNDARY_JSON)
    elif pick < 0.7:
        new = rng.choice(ODD_JSON)
    elif pick < 0.85:
        new = rng.choice(paths) if paths else "../../etc/passwd"
    elif pick < 0.93:
        new = rng.choice(("A" * 1_000_000, [0] * 100_000, {str(i): i for i in range(10_000)}))
    else:
        new = NEST
    container[key] = new
    return tree, f"{key!r}: {_short(old)} -> {_short(new)}"


def _json(content):
    """A file's JSON tree, or None if an earlier mutation made it unreadable."""
    try:
        return json.loads(content)
    except (TypeError, ValueError, RecursionError):
        return None


def _dumps(tree) -> bytes:
    text = json.dumps(tree)  # NaN and Infinity as JavaScript spells them, as Python reads them
    return text.replace(json.dumps(NEST), "[" * 100_000 + "]" * 100_000).encode()


def _short(value) -> str:
    text = "arrays nested 100000 deep" if value == NEST else repr(value)
    return text if len(text) < 60 else f"{text[:40]}... ({len(text)} characters)"


# ------------------------------------------------------------------------------- fork server

@dataclass
class Result:
    outcome: str
    type: str = ""
    message: str = ""
    traceback: str = ""
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.outcome in PASSING


def _audit(decoys: str, opened: list):
    """An audit hook recording every open of a decoy or /etc/passwd (resolved)."""
    watched = os.path.realpath(decoys) + os.sep

    def hook(event, args):
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.path.realpath(os.fsdecode(args[0]))
            if path.startswith(watched) or path == "/etc/passwd":
                opened.append(path)
    return hook


def _child(request: dict, report: int) -> None:
    """Load one input under limits and write a Result (JSON) to `report`; never returns."""
    result = {"outcome": "loaded"}
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)  # stdout carries the server's replies
        err = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(err, 2)
        faulthandler.enable()  # a crash, or a hang near the deadline, leaves where it was in stderr
        faulthandler.dump_traceback_later(0.9 * request["timeout"])
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        limit = _address_space() + request["memory"]
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        opened: list = []
        sys.addaudithook(_audit(request["decoys"], opened))
        start = time.perf_counter()
        try:
            _load(request)
        except BaseException as e:  # noqa: BLE001 (anything but ValueError and OSError is a finding)
            outcome = "OSError" if isinstance(e, OSError) else "ValueError" if isinstance(e, ValueError) \
                else "other"
            result = {"outcome": outcome, "type": f"{type(e).__module__}.{type(e).__qualname__}",
                      "message": str(e)[:2000], "traceback": "".join(traceback.format_tb(e.__traceback__))[-6000:]}
        result["seconds"] = time.perf_counter() - start
        decoy = (DECOY_TEXT.decode().strip(), str(int.from_bytes(DECOY_TEXT[:8], "little")))
        if any(text in result.get("message", "") for text in decoy):
            result |= {"outcome": "escaped", "message": "decoy content in the message: " + result["message"]}
        if opened:
            result |= {"outcome": "escaped", "message": f"opened {sorted(set(opened))}; "
                       f"then {result.get('type') or 'loaded'}: {result.get('message', '')}"}
        data = json.dumps(result).encode()
    except BaseException:  # noqa: BLE001 (a failure of the report itself)
        data = json.dumps({"outcome": "other", "type": "harness", "traceback": traceback.format_exc()}).encode()
    try:
        while data:
            data = data[os.write(report, data):]
    finally:
        os._exit(0)


def _address_space() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))


# what a child does instead of loading, to check that each failure is reported as one
PROBES = {"crash": lambda request: os.kill(os.getpid(), signal.SIGSEGV),
          "hang": lambda request: time.sleep(3600),
          "other": lambda request: {}["no such key"],
          "memory": lambda request: bytearray(request["memory"] + (1 << 30)),
          "escape": lambda request: open(os.path.join(request["decoys"], "secret.txt")).close()}


def _load(request: dict) -> None:
    import tritlm

    if "probe" in request:
        return PROBES[request["probe"]](request)
    llm = tritlm.LLM(request["path"], n_threads=1, n_ctx=8)
    if request["logits"]:
        logits = llm.logits(llm.tokenize("a")[:1] or [0])
        assert logits.shape == (1, llm.config.vocab_size), logits.shape


def _wait(pid: int, report: int, timeout: float, stderr: str) -> dict:
    """The child's report, or a crash or hang; the child is reaped either way."""
    deadline, data = time.monotonic() + timeout, b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([report], [], [], left)[0]:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return {"outcome": "hang", "message": f"killed after {timeout} s", "traceback": _tail(stderr)}
        chunk = os.read(report, 1 << 16)
        if not chunk:
            break
        data += chunk
    _, status = os.waitpid(pid, 0)
    if data:
        return json.loads(data)
    tail = _tail(stderr)
    if os.WIFSIGNALED(status):
        return {"outcome": "crash", "type": signal.Signals(os.WTERMSIG(status)).name, "traceback": tail}
    return {"outcome": "crash", "type": f"exit status {os.WEXITSTATUS(status)}", "traceback": tail}


def _tail(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-4000:]


def serve() -> None:
    """The fork server: one JSON request per line on stdin, one Result per line on stdout.
    A request {"warmup": path} loads a model here, in the server (a valid one: the seeds), so
    that every child starts with what a first load imports and initializes already done
    (6x faster children). The server stays single-threaded (n_threads=1), so forking is safe."""
    import gc

    replies = os.fdopen(os.dup(1), "w")
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # nothing else may write to the replies
    for line in sys.stdin:
        request = json.loads(line)
        if "warmup" in request:
            _load({"path": request["warmup"], "logits": True})
            gc.freeze()  # what is here now stays shared with the children, not copied
            replies.write("{}\n")
            replies.flush()
            continue
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            _child(request, write)
        os.close(write)
        try:
            result = _wait(pid, read, request["timeout"], request["stderr"])
        finally:
            os.close(read)
        replies.write(json.dumps(result) + "\n")
        replies.flush()


class ForkServer:
    """Runs `serve` in a subprocess and loads inputs through it, once the server loaded every
    seed (kind -> Inputs) itself to warm up. timeout: seconds per input; memory: bytes a child
    may map beyond the server's address space (RLIMIT_AS)."""

    def __init__(self, work: str, seeds: dict, *, timeout: float = 10.0, memory: int = 1 << 30,
                 logits: bool = True):
        self.work = work
        self.timeout, self.memory, self.logits = timeout, memory, logits
        env = os.environ | {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1",
                            "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
        env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.abspath(__file__)), env.get("PYTHONPATH", "")])
        self._process = subprocess.Popen([sys.executable, "-c", "import fuzzing; fuzzing.serve()"],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self._count = 0
        for i, seed in enumerate(x for inputs in seeds.values() for x in inputs):
            self._ask({"warmup": seed.write(os.path.join(work, f"warmup{i}"))})

    def _ask(self, request: dict) -> dict:
        self._process.stdin.write(json.dumps(request) + "\n")
        self._process.stdin.flush()
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError("the fork server died")
        return json.loads(line)

    def run(self, x: Input, keep: bool = False, probe: str | None = None) -> tuple[Result, str]:
        """Load `x` (or run one of PROBES instead); returns the Result and the input's
        directory (removed unless keep)."""
        self._count += 1
        directory = os.path.join(self.work, f"input{self._count}")
        path = x.write(directory)
        request = {"path": path, "timeout": self.timeout, "memory": self.memory, "logits": self.logits,
                   "decoys": decoys(self.work), "stderr": os.path.join(self.work, "stderr.txt")}
        result = Result(**self._ask(request | ({"probe": probe} if probe else {})))
        if not keep:
            shutil.rmtree(directory)
        return result, directory

    def fuzz(self, mutator: Mutator, kind: str, n: int, seed: int | str, on_result=None) -> dict:
        """Load n inputs of `kind` made with random.Random(seed); outcome -> count.
        on_result(input, result, directory) is called for each, with its files still there."""
        rng, counts = random.Random(seed), dict.fromkeys(OUTCOMES, 0)
        for _ in range(n):
            x = mutator(rng, kind)
            result, directory = self.run(x, keep=on_result is not None)
            counts[result.outcome] += 1
            if on_result is not None:
                on_result(x, result, directory)
                shutil.rmtree(directory)
        return counts

    def close(self) -> None:
        self._process.stdin.close()
        self._process.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

