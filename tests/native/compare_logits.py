"""The whole-model check (.ci/aarch64-model-check): the logits each kernel set gave on x86 and on
emulated aarch64 (model_logits.py's .npy files), compared bit for bit.

Every set computes the same integer products; the float ops come in two kinds: the SIMD ones
(avx512, avx2; i8mm, dotprod, neon share the NEON ops), which fuse the multiply-adds the source
asks fused and reduce in one order, and the portable ones, which fuse nothing. So every aarch64
SIMD set must equal every x86 SIMD set, and portable must equal portable.

    python compare_logits.py X86_DIR AARCH64_DIR
"""

import os
import sys

import numpy as np

SIMD = {"avx512", "avx2", "i8mm", "dotprod", "neon"}


def load(directory):
    return {name[:-4]: np.load(os.path.join(directory, name)) for name in sorted(os.listdir(directory))}


def main(x86_dir, arm_dir):
    x86, arm = load(x86_dir), load(arm_dir)
    if set(arm) != {"i8mm", "dotprod", "neon", "portable"}:
        sys.exit(f"aarch64 ran {sorted(arm)}: expected i8mm, dotprod, neon and portable (qemu -cpu max)")
    failed = False
    for a, la in arm.items():
        for x, lx in x86.items():
            if (a in SIMD) != (x in SIMD):
                continue
            same = la.shape == lx.shape and la.tobytes() == lx.tobytes()
            diff = np.abs(la.astype(np.float64) - lx).max() if la.shape == lx.shape else float("nan")
            print(f"aarch64 {a:8} vs x86 {x:8}: {'identical' if same else f'DIFFERENT (max |diff| {diff:.3g})'}"
                  f" {la.shape}")
            failed |= not same
    if failed:
        sys.exit("whole-model check failed: aarch64 and x86 logits differ")
    print("whole-model check: aarch64 logits equal x86's bit for bit")


if __name__ == "__main__":
    main(*sys.argv[1:])
