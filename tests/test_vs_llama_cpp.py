"""benchmarks/vs_llama_cpp.py: its arguments, the side-by-side table on made-up results, and,
where llama-cpp-python is installed, one tiny end-to-end run and one refused file."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "vs_llama_cpp.py"


@pytest.fixture(scope="module")
def vs():
    spec = importlib.util.spec_from_file_location("vs_llama_cpp", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def side(version, load, rss, rows, timer="wall"):
    return {"version": version, "timer": timer, "load_seconds": load, "peak_rss_mb": rss,
            "rows": [{"test": t, "threads": n, "tokens_per_s": r, "std": s} for t, n, r, s in rows]}


LLAMA = side("llama-cpp-python 0.3.36", 0.1, 900.0,
             [("pp128", 1, 40.0, 1.0), ("tg128", 1, 10.0, 0.5), ("pp128", 2, 80.0, 2.0)], "llama_perf_context")
TRITLM = side("tritlm 0.1.0", 2.0, 800.0,
              [("pp128", 1, 100.0, 3.0), ("tg128", 1, 15.0, 0.25), ("tg128", 2, 25.0, 1.0)])


def test_arguments(vs):
    a = vs.parse_args([])
    assert (a.model, a.preset, a.n_prompt, a.n_gen, a.threads, a.repetitions, a.json) == \
        (None, "2B4T", [128], 128, [1, 2], 3, False)
    a = vs.parse_args(["--model", "m.gguf", "-p", "64", "512", "-n", "0", "-t", "2", "-r", "5", "--json"])
    assert (a.model, a.n_prompt, a.n_gen, a.threads, a.repetitions, a.json) == ("m.gguf", [64, 512], 0, [2], 5, True)
    for bad in (["-t", "0"], ["-p", "0"], ["-r", "0"], ["-n", "-1"]):
        with pytest.raises(SystemExit):
            vs.parse_args(bad)


def test_rows_pair_the_sides_and_divide(vs):
    rows = {(r["test"], r["threads"]): r for r in vs.combine(LLAMA, TRITLM)}
    assert list(rows) == [("pp128", 1), ("tg128", 1), ("pp128", 2), ("tg128", 2)]
    assert rows["pp128", 1]["ratio"] == pytest.approx(2.5)
    assert rows["tg128", 1]["ratio"] == pytest.approx(1.5)
    assert rows["tg128", 1]["tritlm"] == {"tokens_per_s": 15.0, "std": 0.25}
    assert math.isnan(rows["pp128", 2]["ratio"]) and rows["pp128", 2]["tritlm"] is None  # one side only
    assert math.isnan(rows["tg128", 2]["ratio"]) and rows["tg128", 2]["llama_cpp"] is None


def test_markdown_table(vs):
    report = {"model": "m.gguf", "description": "given with --model", "repetitions": 3,
              "rows": vs.combine(LLAMA, TRITLM), "llama_cpp": LLAMA, "tritlm": TRITLM,
              "peak_rss_mb": {"llama.cpp": 900.4, "tritlm": 800.0}}
    text = vs.markdown(report)
    lines = text.splitlines()
    header = lines.index("| test | threads | llama.cpp tok/s | tritlm tok/s | tritlm / llama.cpp |")
    assert lines[header + 2: header + 6] == [
        "| pp128 | 1 | 40.00 ± 1.00 | 100.00 ± 3.00 | 2.50× |",
        "| tg128 | 1 | 10.00 ± 0.50 | 15.00 ± 0.25 | 1.50× |",
        "| pp128 | 2 | 80.00 ± 2.00 | — | — |",
        "| tg128 | 2 | — | 25.00 ± 1.00 | — |"]
    assert "llama.cpp 900 MB, tritlm 800 MB" in text
    assert "WARNING" not in text
    busy = {"llama_cpp": LLAMA | {"other_cores_busy": 0.9}, "tritlm": TRITLM | {"other_cores_busy": 0.0}}
    text = vs.markdown(report | busy)
    assert "0.90 cores busy" in text and "WARNING: the machine was not idle" in text
    assert "timer llama_perf_context" in text and "m.gguf" in text
    json.dumps(report)  # --json prints the same record


def test_failure_explained(vs):
    log = ("loading\ngguf_init_from_reader: tensor 'blk.0.attn_q.weight' of type 36 ... not a multiple of "
           "block size\nend")
    text = vs._peers.explain_failure(log)
    assert text.splitlines()[1].strip().startswith("gguf_init_from_reader: tensor 'blk.0.attn_q.weight'")
    assert text.rstrip().endswith("end")


def tiny_model(path, ternary_type):
    from tritlm.bench.dummy import write_dummy
    from tritlm.models.config import ModelConfig

    config = ModelConfig(arch="bitnet", vocab_size=512, hidden_size=256, intermediate_size=512, n_layers=2,
                         n_heads=4, n_kv_heads=4, context_length=256, rope_theta=10000.0, norm_eps=1e-5)
    write_dummy(path, config, arch="bitnet", ternary_type=ternary_type, embedding_type="Q6_K")
    return str(path)


def test_end_to_end(vs, tmp_path, capsys):
    pytest.importorskip("llama_cpp")
    model = tiny_model(tmp_path / "tiny-tq2_0.gguf", "TQ2_0")
    assert vs.main(["--model", model, "-p", "16", "-n", "4", "-t", "1", "-r", "1", "--json", "--timeout", "120"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(r["test"], r["threads"]) for r in report["rows"]] == [("pp16", 1), ("tg4", 1)]
    for r in report["rows"]:
        assert r["llama_cpp"]["tokens_per_s"] > 0 and r["tritlm"]["tokens_per_s"] > 0 and r["ratio"] > 0
    assert report["llama_cpp"]["timer"] == "llama_perf_context"  # llama.cpp's counters added up
    assert all(mb > 0 for mb in report["peak_rss_mb"].values())


def test_refused_file_names_the_reason(vs, tmp_path, capsys):
    """llama.cpp reads no I2_S: the report quotes its loader's error, tensor and type."""
    pytest.importorskip("llama_cpp")
    model = tiny_model(tmp_path / "tiny-i2_s.gguf", "I2_S")
    assert vs.main(["--model", model, "-p", "16", "-n", "4", "-t", "1", "-r", "1", "--timeout", "120"]) == 1
    err = capsys.readouterr().err
    assert "llama.cpp refused to load the model" in err and "blk.0.attn_q.weight" in err and "type 36" in err
