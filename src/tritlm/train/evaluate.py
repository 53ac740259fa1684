"""Perplexity of a PyTorch model measured exactly as `tritlm.LLM.perplexity` measures it (same
windows, same scoring), so the two can be compared number for number."""

from __future__ import annotations

import torch

from ..api import perplexity_stats, perplexity_windows, window_nll
from ..tokenizer import Tokenizer
from .model import BitNetModel


@torch.no_grad()
def perplexity(model: BitNetModel, tokenizer: Tokenizer, text: str, n_ctx: int | None = None,
               batch_windows: int = 8) -> tuple[float, float]:
    """(perplexity, standard error) of `text`: llama-perplexity's windows of n_ctx tokens
    (default min(512, the model's context)), second halves scored."""
    c = n_ctx or min(512, model.args.context_length)
    windows = perplexity_windows(tokenizer.encode(text, add_bos=True, special=False), c,
                                 tokenizer.bos_id)
    model.eval()
    nll = []
    for i in range(0, len(windows), batch_windows):
        group = windows[i:i + batch_windows]
        logits = model(torch.tensor(group)).numpy()
        nll.extend(window_nll(row, w) for row, w in zip(logits, group))
    return perplexity_stats(nll)
