"""The training loop: data preparation, AdamW with BitNet b1.58's two-stage schedule, eval loss,
checkpoints and resume, export."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..tokenizer import Tokenizer
from . import data
from .export import export_gguf, export_hf
from .model import BitNetModel, ModelArgs

LOG_SECONDS = 30.0  # how often a progress line is logged when stderr is no terminal (no bar there)


@dataclass
class TrainOptions:
    data: list[str] = field(default_factory=list)  # text files or folders
    out_dir: str = "tritlm-model"
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=lambda: list(data.DEFAULT_EXCLUDE))
    eval_fraction: float = 0.02
    tokenizer: str | None = None  # a directory with tokenizer.json; None: train one
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 768
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    context_length: int = 512
    rope_theta: float = 10000.0
    batch_size: int = 8
    steps: int = 2000
    time_limit: float | None = None  # minutes of optimization; the schedule follows the clock
    lr: float = 3e-3  # stage-1 peak
    cooldown_lr: float = 1e-3  # stage-2 peak, after the abrupt drop
    cooldown_start: float = 0.5  # fraction of training where stage 2 begins
    warmup: int = 100
    weight_decay: float = 0.1  # stage 1 only
    grad_clip: float = 1.0
    eval_interval: int = 200
    eval_windows: int = 64
    checkpoint_interval: int = 200
    seed: int = 0
    threads: int | None = None
    gguf: str | None = None  # GGUF output path; None: OUT/model.gguf
    name: str = "tritlm"

    def model_args(self, vocab_size: int) -> ModelArgs:
        return ModelArgs(vocab_size=vocab_size, hidden_size=self.hidden_size,
                         intermediate_size=self.intermediate_size, n_layers=self.n_layers,
                         n_heads=self.n_heads, n_kv_heads=self.n_kv_heads,
                         context_length=self.context_length, rope_theta=self.rope_theta)


def schedule(o: TrainOptions, step: int, progress: float) -> tuple[float, float]:
    """(learning rate, weight decay) at `step`, `progress` in [0, 1] through training.

    BitNet b1.58's two stages: a high peak with cosine decay (weight decay on), then, from
    `cooldown_start`, an abrupt drop to `cooldown_lr`, cosine-decayed to zero, weight decay off.
    """
    warm = min(1.0, (step + 1) / o.warmup) if o.warmup else 1.0
    if progress < o.cooldown_start:
        return warm * o.lr * 0.5 * (1 + math.cos(math.pi * progress)), o.weight_decay
    p = (progress - o.cooldown_start) / max(1e-9, 1 - o.cooldown_start)
    return warm * o.cooldown_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, p))), 0.0


def check_memory(args: ModelArgs, batch_size: int) -> None:
    """Refuse, before allocating anything, a model whose weights, gradients, AdamW moments and
    activations would not fit in the memory available."""
    n = args.n_params()
    t = batch_size * args.context_length
    per_layer = t * (24 * args.hidden_size + 10 * args.intermediate_size) + \
        2 * batch_size * args.n_heads * args.context_length ** 2
    need = 16 * n + 4 * (args.n_layers * per_layer + 3 * t * args.vocab_size)
    available = _available_memory()
    if available is not None and need > 0.8 * available:
        raise ValueError(f"the model is too large for this machine's memory: {n / 1e6:.1f}M "
                         f"parameters need about {need / 2**30:.1f} GiB to train (weights, "
                         f"gradients, optimizer state, activations) and {available / 2**30:.1f} GiB "
                         "is available; make it smaller or lower the batch size")


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


# ----------------------------------------------------------------------------------- data


def prepare_data(o: TrainOptions, log=print, resume: bool = False) -> tuple[Tokenizer, np.ndarray, np.ndarray]:
    """Tokenizer and (train, eval) token streams, cached in the output directory for resume."""
    out = Path(o.out_dir)
    tok_dir = out / "tokenizer"
    cached = out / "train_tokens.npy", out / "eval_tokens.npy"
    if resume and all(p.is_file() for p in cached) and (tok_dir / "tokenizer.json").is_file():
        return Tokenizer.from_hf(tok_dir), *(np.load(p) for p in cached)
    if not o.data:
        raise ValueError("give the training text: files or folders")
    files = data.find_files(o.data, o.include, o.exclude)
    docs = data.read_documents(files)
    train_docs, eval_docs = data.split_documents(docs, o.eval_fraction)
    log(f"corpus: {len(docs)} files, {sum(len(t) for _, t in docs) / 1e6:.1f}M characters; "
        f"{len(eval_docs)} held out for evaluation")
    out.mkdir(parents=True, exist_ok=True)
    if o.tokenizer:
        src = Path(o.tokenizer)
        src = src.parent if src.name == "tokenizer.json" else src
        if not (src / "tokenizer.json").is_file():
            raise ValueError(f"{o.tokenizer}: no tokenizer.json there")
        tok_dir.mkdir(exist_ok=True)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (src / name).is_file():
                (tok_dir / name).write_bytes((src / name).read_bytes())
    else:
        start = time.perf_counter()
        data.train_tokenizer((t for _, t in train_docs), o.vocab_size, tok_dir)
        log(f"tokenizer: byte-level BPE of {o.vocab_size} tokens trained in "
            f"{time.perf_counter() - start:.0f} s")
    tokenizer = Tokenizer.from_hf(tok_dir)
    train_tokens = data.encode_documents(tokenizer, train_docs)
    eval_tokens = data.encode_documents(tokenizer, eval_docs)
    if len(train_tokens) < o.context_length + 1:
        raise ValueError(f"the corpus has {len(train_tokens)} training tokens, fewer than one "
                         f"window of {o.context_length + 1}")
    np.save(cached[0], train_tokens)
    np.save(cached[1], eval_tokens)
    (out / "heldout.txt").write_text("".join(t for _, t in eval_docs), encoding="utf-8")
    (out / "heldout_files.txt").write_text("".join(n + "\n" for n, _ in eval_docs), encoding="utf-8")
    log(f"tokens: {len(train_tokens):,} for training, {len(eval_tokens):,} held out")
    return tokenizer, train_tokens, eval_tokens


def batch(tokens: np.ndarray, o: TrainOptions, step: int) -> torch.Tensor:
    """Random windows of context_length + 1 tokens; the generator is seeded by (seed, step), so
    a resumed run sees the same batches."""
    rng = np.random.default_rng([o.seed, step])
    starts = rng.integers(0, len(tokens) - o.context_length, o.batch_size)
    return torch.from_numpy(np.stack([tokens[s:s + o.context_length + 1] for s in starts]).astype(np.int64))


@torch.no_grad()
def eval_loss(model: BitNetModel, tokens: np.ndarray, o: TrainOptions) -> float | None:
    """Mean next-token loss over the first `eval_windows` non-overlapping windows of held-out text."""
    n = o.context_length + 1
    windows = [tokens[i:i + n] for i in range(0, len(tokens) - n + 1, n)][:o.eval_windows]
    if not windows:
        return None
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), o.batch_size):
        x = torch.from_numpy(np.stack(windows[i:i + o.batch_size]).astype(np.int64))
        logits = model(x[:, :-1])
        total += F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
        count += x[:, 1:].numel()
    model.train()
    return total / count


# ------------------------------------------------------------------------------ training


def train(o: TrainOptions, resume: bool = False, *, steps: int | None = None,
          time_limit: float | None = None, log=None) -> dict:
    """Train as `o` says, export, and return a summary. resume: continue the run in o.out_dir
    with its saved options, to new totals of `steps` / `time_limit` minutes if given."""
    from tqdm import tqdm

    log = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
    out = Path(o.out_dir)
    ckpt_path = out / "checkpoint.pt"
    if resume:
        if not ckpt_path.is_file():
            raise ValueError(f"{ckpt_path}: no checkpoint to resume from")
        state = torch.load(ckpt_path, weights_only=False)
        o = TrainOptions(**state["options"])
        o.steps = o.steps if steps is None else steps
        o.time_limit = o.time_limit if time_limit is None else time_limit
    if o.threads:
        torch.set_num_threads(o.threads)
    if o.steps < 1 and not o.time_limit:
        raise ValueError("give a positive number of steps or a time limit")
    wall_start = time.perf_counter()
    if not o.tokenizer:  # fail before the work of preparing the data
        check_memory(o.model_args(o.vocab_size), o.batch_size)
    tokenizer, train_tokens, eval_tokens = prepare_data(o, log, resume)
    args = o.model_args(tokenizer.vocab_size)
    check_memory(args, o.batch_size)
    (out / "options.json").write_text(json.dumps(asdict(o), indent=2))

    torch.manual_seed(o.seed)
    model = BitNetModel(args)
    decay = [p for n, p in model.named_parameters() if p.dim() == 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]  # norms
    optimizer = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=o.lr, betas=(0.9, 0.95), eps=1e-8, fused=False)
    step, elapsed, history = 0, 0.0, []
    if resume:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed, history = state["step"], state["elapsed"], state["history"]
        log(f"resumed at step {step} ({elapsed / 60:.1f} min trained)")
    log(f"model: {args.n_params() / 1e6:.2f}M parameters, {args.n_layers} layers, hidden "
        f"{args.hidden_size}, vocab {args.vocab_size}, context {args.context_length}")

    def progress() -> float:
        p = step / o.steps if o.steps else 0.0
        if o.time_limit:
            p = max(p, elapsed / (60 * o.time_limit))
        return min(1.0, p)

    def save():
        torch.save({"options": asdict(o), "model_args": args.to_dict(), "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(), "step": step, "elapsed": elapsed,
                    "history": history}, out / "checkpoint.tmp")
        os.replace(out / "checkpoint.tmp", ckpt_path)

    tokens_per_step = o.batch_size * o.context_length
    # a bar on a terminal; elsewhere (a log file, CI) a line every LOG_SECONDS instead
    interactive = sys.stderr.isatty()
    bar = tqdm(total=o.steps or None, initial=step, unit="step", file=sys.stderr, dynamic_ncols=True,
               disable=not interactive)
    last_line = time.perf_counter()
    model.train()
    loss_avg = None
    try:
        while progress() < 1.0:
            t0 = time.perf_counter()
            lr, wd = schedule(o, step, progress())
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.param_groups[0]["weight_decay"] = wd
            loss = model.loss(batch(train_tokens, o, step))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
            optimizer.step()
            step += 1
            dt = time.perf_counter() - t0
            elapsed += dt
            loss_avg = loss.item() if loss_avg is None else 0.95 * loss_avg + 0.05 * loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{loss_avg:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_step / dt:.0f}",
                            min=f"{elapsed / 60:.1f}")
            if not interactive and time.perf_counter() - last_line >= LOG_SECONDS:
                last_line = time.perf_counter()
                log(f"step {step}{f'/{o.steps}' if o.steps else ''}: train loss {loss_avg:.3f}, lr {lr:.2e}, "
                    f"{tokens_per_step / dt:.0f} tokens/s, {elapsed / 60:.1f} min")
            done = progress() >= 1.0
            t1 = time.perf_counter()  # evals and checkpoints count towards the time limit too
            if step % o.eval_interval == 0 or done:
                ev = eval_loss(model, eval_tokens, o)
                history.append({"step": step, "minutes": round(elapsed / 60, 2), "lr": lr,
                                "train_loss": round(loss_avg, 4), "eval_loss": ev})
                log(f"step {step}: train loss {loss_avg:.3f}" + (f", eval loss {ev:.3f} (ppl "
                    f"{math.exp(ev):.2f})" if ev is not None else "") + f", {elapsed / 60:.1f} min")
                with open(out / "train_log.jsonl", "a") as f:
                    f.write(json.dumps(history[-1]) + "\n")
            if step % o.checkpoint_interval == 0 or done:
                save()
            elapsed += time.perf_counter() - t1
    except KeyboardInterrupt:  # keep what was trained: --resume continues from here
        bar.close()
        save()
        log(f"interrupted at step {step}; checkpoint saved in {ckpt_path}")
        raise
    bar.close()
    if not history or history[-1]["step"] != step:  # a resumed, already finished run
        history.append({"step": step, "minutes": round(elapsed / 60, 2),
                        "eval_loss": eval_loss(model, eval_tokens, o)})
    save()
    gguf_path = o.gguf or str(out / "model.gguf")
    model.eval()
    export_gguf(model, tokenizer, gguf_path, name=o.name)
    export_hf(model, out / "tokenizer", out / "hf")
    summary = {"steps": step, "train_minutes": elapsed / 60, "tokens_seen": step * tokens_per_step,
               "parameters": args.n_params(), "eval_loss": history[-1]["eval_loss"],
               "gguf": gguf_path, "gguf_bytes": os.path.getsize(gguf_path), "hf": str(out / "hf"),
               "wall_minutes": (time.perf_counter() - wall_start) / 60}
    log(f"done: {step} steps, {summary['tokens_seen']:,} tokens in {elapsed / 60:.1f} min; "
        f"wrote {gguf_path} ({summary['gguf_bytes'] / 1e6:.1f} MB) and {out / 'hf'}")
    return summary


def load_checkpoint(path) -> tuple[BitNetModel, TrainOptions]:
    """The model (in eval mode) and options of a checkpoint.pt."""
    state = torch.load(path, weights_only=False)
    model = BitNetModel(ModelArgs(**state["model_args"]))
    model.load_state_dict(state["model"])
    return model.eval(), TrainOptions(**{k: v for k, v in state["options"].items()
                                         if k in {f.name for f in fields(TrainOptions)}})
