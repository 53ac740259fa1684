"""The `tritlm` command's plumbing (the figures themselves are for people, not asserts)."""

import json

import pytest

from tritlm.cli import main


def test_bench_kernels_json(capsys):
    assert main(["bench", "kernels", "--json", "--shapes", "48x256", "--tokens", "3", "-t", "1", "2",
                 "-r", "1", "--stream-mib", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {(r["kernel"], r["threads"]): r for r in report["rows"]}
    assert set(rows) == {(k, t) for k in ("read", "gemv", "gemm") for t in (1, 2)}
    assert rows[("gemm", 2)]["shape"] == "48x256x3"
    for (kernel, threads), row in rows.items():
        assert row["seconds"] > 0
        if kernel == "gemv":  # the share is the ratio of the two measured bandwidths
            assert row["of_read"] == pytest.approx(row["gbps"] / rows[("read", threads)]["gbps"])


def test_bench_kernels_markdown(capsys):
    assert main(["bench", "kernels", "--shapes", "16x128", "--tokens", "1", "-t", "1", "-r", "1",
                 "--stream-mib", "1", "--isa", "portable"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("kernel set: portable")
    assert "| gemv | 16x128 | 1 |" in out and "| gemm | 16x128x1 | 1 |" in out


@pytest.mark.parametrize("args,message", [
    (["--shapes", "12by128"], "is not MxK"),
    (["--shapes", "16x100"], "multiple of 128"),
    (["--isa", "sse9"], "not available"),
    (["-t", "0"], "must be positive"),
])
def test_bench_kernels_bad_arguments(capsys, args, message):
    assert main(["bench", "kernels", "-r", "1", "--stream-mib", "1", *args]) == 2
    assert message in capsys.readouterr().err
