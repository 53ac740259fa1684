"""Speculative decoding (prompt lookup), measured.

(a) What verification costs: one step feeding k = 1..8 tokens of one sequence (every row's
    logits kept, as verification does), against one token: this bounds the speedup. On --model
    (e.g. a 2B4T-shaped dummy, `tritlm dummy -o /tmp/2b4t.gguf`), each thread count in --threads.
(b) End to end, on --chat-model (default the bundled model): greedy tokens/s with and without
    `speculative="lookup"`, and the share of guesses accepted, on tasks whose output repeats
    the prompt and on free text (few repeats to find).
(c) The worst case, on the same model and on --model: a guesser that is always wrong (it knows
    plain decoding's tokens and proposes others), with k adapting as `speculative.Proposer` does,
    against plain decoding: what a bad guesser costs.
(d) (b)'s guessing at --model's cost: a random-weight model repeats nothing, and the bundled
    model's steps cost far less than its Python. So lookup's guesses on the bundled model are
    recorded step by step (how many proposed, how many accepted) and replayed on --model: the
    same number of guesses each step, as many right (plain decoding's own next tokens) as were
    accepted, the rest wrong. Tokens/s against plain decoding, each thread count; the tokens
    must come out the same.

    python benchmarks/speculative.py --model /tmp/2b4t.gguf --threads 1 2
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from tritlm import LLM
from tritlm.generation import TextStream
from tritlm.models import loader
from tritlm.runtime import Engine
from tritlm.sampling import SamplingParams
from tritlm.speculative import LookupProposer, Proposer

TASKS = {
    "repeat a list": "Fruits: apple, banana, cherry, damson, elderberry, fig, grape, honeydew, kiwi, lemon, "
                     "mango, nectarine, orange, papaya, quince.\nThe same list again: apple, banana,",
    "rename a variable": "def total(items):\n    result = 0\n    for item in items:\n        result += item.price\n"
                         "        if item.discount:\n            result -= item.discount\n    return result\n\n"
                         "# the same function, with result renamed to amount\ndef total(items):\n    amount",
    "quote a passage": "class Stack:\n    \"\"\"A last-in, first-out stack of items.\"\"\"\n\n    def __init__(self):\n"
                       "        self.items = []\n\n    def push(self, item):\n        self.items.append(item)\n\n"
                       "    def pop(self):\n        return self.items.pop()\n\n\nclass Stack:\n",
    "free text": "import",
}


def step_cost(path: str, threads: list[int], position: int, repeats: int) -> None:
    config, tensors, _ = loader.load(path)
    engine = Engine(config, tensors, n_ctx=position + 16)
    del tensors
    rng = np.random.default_rng(0)
    seq = engine.new_sequence()
    engine.forward([(seq, rng.integers(0, config.vocab_size, position).tolist())])  # a context to attend to
    print(f"(a) one step verifying k tokens vs one token, {path}, after {position} tokens of context")
    print("| threads | " + " | ".join(f"k={k}" for k in range(1, 9)) + " |")
    print("|---|" + "---|" * 8)
    for n in threads:
        engine.set_threads(n)
        ms = []
        for k in range(1, 9):
            times = []
            for _ in range(repeats + 1):  # the first warms up
                tokens = rng.integers(0, config.vocab_size, k).tolist()
                start = time.perf_counter()
                engine.forward([(seq, tokens)], all_logits=True)
                times.append(time.perf_counter() - start)
                seq.truncate(position)
            ms.append(1e3 * float(np.median(times[1:])))
        print(f"| {n} | " + " | ".join(f"{m / ms[0]:.2f}x" + (f" ({m:.0f} ms)" if k == 1 else "")
                                       for k, m in enumerate(ms, 1)) + " |")


def end_to_end(path: str | None, threads: int, n_gen: int) -> None:
    llm = LLM(path, n_threads=threads)
    print(f"\n(b) greedy generation of {n_gen} tokens, {llm.model_name}, {threads} threads")
    print("| task | plain tokens/s | lookup tokens/s | speedup | accepted / proposed | same text |")
    print("|---|---|---|---|---|---|")
    for task, prompt in TASKS.items():
        rates, texts = [], []
        for mode in (None, "lookup"):
            llm.generate(prompt, max_tokens=8, temperature=0, speculative=mode)  # warm-up
            texts.append(llm.generate(prompt, max_tokens=n_gen, temperature=0, speculative=mode))
            t = llm.timings
            rates.append((t["generated_tokens"] - 1) / t["decode_seconds"])
        accepted = f"{t['accepted_tokens']} / {t['proposed_tokens']}"
        print(f"| {task} | {rates[0]:.1f} | {rates[1]:.1f} | {rates[1] / rates[0]:.2f}x | {accepted} | "
              f"{'yes' if texts[0] == texts[1] else 'NO'} |")


class AlwaysWrong(Proposer):
    """Guesses that are always wrong: the token after each of plain decoding's `truth` (the
    tokens generated after a prompt of `start` tokens)."""

    def __init__(self, truth: list[int], start: int, vocab: int, k_max: int):
        super().__init__(k_max=k_max)
        self.truth, self.start, self.vocab = truth, start, vocab

    def _guess(self, context: list[int], k: int) -> list[int]:
        at = len(context) - self.start
        return [(t + 1) % self.vocab for t in self.truth[at : at + k]]


class Recording(LookupProposer):
    """Prompt lookup that keeps, for each step, [guesses proposed, guesses accepted]."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.steps: list[list[int]] = []

    def propose(self, context: list[int], limit: int | None = None) -> list[int]:
        guesses = super().propose(context, limit)
        self.steps.append([len(guesses), 0])
        return guesses

    def record(self, proposed: int, accepted: int) -> None:
        super().record(proposed, accepted)
        self.steps[-1][1] = accepted


class Replay(Proposer):
    """Another run's guessing, step by step: as many guesses as it proposed, the first as many as
    it had accepted right (plain decoding's `truth`, generated after a prompt of `start` tokens),
    the others wrong."""

    def __init__(self, steps: list[list[int]], truth: list[int], start: int, vocab: int):
        super().__init__()
        self.steps, self.truth, self.start, self.vocab = iter(steps), truth, start, vocab

    def propose(self, context: list[int], limit: int | None = None) -> list[int]:
        proposed, accepted = next(self.steps)
        at = len(context) - self.start
        right = self.truth[at : at + accepted]
        wrong = [(t + 1) % self.vocab for t in self.truth[at + accepted : at + proposed]]
        return (right + wrong)[:limit]


def _greedy_ids(llm: LLM, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens, on past any end-of-text token."""
    stream = TextStream(llm.tokenizer, max_tokens=n, stop_ids=set())
    "".join(llm._pieces(prompt, stream, SamplingParams(temperature=0), "lookup"))
    return stream.tokens


def worst_case(path: str | None, threads: int, n_gen: int, repeats: int) -> None:
    llm = LLM(path, n_threads=threads)
    prompt = llm.tokenize(TASKS["free text"])
    print(f"\n(c) worst case: greedy generation of {n_gen} tokens with always-wrong guesses, "
          f"{llm.model_name}, {threads} threads, median of {repeats}")
    print("| max guesses | plain tokens/s | always wrong tokens/s | ratio | guesses proposed |")
    print("|---|---|---|---|---|")
    truth = _greedy_ids(llm, prompt, n_gen)
    for k_max in (1, 4, 8):
        rates = {None: [], "wrong": []}
        for _ in range(repeats):
            for mode in rates:
                llm._proposer = (lambda *_: AlwaysWrong(truth, len(prompt), llm.config.vocab_size, k_max)) \
                    if mode else (lambda *_: None)
                assert _greedy_ids(llm, prompt, n_gen) == truth
                t = llm.timings
                rates[mode].append((t["generated_tokens"] - 1) / t["decode_seconds"])
        plain, wrong = (float(np.median(r)) for r in rates.values())
        print(f"| {k_max} | {plain:.1f} | {wrong:.1f} | {wrong / plain:.3f} | {t['proposed_tokens']} "
              f"({t['accepted_tokens']} accepted) |")


def replayed(chat_path: str | None, path: str, threads: list[int], n_gen: int, repeats: int) -> None:
    chat = LLM(chat_path)
    patterns = {}
    for task, prompt in TASKS.items():
        recording = Recording()
        chat._proposer = lambda *_: recording
        _greedy_ids(chat, chat.tokenize(prompt), n_gen)
        patterns[task] = recording.steps
    llm = LLM(path, n_ctx=512)
    print(f"\n(d) {chat.model_name}'s lookup guesses in (b), replayed on {llm.model_name}: greedy, {n_gen} tokens, "
          f"median of {repeats}")
    print("| task | threads | plain tokens/s | replayed tokens/s | speedup | accepted / proposed | same tokens |")
    print("|---|---|---|---|---|---|---|")
    for n in threads:
        llm.engine.set_threads(n)
        for task, steps in patterns.items():
            prompt = llm.tokenize(TASKS[task])
            llm._proposer = lambda *_: None
            truth = _greedy_ids(llm, prompt, n_gen)
            rates, same = {"plain": [], "replay": []}, True
            for _ in range(repeats):
                for mode in rates:
                    llm._proposer = (lambda *_: Replay(steps, truth, len(prompt), llm.config.vocab_size)) \
                        if mode == "replay" else (lambda *_: None)
                    same &= _greedy_ids(llm, prompt, n_gen) == truth
                    t = llm.timings
                    rates[mode].append((t["generated_tokens"] - 1) / t["decode_seconds"])
            plain, replay = (float(np.median(r)) for r in rates.values())
            accepted, proposed = (sum(s[i] for s in steps) for i in (1, 0))
            print(f"| {task} | {n} | {plain:.2f} | {replay:.2f} | {replay / plain:.2f}x | {accepted} / {proposed} | "
                  f"{'yes' if same else 'NO'} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", help="GGUF for (a), e.g. a 2B4T dummy (default: skip (a))")
    p.add_argument("-t", "--threads", type=int, nargs="+", default=[1, 2], help="thread counts for (a) (default 1 2)")
    p.add_argument("--position", type=int, default=256, help="context tokens before the verified ones (default 256)")
    p.add_argument("-r", "--repetitions", type=int, default=5, help="timed steps per k (default 5)")
    p.add_argument("--chat-model", help="model for (b) (default: the bundled model)")
    p.add_argument("-n", "--n-gen", type=int, default=128, help="tokens generated per run in (b) (default 128)")
    args = p.parse_args()
    if args.model:
        step_cost(args.model, args.threads, args.position, args.repetitions)
    end_to_end(args.chat_model, args.threads[-1], args.n_gen)
    worst_case(args.chat_model, args.threads[-1], args.n_gen, args.repetitions)
    if args.model:
        for n in args.threads:
            worst_case(args.model, n, args.n_gen, args.repetitions)
        replayed(args.chat_model, args.model, args.threads, args.n_gen, args.repetitions)


if __name__ == "__main__":
    main()
