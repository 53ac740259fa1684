"""`tritlm bench`: a model's prompt and generation speed (llama-bench's flags), or
`tritlm bench kernels`: kernel throughput next to the machine's read bandwidth."""

from __future__ import annotations

import json
import sys


def add_parser(subparsers) -> None:
    from . import add_device_argument, add_model_source, add_weight_arguments

    bench = subparsers.add_parser(
        "bench", help="benchmarks: a model (-m), or the kernels",
        description="With -m: prompt processing (pp) and generation (tg) tokens/s of a model, "
                    "mean ± std over -r runs, load time, peak RSS and the decode roofline (bytes "
                    "read per token x tokens/s over the read bandwidth measured in the same run). "
                    "`tritlm bench kernels` benchmarks the kernels alone.")
    bench.add_argument("-m", "--model", help="GGUF file, Hugging Face directory or Hub id org/repo[:FILE]")
    add_model_source(bench)
    bench.add_argument("-p", "--n-prompt", type=int, nargs="+", default=[128], help="prompt lengths (default 128)")
    bench.add_argument("-n", "--n-gen", type=int, default=128, help="tokens to generate (default 128; 0: none)")
    bench.add_argument("-t", "--threads", type=int, nargs="+", default=None,
                       help="thread counts (default: every available core)")
    add_device_argument(bench)
    bench.add_argument("-r", "--repetitions", type=int, default=3, help="runs per test (default 3)")
    bench.add_argument("-o", "--output", default="md", choices=["md", "json", "csv"], help="output format")
    add_weight_arguments(bench)
    bench.add_argument("--lookup", type=int, nargs="?", const=8, default=None, metavar="N",
                       help="also decode greedily after a text with prompt lookup (up to N guesses a step, "
                            "default 8), beside plain decoding: tokens/s and guesses accepted")
    bench.add_argument("--draft", default=None, metavar="MODEL",
                       help="the same with a draft model (a smaller model with the same tokenizer)")
    bench.add_argument("--text-file", default=None, metavar="FILE",
                       help="the text --lookup and --draft continue (default: a class and the start of "
                            "the same class again, where a good guesser is right most of the time)")
    bench.set_defaults(func=run_model)
    targets = bench.add_subparsers(dest="target", metavar="TARGET")
    p = targets.add_parser(
        "kernels", help="GEMV GB/s and GEMM GMAC/s at the 2B4T shapes, beside read bandwidth",
        description="Streams ternary weights (GEMV, one token) and multiplies them by a batch "
                    "of tokens (GEMM) at the BitNet-b1.58-2B-4T shapes, in each weight layout "
                    "(tiles: 2 bits per weight; tiles5: 1.625, K a multiple of 256), and prints "
                    "each next to the read bandwidth this run measures. Best of --repeats passes.")
    p.add_argument("-t", "--threads", type=int, nargs="+", default=None,
                   help="thread counts to run (default: 1 and every available core)")
    p.add_argument("--tokens", type=int, default=128, help="tokens per GEMM (default 128)")
    p.add_argument("--shapes", nargs="+", default=None, metavar="MxK",
                   help="weight shapes out x in (default: the four 2B4T shapes)")
    p.add_argument("--stream-mib", type=int, default=1024,
                   help="MiB streamed per GEMV pass and read probe; keep it well above L3 (default 1024)")
    p.add_argument("-r", "--repeats", type=int, default=7, help="passes per measurement, best kept (default 7)")
    p.add_argument("--isa", default=None, help="kernel set (default: the best this CPU runs)")
    p.add_argument("--layouts", nargs="+", default=["tiles", "tiles5"], choices=["tiles", "tiles5"],
                   help="weight layouts (default: both)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a Markdown table")
    p.set_defaults(func=run_kernels)


def run_model(args) -> int:
    from ..bench import model as harness
    from ..kernels import default_threads

    if not args.model:
        raise ValueError("give a model with -m (or run `tritlm bench kernels`)")
    if args.device != "cpu":
        return run_cuda(args)
    threads = args.threads or [default_threads()]
    if min(threads) < 1 or min(args.n_prompt) < 1 or args.n_gen < 0 or args.repetitions < 1:
        raise ValueError("threads, prompt lengths and repetitions must be positive")
    if (args.lookup or args.draft) and args.n_gen < 2:
        raise ValueError("--lookup and --draft need -n of at least 2")
    if args.lookup is not None and args.lookup < 1:
        raise ValueError("--lookup N needs N of at least 1")
    text = harness.REPEATING_TEXT
    if args.text_file:
        with open(args.text_file, encoding="utf-8") as f:
            text = f.read()
    report = harness.run(args.model, prompts=args.n_prompt, n_gen=args.n_gen, threads=threads,
                         repeats=args.repetitions, weight_layout=args.weight_layout, mmap=args.mmap,
                         lookup=args.lookup, draft=args.draft, text=text)
    print({"md": harness.markdown, "csv": harness.csv, "json": lambda r: json.dumps(r, indent=1)}
          [args.output](report))
    return 0


def run_cuda(args) -> int:
    from ..cuda import require_cuda

    require_cuda()
    from ..bench import cuda as harness

    if min(args.n_prompt) < 1 or args.n_gen < 1:
        raise ValueError("prompt lengths and -n must be positive")
    report = harness.run(args.model, prompts=args.n_prompt, n_gen=args.n_gen, device=args.device)
    print(json.dumps(report, indent=1) if args.output == "json" else harness.markdown(report))
    return 0


def _shape(text: str) -> tuple[int, int]:
    try:
        m, k = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"shape {text!r} is not MxK, e.g. 2560x6912") from None
    if m < 1 or k < 128 or k % 128:
        raise ValueError(f"shape {text!r}: M must be positive and K a positive multiple of 128")
    return m, k


def _progress_line(row) -> None:
    """One line per measurement on stderr while `bench kernels` runs (minutes), stdout keeps the table."""
    print(f"measured {' '.join(filter(None, (row.kernel, row.layout, row.shape)))}, {row.threads} thread(s): "
          f"{row.seconds * 1e6:.1f} us", file=sys.stderr, flush=True)


def run_kernels(args) -> int:
    from ..bench import kernels as harness
    from ..kernels import default_isa, default_threads

    threads = tuple(args.threads or sorted({1, default_threads()}))
    if min(threads) < 1 or args.tokens < 1 or args.repeats < 1 or args.stream_mib < 1:
        raise ValueError("threads, tokens, repeats and stream size must be positive")
    shapes = tuple(_shape(s) for s in args.shapes) if args.shapes else harness.SHAPES_2B4T
    layouts = tuple(dict.fromkeys(args.layouts))
    isa = args.isa or default_isa()
    rows = harness.run(shapes=shapes, threads=threads, tokens=args.tokens,
                       stream_bytes=args.stream_mib << 20, repeats=args.repeats, isa=isa,
                       layout_names=layouts, progress=_progress_line)
    print(json.dumps({"isa": isa, "rows": harness.as_dicts(rows)}, indent=1) if args.json
          else harness.markdown(rows, isa))
    return 0
