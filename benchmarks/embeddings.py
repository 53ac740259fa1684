"""Embedding throughput: tritlm on the BitNet-embedding shapes (I2_S) against llama.cpp on the
same shapes in F16 (the baseline bitnet.cpp reports its speedup over), side by side.

    python benchmarks/embeddings.py [--preset 0.6B-embed 270M-embed] [-t 1 2] [--texts 32] [--tokens 128]

For each preset: a `tritlm dummy` file (random ternary weights, I2_S, F16 token embedding) and a
llama.cpp file of the same architecture and shapes with random F16 weights (qwen3 / gemma3 as
llama.cpp's converter names them: no BitLinear input norms, which llama.cpp does not know).
`--texts` sequences of `--tokens` random token ids are embedded (last-token pooling) by each, in
a fresh process per run: tritlm's `Engine.forward_hidden` stacks them all into one step;
llama.cpp decodes one text per llama_decode (llama-cpp-python's low-level API, embeddings on,
pooling LAST), its fastest way here. One warm-up, then `-r` timed runs; tokens/s of the best and
the median, and tritlm / llama.cpp. Needs llama-cpp-python (`pip install 'tritlm[bench]'`).
Kept out of CI.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np


def write_llama_f16(path: str, preset: str) -> None:
    """The preset's shapes as a float model in llama.cpp's naming, random F16 weights."""
    from tritlm.bench.dummy import dummy_config, dummy_tokenizer_metadata
    from tritlm.formats.gguf import GGUFValue, GGUFWriter, TensorType, ValueType
    from tritlm.models.loader import tensor_shape

    c = dummy_config(preset)
    a = c.arch
    layer = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_q_norm", "attn_k_norm", "attn_output", "ffn_norm",
             "ffn_gate", "ffn_up", "ffn_down"] + (["post_attention_norm", "post_ffw_norm"] if a == "gemma3" else [])
    names = [("token_embd", "token_embd"), ("output_norm", "output_norm")]
    names += [(f"blk.{i}.{kind}", kind) for i in range(c.n_layers) for kind in layer]
    u32 = lambda v: GGUFValue(int(v), ValueType.UINT32)  # noqa: E731
    f32 = lambda v: GGUFValue(float(v), ValueType.FLOAT32)  # noqa: E731
    metadata = {"general.architecture": a, "general.file_type": u32(1), f"{a}.block_count": u32(c.n_layers),
                f"{a}.context_length": u32(c.context_length), f"{a}.embedding_length": u32(c.hidden_size),
                f"{a}.feed_forward_length": u32(c.intermediate_size),
                f"{a}.attention.head_count": u32(c.n_heads), f"{a}.attention.head_count_kv": u32(c.n_kv_heads),
                f"{a}.attention.key_length": u32(c.head_dim), f"{a}.attention.value_length": u32(c.head_dim),
                f"{a}.rope.freq_base": f32(c.rope_theta), f"{a}.attention.layer_norm_rms_epsilon": f32(c.norm_eps),
                f"{a}.pooling_type": u32(3)} | dummy_tokenizer_metadata(c.vocab_size)
    if a == "gemma3":
        metadata[f"{a}.attention.sliding_window"] = u32(c.sliding_window)
    rng = np.random.default_rng(0)
    with GGUFWriter(path, metadata) as writer:
        for name, kind in names:
            shape = tensor_shape(c, kind)
            writer.add_tensor_info(f"{name}.weight", TensorType.F16 if len(shape) == 2 else TensorType.F32, shape)
        for name, kind in names:
            shape = tensor_shape(c, kind)
            if len(shape) == 2:
                data = (rng.standard_normal(shape, np.float32) * (0.5 if kind == "token_embd" else 0.02))
                writer.write_tensor_data(f"{name}.weight", data.astype(np.float16))
            else:
                writer.write_tensor_data(f"{name}.weight", np.ones(shape, np.float32))


def batches(n_texts: int, n_tokens: int, vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(1)
    return [[int(t) for t in rng.integers(300, vocab - 300, n_tokens)] for _ in range(n_texts)]


def tritlm_worker(path: str, threads: int, texts: list[list[int]], repeats: int) -> list[float]:
    from tritlm.models import loader
    from tritlm.runtime.engine import Engine

    engine = Engine(*loader.load(path)[:2], n_threads=threads, n_ctx=len(texts[0]))
    seconds = []
    for _ in range(repeats + 1):
        batch = [(engine.new_sequence(), ids) for ids in texts]
        start = time.perf_counter()
        rows = engine.forward_hidden(batch, all_rows=False)
        seconds.append(time.perf_counter() - start)
        assert len(rows) == len(texts) and np.isfinite(np.concatenate(rows)).all()
    return seconds[1:]


def llama_worker(path: str, threads: int, texts: list[list[int]], repeats: int) -> list[float]:
    """One llama_decode per text: llama.cpp's fastest way here (a batch of several sequences
    makes it attend over every token of the batch under a mask, ~4x slower at 32 x 128)."""
    import llama_cpp as ll

    quiet = ll.llama_log_callback(lambda level, text, user: None)  # (kept referenced while llama.cpp may call it)
    ll.llama_log_set(quiet, None)
    ll.llama_backend_init()
    model = ll.llama_model_load_from_file(os.fsencode(path), ll.llama_model_default_params())
    n = max(map(len, texts))
    cparams = ll.llama_context_default_params()
    cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = n
    cparams.embeddings = True
    cparams.pooling_type = ll.LLAMA_POOLING_TYPE_LAST
    cparams.n_threads = cparams.n_threads_batch = threads
    ctx = ll.llama_init_from_model(model, cparams)
    if not ctx:
        raise RuntimeError("llama_init_from_model failed")
    batch = ll.llama_batch_init(n, 0, 1)
    seconds = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        for ids in texts:
            ll.llama_memory_clear(ll.llama_get_memory(ctx), True)
            for p, token in enumerate(ids):
                batch.token[p], batch.pos[p], batch.n_seq_id[p] = token, p, 1
                batch.seq_id[p][0], batch.logits[p] = 0, p == len(ids) - 1
            batch.n_tokens = len(ids)
            if ll.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            if not ll.llama_get_embeddings_seq(ctx, 0):
                raise RuntimeError("no embedding")
        seconds.append(time.perf_counter() - start)
    ll.llama_batch_free(batch)
    ll.llama_free(ctx)
    ll.llama_model_free(model)
    return seconds[1:]


WORKERS = {"tritlm": tritlm_worker, "llama.cpp": llama_worker}


def spawn(kind: str, path: str, threads: int, texts_file: str, repetitions: int) -> list[float]:
    """A worker in a fresh interpreter: its seconds per timed run."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, __file__, "--worker", kind, "--path", path, "-t", str(threads),
               "-r", str(repetitions), "--texts-file", texts_file, "--result", out.name]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if done.returncode:
            raise RuntimeError(f"{kind} worker failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        with open(out.name) as f:
            return json.load(f)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", nargs="+", default=["0.6B-embed", "270M-embed"])
    p.add_argument("-t", "--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--texts", type=int, default=32)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("-r", "--repetitions", type=int, default=3)
    p.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--texts-file", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        with open(args.texts_file) as f:
            texts = json.load(f)
        seconds = WORKERS[args.worker](args.path, args.threads[0], texts, args.repetitions)
        with open(args.result, "w") as f:
            json.dump(seconds, f)
        return 0

    from tritlm.bench.dummy import dummy_config, write_dummy

    print(f"| model | threads | tritlm I2_S tok/s | llama.cpp F16 tok/s | tritlm / llama.cpp |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.preset:
            ours, theirs = os.path.join(tmp, f"{preset}-i2_s.gguf"), os.path.join(tmp, f"{preset}-f16.gguf")
            write_dummy(ours, preset)
            write_llama_f16(theirs, preset)
            texts_file = os.path.join(tmp, "texts.json")
            with open(texts_file, "w") as f:
                json.dump(batches(args.texts, args.tokens, dummy_config(preset).vocab_size), f)
            n = args.texts * args.tokens
            for threads in args.threads:
                rates = {kind: [n / s for s in spawn(kind, path, threads, texts_file, args.repetitions)]
                         for kind, path in (("tritlm", ours), ("llama.cpp", theirs))}
                best = {kind: max(r) for kind, r in rates.items()}
                cell = lambda r: f"{max(r):.0f} (median {statistics.median(r):.0f})"  # noqa: E731
                print(f"| {preset} | {threads} | {cell(rates['tritlm'])} | {cell(rates['llama.cpp'])} | "
                      f"{best['tritlm'] / best['llama.cpp']:.2f} |", flush=True)
            os.remove(ours), os.remove(theirs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
