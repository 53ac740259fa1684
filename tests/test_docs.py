"""Every shell and Python example in README.md and docs/*.md runs, so none can rot.

An example is a fenced block marked bash, sh, shell or python (unmarked blocks are diagrams and
listings). The blocks of one file run in order, in one working directory, so a later example may
use what an earlier one made. Shell blocks run under `bash -e -o pipefail` with this
environment's `tritlm` first on PATH; their `pip install` commands are left out (the test runs
in an installed environment). A block is not run only where the markdown says why, in a comment on
the line before it: `<!-- docs-test: skip, REASON -->`. `<!-- docs-test: with a server -->`
runs the block against `tritlm serve` (the bundled model) on a free port in place of 8080;
`<!-- docs-test: a server -->` marks a block that starts one: it runs on a free port until
/health answers, then is stopped.

The Hub ids the examples name are served by a local Hugging Face Hub (fake_hub) with
stand-ins: the bundled model as microsoft/bitnet-b1.58-2B-4T-gguf's GGUF file, a tiny random
checkpoint as microsoft/bitnet-b1.58-2B-4T. The commands and code run as written, downloads
included; only the weights differ from the real ones."""

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from fake_hub import FakeHub
from tritlm.api import default_model_path

ROOT = Path(__file__).resolve().parent.parent
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(?:^<!-- docs-test: (?P<note>[^\n]*?) -->\n)?^```(?P<lang>[\w-]*)\n(?P<code>.*?)^```",
                   re.M | re.S)
SHELL = ("bash", "sh", "shell")


def examples():
    for path in FILES:
        text = path.read_text(encoding="utf-8")
        for m in BLOCK.finditer(text):
            if m["lang"] in SHELL + ("python",):
                line = text.count("\n", 0, m.start("code"))
                yield pytest.param(path, m["lang"], m["note"] or "", m["code"],
                                   id=f"{path.relative_to(ROOT)}:{line}")


EXAMPLES = list(examples())


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The Hub the examples download from, with stand-ins for the repos they name."""
    from tiny_models import write_bitnet, write_tokenizer

    server = FakeHub()
    server.add_commit("microsoft/bitnet-b1.58-2B-4T-gguf",
                      {"ggml-model-i2_s.gguf": Path(default_model_path()).read_bytes(), "README.md": b"#\n"})
    checkpoint = tmp_path_factory.mktemp("bitnet-b1.58-2B-4T")
    write_bitnet(checkpoint, "autobitlinear", hidden_size=256, intermediate_size=512)  # TQ2_0 rows: 256k
    write_tokenizer(checkpoint)
    server.add_commit("microsoft/bitnet-b1.58-2B-4T", {p.name: p.read_bytes() for p in checkpoint.iterdir()})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def environment(hub, tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    return env | {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path_factory.mktemp("hf")),
                  "HF_HUB_DISABLE_TELEMETRY": "1", "RAY_USAGE_STATS_ENABLED": "0", "KEY": "secret",
                  "PATH": os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")}


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    return {path: tmp_path_factory.mktemp(path.stem) for path in FILES}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(command: list[str], port: int, env: dict, cwd=None) -> subprocess.Popen:
    """`command` running, once http://127.0.0.1:port/health answers."""
    process = subprocess.Popen(command, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
            return process
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"the server did not start: {process.communicate()[1]}")
            time.sleep(0.3)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def server_port(environment):
    port = free_port()
    process = start_server([sys.executable, "-m", "tritlm", "serve", "--port", str(port), "-t", "1"],
                           port, environment)
    yield port
    stop(process)


def test_most_examples_run():
    skipped = [p for p in EXAMPLES if p.values[2].startswith("skip")]
    assert len(EXAMPLES) >= 10 and len(skipped) <= len(EXAMPLES) // 2


@pytest.mark.parametrize("path,lang,note,code", EXAMPLES)
def test_example(path, lang, note, code, environment, workdirs, request):
    if note.startswith("skip"):
        pytest.skip(note.partition(",")[2].strip())
    assert note in ("", "with a server", "a server"), f"unknown docs-test note {note!r}"
    if note == "with a server":
        code = code.replace("127.0.0.1:8080", f"127.0.0.1:{request.getfixturevalue('server_port')}")
    if lang in SHELL:
        code = re.sub(r"^pip install [^&\n]*(&&)?", "", code, flags=re.M)
        command = ["bash", "-e", "-o", "pipefail", "-c", code]
    else:
        command = [sys.executable, "-c", code]
    if note == "a server":
        port = free_port()
        command[-1] = re.sub(r"^(tritlm serve .*?)(\s+#.*)?$", rf"\1 --port {port}", command[-1], flags=re.M)
        stop(start_server(command, port, environment, cwd=workdirs[path]))
        return
    result = subprocess.run(command, cwd=workdirs[path], env=environment, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{code}\n--- stdout:\n{result.stdout}\n--- stderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
