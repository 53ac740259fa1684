"""The `tritlm` command's plumbing (the figures themselves are for people, not asserts)."""

import json

import pytest

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
