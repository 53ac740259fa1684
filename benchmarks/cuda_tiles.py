"""Tile sizes of the GPU ternary kernels at the BitNet-b1.58-2B-4T shapes: the GEMV (one token)
and the int8 tensor-core GEMM (16, 64, 512 tokens), each over 30 copies of the matrix so the
weights stream from memory. Prints one line per (kernel, shape, tile). Needs a CUDA GPU.

    python benchmarks/cuda_tiles.py
"""

import time

import torch

from tritlm.bench.cuda import copy_bandwidth, graph_seconds
from tritlm.cuda import kernels as K

SHAPES = [(3840, 2560), (2560, 2560), (13824, 2560), (2560, 6912)]
GEMV_TILES = [(1024, 4), (2048, 4), (4096, 4), (2048, 8), (4096, 8), (1024, 2)]  # (words per program, warps)
GEMM_TILES = {16: [(16, 32, 4), (16, 32, 2), (16, 64, 4)], 512: [(128, 64, 8), (64, 64, 4), (128, 32, 4)]}


def matrices(m, k, n=30):
    codes = torch.randint(0, 3, (m, k), device="cuda")
    words = K.pack_codes(codes)
    return [K.Matrix(words.clone(), torch.rand(m, device="cuda"), (m, k)) for _ in range(n)]


def main():
    start = time.perf_counter()
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    for m, k in SHAPES:
        ws = matrices(m, k)
        for tokens in (1, 16, 512):
            x = torch.randn(tokens, k, device="cuda")
            act = K.quantize(x, with_y=tokens == 1)
            out = torch.empty(tokens, m, device="cuda")
            for tile in GEMV_TILES if tokens == 1 else GEMM_TILES[tokens]:
                if tokens == 1:
                    K.GEMV_SHORT = K.GEMV_LONG = tile
                else:
                    K._gemm_tile = lambda t, tile=tile: tile
                try:
                    s = graph_seconds(lambda: [K.linear(act, w, out=out) for w in ws]) / len(ws)
                except Exception as e:  # a tile that does not compile (shared memory, registers)
                    print(f"{m}x{k} t={tokens} tile={tile}: {type(e).__name__} {str(e)[:120]}")
                    continue
                gbps = ws[0].nbytes / s / 1e9
                tops = 2 * m * k * tokens / s / 1e12
                print(f"{m}x{k} t={tokens} tile={tile}: {s * 1e6:8.1f} us {gbps:6.0f} GB/s "
                      f"({gbps * 1e9 / bandwidth:4.0%} of copy) {tops:6.1f} TOPS", flush=True)
        del ws
        if time.perf_counter() - start > 100:
            print("stopping: time")
            break


if __name__ == "__main__":
    main()
