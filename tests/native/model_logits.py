"""Logits of a model with every kernel set this CPU runs, one .npy per set, for the whole-model
check between aarch64 and x86 (.ci/aarch64-model-check): a prompt (every token's logits, one
multi-token step: the GEMM kernels), a second sequence of 3 tokens (an odd block), then decoding
token by token (the one-token kernels), f16 KV cache.

    python model_logits.py MODEL OUT_DIR
"""

import os
import platform
import sys
import time

import numpy as np

from tritlm import _native
from tritlm.models import loader
from tritlm.runtime import Engine


def logits(config, tensors):
    engine = Engine(config, tensors, n_threads=2)
    tokens = (np.arange(40) * 7919 % config.vocab_size).tolist()
    seq, other = engine.new_sequence(), engine.new_sequence()
    prompt, three = engine.forward([(seq, tokens[:29]), (other, tokens[29:32])], all_logits=True)
    steps = [engine.forward([(seq, [t])])[0] for t in tokens[32:]]
    return np.concatenate([prompt, three] + steps), engine.layers[0].matrices[0].layout


def main(model, out):
    config, tensors, _ = loader.load(model)
    for isa in _native.isas():
        os.environ["TRITLM_ISA"] = isa
        start = time.perf_counter()
        result, layout = logits(config, tensors)
        np.save(os.path.join(out, f"{isa}.npy"), result)
        print(f"{platform.machine()} {isa}: logits {result.shape} ({layout}), {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main(*sys.argv[1:])
