"""The figures of docs/PERFORMANCE.md in one run: generation speed against model size
(bitnet.cpp's dummy presets), prompt speed against prompt length, and both against threads.

Writes the dummy models into --dir (kept there, and reused by the next run), then runs
`tritlm bench` on each in its own process (so each peak RSS is that model's alone) and prints
Markdown tables. Loopback-free and offline: nothing but local files.

    python benchmarks/performance.py --dir /tmp/tritlm-perf
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

SIZES = ["125M", "350M", "1B", "1.5B", "2.7B", "3.8B", "7B"]
PROMPTS = [128, 256, 512, 1024, 2048]


def dummy(directory: str, preset: str, ternary_type: str, embedding: str) -> str:
    path = os.path.join(directory, f"dummy-{preset}-{ternary_type}-{embedding}.gguf")
    if not os.path.exists(path):
        subprocess.run([sys.executable, "-m", "tritlm", "dummy", "-o", path + ".part", "--preset", preset,
                        "--type", ternary_type, "--embedding", embedding], check=True)
        os.rename(path + ".part", path)
    return path


def bench(path: str, prompts: list[int], n_gen: int, threads: list[int], repeats: int) -> dict:
    command = [sys.executable, "-m", "tritlm", "bench", "-m", path, "-p", *map(str, prompts),
               "-n", str(n_gen), "-t", *map(str, threads), "-r", str(repeats), "-o", "json"]
    report = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    report["file_mb"] = os.path.getsize(path) / 1e6
    return report


def rate(report: dict, test: str, threads: int) -> dict:
    return next(r for r in report["rows"] if r["test"] == test and r["threads"] == threads)


def size_table(reports: dict[str, dict], threads: list[int], n_gen: int) -> str:
    head = "| model | file MB | MB read per token | load s | peak RSS MB | " + " | ".join(
        f"pp128 {t}t | tg{n_gen} {t}t (roofline)" for t in threads) + " |"
    lines = [head, "|" + "---|" * (4 + 1 + 2 * len(threads))]
    for preset, r in reports.items():
        cells = []
        for t in threads:
            tg = rate(r, f"tg{n_gen}", t)
            cells += [f"{rate(r, 'pp128', t)['tokens_per_s']:.1f}",
                      f"{tg['tokens_per_s']:.1f} ({tg['roofline']:.0%} of {tg['read_gbps']:.1f} GB/s)"]
        lines.append(f"| {preset} | {r['file_mb']:.0f} | {r['decode_mb_per_token']:.0f} | {r['load_seconds']:.2f} | "
                     f"{r['peak_rss_mb']:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def prompt_table(report: dict, prompts: list[int], threads: list[int]) -> str:
    lines = ["| prompt tokens | " + " | ".join(f"pp {t}t tokens/s" for t in threads) + " |",
             "|" + "---|" * (1 + len(threads))]
    for p in prompts:
        lines.append(f"| {p} | " + " | ".join(
            f"{rate(report, f'pp{p}', t)['tokens_per_s']:.1f} ± {rate(report, f'pp{p}', t)['std']:.1f}"
            for t in threads) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default="/tmp/tritlm-perf", help="where the dummy models are written")
    parser.add_argument("--sizes", nargs="+", default=SIZES, help="dummy presets for the size sweep")
    parser.add_argument("--prompts", type=int, nargs="+", default=PROMPTS, help="prompt lengths (2B4T shape)")
    parser.add_argument("-t", "--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("-n", "--n-gen", type=int, default=128)
    parser.add_argument("-r", "--repetitions", type=int, default=2)
    parser.add_argument("--type", default="I2_S", choices=["I2_S", "TQ2_0", "TQ1_0"])
    parser.add_argument("--embedding", default="Q6_K", choices=["F16", "Q8_0", "Q6_K"])
    parser.add_argument("--json", action="store_true", help="print the raw reports as JSON")
    args = parser.parse_args(argv)
    os.makedirs(args.dir, exist_ok=True)

    sizes = {}
    for preset in args.sizes:
        path = dummy(args.dir, preset, args.type, args.embedding)
        sizes[preset] = bench(path, [128], args.n_gen, args.threads, args.repetitions)
        print(f"{preset}: done", file=sys.stderr)
    if not args.json:
        print(f"## Generation against model size ({args.type}, {args.embedding} embedding)\n")
        print(size_table(sizes, args.threads, args.n_gen), flush=True)
    prompts = bench(dummy(args.dir, "2B4T", args.type, args.embedding), args.prompts, 0, args.threads,
                    args.repetitions)
    if args.json:
        print(json.dumps({"sizes": sizes, "prompts": prompts}, indent=1))
    else:
        print(f"\n## Prompt processing against prompt length (2B4T shape, {args.type}, {args.embedding} embedding)\n")
        print(prompt_table(prompts, args.prompts, args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
