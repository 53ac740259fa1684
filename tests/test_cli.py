"""The `tritlm` command's plumbing (the figures themselves are for people, not asserts)."""

import json
import signal
import subprocess
import sys

import pytest

import tritlm
from tritlm.cli import main


def test_bench_kernels_json(capsys):
    assert main(["bench", "kernels", "--json", "--shapes", "48x256", "--tokens", "3", "-t", "1", "2",
                 "-r", "1", "--stream-mib", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {(r["kernel"], r["layout"], r["threads"]): r for r in report["rows"]}
    assert set(rows) == {(k, "", t) for k in ("read", "read mmap") for t in (1, 2)} | {
        (k, layout, t) for k in ("gemv", "gemm") for layout in ("tiles", "tiles5") for t in (1, 2)}
    assert rows[("gemm", "tiles5", 2)]["shape"] == "48x256x3"
    for (kernel, layout, threads), row in rows.items():
        assert row["seconds"] > 0
        if kernel == "gemv":  # the share is the ratio of the two measured bandwidths
            assert row["of_read"] == pytest.approx(row["gbps"] / rows[("read", "", threads)]["gbps"])
            assert row["gweights"] == pytest.approx(48 * 256 / row["seconds"] / 1e9)
        if layout == "tiles5":  # the time ratio is to the 2-bit row of the same test
            assert row["vs_tiles"] == pytest.approx(row["seconds"] / rows[(kernel, "tiles", threads)]["seconds"])


def test_bench_kernels_markdown(capsys):
    assert main(["bench", "kernels", "--shapes", "16x128", "--tokens", "1", "-t", "1", "-r", "1",
                 "--stream-mib", "1", "--isa", "portable"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert out.startswith("kernel set: portable")
    # it takes minutes at the real shapes: a line per measurement as it goes, on stderr
    assert "measured read 1 MiB, 1 thread(s)" in captured.err
    assert "measured gemm tiles 16x128x1, 1 thread(s)" in captured.err
    assert "| gemv | tiles | 16x128 | 1 |" in out and "| gemm | tiles | 16x128x1 | 1 |" in out
    assert "tiles5" not in out  # K = 128 has no 1.6-bit form


@pytest.mark.parametrize("args,message", [
    (["--shapes", "12by128"], "is not MxK"),
    (["--shapes", "16x100"], "multiple of 128"),
    (["--isa", "sse9"], "not available"),
    (["-t", "0"], "must be positive"),
])
def test_bench_kernels_bad_arguments(capsys, args, message):
    assert main(["bench", "kernels", "-r", "1", "--stream-mib", "1", *args]) == 2
    assert message in capsys.readouterr().err


def test_bench_model(tmp_path, capsys):
    from tritlm.bench.dummy import write_dummy
    from tritlm.models.config import ModelConfig

    path = tmp_path / "m.gguf"
    write_dummy(path, ModelConfig(arch="bitnet-b1.58", vocab_size=300, hidden_size=256,
                                  intermediate_size=512, n_layers=2, n_heads=4, n_kv_heads=2,
                                  context_length=64, rope_theta=1e4, norm_eps=1e-5))
    assert main(["bench", "-m", str(path), "-p", "8", "16", "-n", "4", "-t", "1", "2", "-r", "1", "-o", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(r["test"], r["threads"]) for r in report["rows"]] == \
        [("pp8", 1), ("pp16", 1), ("tg4", 1), ("pp8", 2), ("pp16", 2), ("tg4", 2)]
    tg = report["rows"][2]
    # the roofline ratio is what it says: bytes per token x tokens/s over the read bandwidth
    assert tg["roofline"] == pytest.approx(report["decode_mb_per_token"] * 1e6 * tg["tokens_per_s"]
                                           / (tg["read_gbps"] * 1e9))
    assert report["peak_rss_mb"] > 0 and report["load_seconds"] > 0
    # where a decode step goes: every kind of op took time, and together no more than the step
    assert set(tg["step_ms"]) == {"ternary", "head", "attention", "other"} and min(tg["step_ms"].values()) > 0
    assert sum(tg["step_ms"].values()) <= 1e3 / tg["tokens_per_s"]
    assert main(["bench"]) == 2


def test_bench_speculative(tmp_path, capsys):
    """--lookup and --draft: plain and speculative greedy decoding of the same text, side by side."""
    from tritlm.api import default_model_path

    model = str(default_model_path())
    text = tmp_path / "text.txt"
    text.write_text("def area(width, height):\n    return width * height\n\n" * 3 + "def area(")
    assert main(["bench", "-m", model, "-p", "8", "-n", "24", "-t", "1", "-r", "1", "-o", "json",
                 "--lookup", "4", "--draft", model, "--text-file", str(text)]) == 0
    plain, lookup, draft = json.loads(capsys.readouterr().out)["speculative_rows"]
    assert [r["test"] for r in (plain, lookup, draft)] == ["tg24 plain", "tg24 lookup", "tg24 draft"]
    assert lookup["max_guesses"] == 4 and lookup["same_text"] and draft["same_text"]
    assert 0 < lookup["accepted"] <= lookup["proposed"]  # the text repeats: lookup finds guesses
    assert 0 < draft["accepted"] == draft["proposed"]  # the model is its own draft: always right
    assert lookup["speedup"] == pytest.approx(lookup["tokens_per_s"] / plain["tokens_per_s"])
    assert main(["bench", "-m", model, "-n", "1", "--lookup"]) == 2


def _tritlm(*args) -> list[str]:
    return [sys.executable, "-c", "import sys; from tritlm.cli import main; sys.exit(main())", *args]


def test_version(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0 and capsys.readouterr().out.strip() == f"tritlm {tritlm.__version__}"


def test_unwritable_output_is_one_error_line(tmp_path, capsys):
    assert main(["dummy", "--preset", "125M", "-o", str(tmp_path / "missing" / "m.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tritlm: error: ") and "No such file or directory" in err and len(err.splitlines()) == 1


def test_closed_pipe_ends_quietly():
    """`tritlm run ... | head -c 5`: the reader leaves early; tritlm exits 0 with nothing on stderr."""
    proc = subprocess.Popen(_tritlm("run", "-p", "def", "-n", "400", "-temp", "0"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert len(proc.stdout.read(5)) == 5
    proc.stdout.close()
    assert proc.wait(timeout=120) == 0
    assert proc.stderr.read() == b""


def test_chat_outlives_its_context():
    """20 turns in 512 tokens of context: the oldest turns go, with a notice, and no turn fails."""
    turns = "".join(f"def function_{i}(x):\n" for i in range(20))
    proc = subprocess.run(_tritlm("run", "-cnv", "-c", "512", "-n", "48", "-temp", "0"), input=turns.encode(),
                          capture_output=True, timeout=600)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert err.count("generated:") == 20 and "oldest messages no longer fit" in err and "error" not in err


def test_ctrl_c_stops_the_reply_not_the_chat():
    proc = subprocess.Popen(_tritlm("run", "-cnv", "-c", "512", "-n", "480", "-temp", "0", "-t", "1"),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdin.write(b"class Parser:\n")
    proc.stdin.flush()
    assert proc.stdout.read(40)  # the reply has started
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(b"import os\n", timeout=300)  # a second turn, then end of input
    assert proc.returncode == 0, err.decode()
    assert b"[stopped]" in out and err.decode().count("generated:") == 2
