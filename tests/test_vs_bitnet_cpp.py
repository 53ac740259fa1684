"""benchmarks/vs_bitnet_cpp.py: its arguments, the interleaved schedule, llama-bench's JSON, the
build flags it reports, one end-to-end run against a stand-in llama-bench (the real tritlm side),
and, where BITNET_LLAMA_BENCH names a bitnet.cpp build, one tiny run against the real one."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "vs_bitnet_cpp.py"


@pytest.fixture(scope="module")
def vs():
    spec = importlib.util.spec_from_file_location("vs_bitnet_cpp", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_arguments(vs, monkeypatch):
    monkeypatch.delenv("BITNET_LLAMA_BENCH", raising=False)
    a = vs.parse_args([])
    assert (a.model, a.bitnet_bench, a.n_prompt, a.n_gen, a.threads, a.repetitions, a.isa) == \
        (None, None, [128], 128, [1, 2], 3, None)
    monkeypatch.setenv("BITNET_LLAMA_BENCH", "/opt/bitnet/llama-bench")
    a = vs.parse_args(["-m", "m.gguf", "-t", "2", "-r", "5", "--isa", "avx2"])
    assert (a.model, a.bitnet_bench, a.threads, a.repetitions, a.isa) == \
        ("m.gguf", "/opt/bitnet/llama-bench", [2], 5, "avx2")
    assert vs.parse_args(["--bitnet-bench", "b"]).bitnet_bench == "b"  # the flag wins over the variable
    for bad in (["-t", "0"], ["-p", "0"], ["-r", "0"], ["-n", "-1"]):
        with pytest.raises(SystemExit):
            vs.parse_args(bad)


def test_schedule_interleaves_and_alternates(vs):
    order = vs.schedule(2, [1, 2])
    assert order == [(1, "bitnet_cpp"), (1, "tritlm"), (2, "tritlm"), (2, "bitnet_cpp"),
                     (1, "bitnet_cpp"), (1, "tritlm"), (2, "tritlm"), (2, "bitnet_cpp")]
    order = vs.schedule(3, [2])  # one thread count: the first side still alternates
    assert [side for _, side in order[::2]] == ["bitnet_cpp", "tritlm", "bitnet_cpp"]


def bench_record(n_prompt, n_gen, threads, rate):
    return {"build_commit": "abc1234", "cpu_info": "Some CPU", "model_type": "bitnet-b1.58 2B I2_S - 2 bpw ternary",
            "n_prompt": n_prompt, "n_gen": n_gen, "n_threads": threads, "avg_ts": rate, "samples_ts": [rate]}


def test_llama_bench_json(vs):
    out = vs.parse_bench_json(json.dumps([bench_record(128, 0, 2, 84.5), bench_record(0, 128, 2, 21.9)]))
    assert out["rows"] == [{"test": "pp128", "threads": 2, "tokens_per_s": 84.5},
                           {"test": "tg128", "threads": 2, "tokens_per_s": 21.9}]
    assert (out["build_commit"], out["cpu_info"]) == ("abc1234", "Some CPU")
    for bad in ("", "[]", "{}", '[{"n_prompt": 1}]'):
        with pytest.raises((ValueError, KeyError)):
            vs.parse_bench_json(bad)


def test_rows_pool_the_runs(vs):
    runs = [{"rows": [{"test": "pp16", "threads": 2, "tokens_per_s": 10.0}]},
            {"rows": [{"test": "pp16", "threads": 1, "tokens_per_s": 5.0},
                      {"test": "tg4", "threads": 1, "tokens_per_s": 2.0}]},
            {"rows": [{"test": "pp16", "threads": 2, "tokens_per_s": 14.0}]}]
    rows = vs.aggregate(runs, [1, 2])
    assert [(r["test"], r["threads"], r["tokens_per_s"], r["std"]) for r in rows] == \
        [("pp16", 1, 5.0, 0.0), ("tg4", 1, 2.0, 0.0), ("pp16", 2, 12.0, 2.0)]


def test_build_flags_from_compile_commands(vs, tmp_path):
    bench = tmp_path / "build" / "bin" / "llama-bench"
    bench.parent.mkdir(parents=True)
    bench.write_text("")
    assert vs.build_flags(str(bench)).startswith("unknown (no compile command of ggml-bitnet-mad.cpp")
    command = "/usr/bin/clang++-19 -DGGML_USE_OPENMP -O3 -DNDEBUG -fPIC -mavx2 -mfma -c /src/ggml-bitnet-mad.cpp"
    (tmp_path / "build" / "compile_commands.json").write_text(json.dumps(
        [{"directory": "/", "command": "cc -c ggml.c", "file": "/src/ggml.c"},
         {"directory": "/", "command": command, "file": "/src/ggml-bitnet-mad.cpp"}]))
    assert vs.build_flags(str(bench)) == "clang++-19 -O3 -mavx2 -mfma, OpenMP"
    (tmp_path / "build" / "compile_commands.json").write_text(json.dumps(
        [{"directory": "/", "arguments": ["clang++", "-march=native", "-c", "x/ggml-bitnet-mad.cpp"],
          "file": "x/ggml-bitnet-mad.cpp"}]))
    text = vs.build_flags(str(bench))
    assert text.startswith("clang++ -march=native (this CPU: ") and text.endswith("no OpenMP (ggml's own thread pool)")


def test_markdown_table(vs):
    def side(rows, busy):
        return {"rows": [{"test": t, "threads": n, "tokens_per_s": r, "std": s} for t, n, r, s in rows],
                "other_cores_busy": busy}

    bitnet = side([("pp128", 1, 40.0, 1.0), ("tg128", 1, 10.0, 0.5)], 0.1) | {
        "bench": "/b/llama-bench", "build_commit": "abc1234", "build_flags": "clang++ -mavx2, no OpenMP"}
    trit = side([("pp128", 1, 100.0, 3.0), ("tg128", 1, 15.0, 0.25)], 0.0) | {
        "version": "tritlm 0.1.0", "isa": "avx2", "weight_layout": "tiles", "timer": "wall"}
    report = {"model": "m.gguf", "description": "given with --model", "repetitions": 3,
              "rows": vs._peers.combine(bitnet, trit, "bitnet_cpp"), "bitnet_cpp": bitnet, "tritlm": trit}
    text = vs.markdown(report)
    lines = text.splitlines()
    header = lines.index("| test | threads | bitnet.cpp tok/s | tritlm tok/s | tritlm / bitnet.cpp |")
    assert lines[header + 2:header + 4] == ["| pp128 | 1 | 40.00 ± 1.00 | 100.00 ± 3.00 | 2.50× |",
                                            "| tg128 | 1 | 10.00 ± 0.50 | 15.00 ± 0.25 | 1.50× |"]
    assert "build abc1234" in text and "clang++ -mavx2, no OpenMP" in text and "ISA avx2" in text
    assert "WARNING" not in text
    assert "WARNING: the machine was not idle" in vs.markdown(report | {"tritlm": trit | {"other_cores_busy": 0.9}})
    json.dumps(report)  # --json prints the same record


def tiny_model(path):
    from tritlm.bench.dummy import write_dummy
    from tritlm.models.config import ModelConfig

    config = ModelConfig(arch="bitnet-b1.58", vocab_size=512, hidden_size=256, intermediate_size=512, n_layers=2,
                         n_heads=4, n_kv_heads=2, context_length=256, rope_theta=500000.0, norm_eps=1e-5)
    write_dummy(path, config, ternary_type="I2_S", embedding_type="Q6_K")
    return str(path)


STAND_IN = '''
import json, os, sys
args = sys.argv[1:]
value = lambda flag: args[args.index(flag) + 1]
with open(os.environ["STAND_IN_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
if not os.path.exists(value("-m")):
    sys.exit("main: error: failed to load model")
n = int(value("-t"))
records = [{"n_prompt": int(p), "n_gen": 0, "n_threads": n, "avg_ts": 10.0 * n} for p in value("-p").split(",")]
records.append({"n_prompt": 0, "n_gen": int(value("-n")), "n_threads": n, "avg_ts": 5.0 * n, "build_commit": "x"})
print(json.dumps(records))
'''


def test_end_to_end_with_a_stand_in_bench(vs, tmp_path, monkeypatch, capsys):
    """The real tritlm side against a script that answers as llama-bench does: both run the
    same file, once per repetition, and the table divides their rates."""
    bench = tmp_path / "llama-bench"
    bench.write_text(f"#!{sys.executable}\n{STAND_IN}")
    bench.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("STAND_IN_LOG", str(log))
    model = tiny_model(tmp_path / "tiny-i2_s.gguf")
    argv = ["--bitnet-bench", str(bench), "--model", model, "-p", "16", "-n", "4", "-t", "1", "-r", "2",
            "--isa", "portable", "--json", "--timeout", "120"]
    assert vs.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls == [["-m", model, "-p", "16", "-n", "4", "-t", "1", "-r", "1", "-o", "json"]] * 2
    assert [(r["test"], r["threads"]) for r in report["rows"]] == [("pp16", 1), ("tg4", 1)]
    pp, tg = report["rows"]
    assert pp["bitnet_cpp"] == {"tokens_per_s": 10.0, "std": 0.0} and tg["bitnet_cpp"]["tokens_per_s"] == 5.0
    assert pp["tritlm"]["tokens_per_s"] > 0 and pp["ratio"] == pytest.approx(pp["tritlm"]["tokens_per_s"] / 10.0)
    assert len(report["tritlm"]["runs"]) == 2 and len(report["bitnet_cpp"]["runs"]) == 2
    assert report["tritlm"]["isa"] == "portable"  # --isa reached the tritlm process as TRITLM_ISA
    assert report["bitnet_cpp"]["build_flags"].startswith("unknown")  # no build directory around the stand-in

    # a file the bench refuses: its error line, not a traceback
    assert vs.main(argv[:3] + [str(tmp_path / "missing.gguf")] + argv[4:]) == 1
    err = capsys.readouterr().err
    assert "llama-bench exited with 1" in err and "failed to load model" in err


def test_no_bench_is_a_clear_error(vs, monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("BITNET_LLAMA_BENCH", raising=False)
    assert vs.main(["-m", "m.gguf"]) == 1
    assert "give --bitnet-bench PATH or set BITNET_LLAMA_BENCH" in capsys.readouterr().err
    assert vs.main(["-m", "m.gguf", "--bitnet-bench", str(tmp_path / "nothing")]) == 1
    assert "is not an executable file" in capsys.readouterr().err


@pytest.mark.skipif(not os.environ.get("BITNET_LLAMA_BENCH"), reason="BITNET_LLAMA_BENCH names no bitnet.cpp build")
def test_against_bitnet_cpp(vs, tmp_path, capsys):
    """bitnet.cpp loads and runs the very file tritlm runs."""
    model = tiny_model(tmp_path / "tiny-i2_s.gguf")
    assert vs.main(["--model", model, "-p", "16", "-n", "4", "-t", "1", "-r", "1", "--json", "--timeout", "120"]) == 0
    report = json.loads(capsys.readouterr().out)
    for r in report["rows"]:
        assert r["bitnet_cpp"]["tokens_per_s"] > 0 and r["tritlm"]["tokens_per_s"] > 0 and r["ratio"] > 0
