"""Hub ids: models fetched through huggingface_hub from a real HTTP server on 127.0.0.1 (fake_hub)
into a Hub cache under tmp_path, then loaded; no internet. The commands run as a user runs them,
in a fresh process whose HF_ENDPOINT points at the server."""

import hashlib
import json
import os
import subprocess
import sys

import pytest

from fake_hub import FakeHub
from tritlm import hub as tritlm_hub
from tritlm.api import default_model_path

with open(default_model_path(), "rb") as _f:
    TINY = _f.read()  # the bundled model: a real GGUF to serve


@pytest.fixture
def server():
    fake = FakeHub()
    yield fake
    fake.stop()


def tritlm(server, home, *args, env=None, cwd=None, code=None):
    """`tritlm ARGS` (or `python -c CODE`) in a fresh process against `server`, cache in `home`."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    clean |= {"HF_ENDPOINT": server.url, "HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1"} | (env or {})
    command = ["-c", code] if code else ["-m", "tritlm", *args]
    return subprocess.run([sys.executable, *command], env=clean, cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def error_line(result) -> str:
    """The one line a failed command prints (and no traceback)."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tritlm: error: "), result.stderr
    return lines[0]


def snapshot(home, repo, commit):
    return home / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / commit


RUN = ("-p", "def fib(n):", "-n", "6", "-temp", "0")


def test_download_then_run_from_the_cache_with_the_server_stopped_and_offline(server, tmp_path):
    home = tmp_path / "hf"
    commit = server.add_commit("tiny/gguf", {"tritlm-tiny.gguf": TINY, "README.md": b"# a tiny model\n"})
    first = tritlm(server, home, "run", "-m", "tiny/gguf", *RUN)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("def fib(n):") and len(first.stdout) > len("def fib(n):\n")
    assert (snapshot(home, "tiny/gguf", commit) / "tritlm-tiny.gguf").read_bytes() == TINY
    method, path = server.requests[0]  # model info with file metadata
    assert (method, path.lower()) == ("GET", "/api/models/tiny/gguf?blobs=true")
    assert not server.requested("README.md")  # only the model file
    sha = hashlib.sha256(TINY).hexdigest()
    assert (home / "tritlm" / "verified" / sha).is_file()  # checked once, remembered

    listing = tritlm(server, home, "list")
    assert listing.returncode == 0
    assert f"tiny/gguf  main ({commit[:10]})" in listing.stdout
    assert str(snapshot(home, "tiny/gguf", commit) / "tritlm-tiny.gguf") in listing.stdout

    server.requests.clear()
    offline = tritlm(server, home, "run", "-m", "tiny/gguf", "--offline", *RUN)
    assert offline.returncode == 0, offline.stderr
    assert offline.stdout == first.stdout
    env_offline = tritlm(server, home, "run", "-m", "tiny/gguf", *RUN, env={"HF_HUB_OFFLINE": "1"})
    assert env_offline.stdout == first.stdout
    assert server.requests == []  # offline: not one request

    server.stop()
    cached = tritlm(server, home, "run", "-m", "tiny/gguf", *RUN)
    assert cached.returncode == 0, cached.stderr
    assert cached.stdout == first.stdout
    api = tritlm(server, home, code="from tritlm import LLM; llm = LLM('tiny/gguf'); "
                                    "print(llm.model_name, llm.model_path)")
    assert api.returncode == 0, api.stderr
    assert api.stdout.split() == ["tiny/gguf", str(snapshot(home, "tiny/gguf", commit) / "tritlm-tiny.gguf")]


def test_uncached_repo_offline_or_unknown_is_one_line_saying_what_to_do(server, tmp_path):
    home = tmp_path / "hf"
    server.add_commit("tiny/gguf", {"model.gguf": TINY})
    for how in ({"args": ("--offline",)}, {"env": {"HF_HUB_OFFLINE": "1"}}):
        line = error_line(tritlm(server, home, "run", "-m", "tiny/gguf", "-p", "x", *how.get("args", ()),
                                 env=how.get("env")))
        assert "tiny/gguf is not in the Hub cache" in line and "offline" in line
        assert "fetch it with `tritlm pull tiny/gguf`" in line
    assert server.requests == []
    line = error_line(tritlm(server, home, "run", "-m", "tiny/missing", "-p", "x"))
    assert "tiny/missing: no such local file, nor a model repo on the Hub" in line
    line = error_line(tritlm(server, home, "pull", "tiny/gguf", "--revision", "v9"))
    assert "tiny/gguf has no revision 'v9' on the Hub" in line


def test_a_local_path_wins_over_a_hub_id(server, tmp_path):
    server.add_commit("tiny/gguf", {"model.gguf": TINY})
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "gguf").write_bytes(TINY)  # ./tiny/gguf is a file
    result = tritlm(server, tmp_path / "hf", "run", "-m", "tiny/gguf", *RUN, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert server.requests == []


def test_choosing_among_several_ggufs(server, tmp_path):
    home = tmp_path / "hf"
    tq2 = b"GGUF not really a TQ2_0 model"
    commit = server.add_commit("tiny/multi", {"m-I2_S.gguf": TINY, "m-TQ2_0.gguf": tq2,
                                              "extra/m-TQ1_0.gguf": b"GGUF tq1", "m-Q4_K_S.gguf": b"q4ks",
                                              "m-Q4_K_M.gguf": b"q4km"})
    line = error_line(tritlm(server, home, "pull", "tiny/multi"))
    assert "tiny/multi has several GGUF files: " in line
    for name in ("m-I2_S.gguf", "m-TQ2_0.gguf", "extra/m-TQ1_0.gguf"):
        assert name in line
    assert "choose one with tiny/multi:FILE or a type such as tiny/multi:i2_s" in line

    for selector, name in (("tq2_0", "m-TQ2_0.gguf"), ("TQ1_0", "extra/m-TQ1_0.gguf"),
                           ("m-Q4_K_M.gguf", "m-Q4_K_M.gguf")):
        pulled = tritlm(server, home, "pull", f"tiny/multi:{selector}")
        assert pulled.returncode == 0, pulled.stderr
        assert pulled.stdout.strip() == str(snapshot(home, "tiny/multi", commit) / name)
    assert not server.requested("m-I2_S.gguf") and not server.requested("m-Q4_K_S.gguf")

    assert "'q4_k' matches several GGUF files: m-Q4_K_M.gguf" in error_line(
        tritlm(server, home, "pull", "tiny/multi:q4_k"))
    assert "no GGUF file matches 'q8_0'; there are: " in error_line(tritlm(server, home, "pull", "tiny/multi:q8_0"))
    # offline, the choice is among the cached files
    line = error_line(tritlm(server, home, "run", "-m", "tiny/multi:i2_s", "--offline", "-p", "x"))
    assert "no cached GGUF file matches 'i2_s'" in line and "`tritlm pull tiny/multi:i2_s`" in line

    api = tritlm(server, home, code="from tritlm import LLM; "
                                    "llm = LLM.from_pretrained('tiny/multi', 'i2_s', n_ctx=64); "
                                    "print(llm.model_path, llm.n_ctx)")
    assert api.returncode == 0, api.stderr
    assert api.stdout.split() == [str(snapshot(home, "tiny/multi", commit) / "m-I2_S.gguf"), "64"]


def test_a_corrupted_download_is_caught_by_its_sha256_and_deleted(server, tmp_path):
    home = tmp_path / "hf"
    commit = server.add_commit("tiny/bad", {"model.gguf": TINY})
    sha = hashlib.sha256(TINY).hexdigest()
    blob = home / "hub" / "models--tiny--bad" / "blobs" / sha
    server.corrupt.add(("tiny/bad", "model.gguf"))  # same size, one byte flipped
    line = error_line(tritlm(server, home, "run", "-m", "tiny/bad", "-p", "x"))
    assert "tiny/bad/model.gguf: sha256 " in line and f"is not the Hub's {sha}" in line
    assert "corrupt and was deleted" in line
    assert not blob.exists() and not (snapshot(home, "tiny/bad", commit) / "model.gguf").exists()

    server.corrupt.clear()
    assert tritlm(server, home, "pull", "tiny/bad").returncode == 0
    assert blob.read_bytes() == TINY

    # a verified file that changes afterwards (bit rot, a bad copy) is checked again, offline too:
    # against the sha256 its blob is named by
    os.chmod(blob, 0o644)
    with open(blob, "r+b") as f:
        f.write(b"X")
    line = error_line(tritlm(server, home, "run", "-m", "tiny/bad", "-p", "x", "--offline"))
    assert "sha256" in line and "corrupt and was deleted" in line
    assert not blob.exists()


def test_a_pinned_revision(server, tmp_path):
    home = tmp_path / "hf"
    old = server.add_commit("tiny/rev", {"model.gguf": TINY})
    new = server.add_commit("tiny/rev", {"model.gguf": TINY[:-1] + b"\0"})
    pinned = tritlm(server, home, "pull", "tiny/rev", "--revision", old)
    assert pinned.stdout.strip() == str(snapshot(home, "tiny/rev", old) / "model.gguf")
    assert (snapshot(home, "tiny/rev", old) / "model.gguf").read_bytes() == TINY
    assert not (snapshot(home, "tiny/rev", new)).exists()
    latest = tritlm(server, home, "pull", "tiny/rev")
    assert latest.stdout.strip() == str(snapshot(home, "tiny/rev", new) / "model.gguf")
    server.stop()
    result = tritlm(server, home, "run", "-m", "tiny/rev", "--revision", old, *RUN)
    assert result.returncode == 0, result.stderr
    api = tritlm(server, home, code=f"from tritlm import LLM; "
                                    f"print(LLM.from_pretrained('tiny/rev', revision='{old}').model_path)")
    assert api.stdout.strip() == str(snapshot(home, "tiny/rev", old) / "model.gguf"), api.stderr


def test_a_safetensors_repo_fetches_only_what_loading_needs(server, tmp_path):
    from safetensors import safe_open
    from tiny_models import write_bitnet, write_tokenizer

    model = tmp_path / "model"
    write_bitnet(model, "autobitlinear")
    write_tokenizer(model)
    with safe_open(model / "model.safetensors", "np") as f:
        index = {"metadata": {}, "weight_map": {name: "model.safetensors" for name in f.keys()}}
    files = {p.name: p.read_bytes() for p in model.iterdir()}
    needed = set(files) | {"model.safetensors.index.json", "generation_config.json", "chat_template.jinja",
                           "modules.json", "1_Pooling/config.json"}
    files |= {"model.safetensors.index.json": json.dumps(index).encode(),
              "generation_config.json": b'{"eos_token_id": 2}', "chat_template.jinja": b"{{ messages }}",
              "modules.json": b'[{"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]',
              "1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}'}
    unwanted = {"optimizer.pt": b"adam state", "pytorch_model.bin": b"pickle", "training_args.bin": b"args",
                "onnx/model.onnx": b"onnx", "model-old.safetensors": b"stale shard", "README.md": b"# card",
                "checkpoint-10/optimizer.safetensors": b"state", "flax_model.msgpack": b"flax"}
    commit = server.add_commit("tiny/st", files | unwanted)
    home = tmp_path / "hf"
    result = tritlm(server, home, "run", "-m", "tiny/st", *RUN)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("def fib(n):")
    fetched = {p.relative_to(snapshot(home, "tiny/st", commit)).as_posix()
               for p in snapshot(home, "tiny/st", commit).rglob("*") if p.is_file()}
    assert fetched == needed
    for name in unwanted:
        assert not server.requested(name), name
    sha = hashlib.sha256(files["model.safetensors"]).hexdigest()
    assert (home / "tritlm" / "verified" / sha).is_file()


# ---------------------------------------------------------------------------- in process


@pytest.mark.parametrize("ref,parsed", [
    ("org/repo", ("org/repo", None)),
    ("microsoft/bitnet-b1.58-2B-4T-gguf:i2_s", ("microsoft/bitnet-b1.58-2B-4T-gguf", "i2_s")),
    ("org/repo:sub/model.gguf", ("org/repo", "sub/model.gguf")),
    ("org/repo:", None), ("model.gguf", None), ("./org/repo", None), ("/abs/path.gguf", None),
    ("a/b/c", None), ("C:/models/x.gguf", None), ("org/re po", None),
])
def test_parse_reference(ref, parsed):
    assert tritlm_hub.parse_reference(ref) == parsed


def test_a_missing_local_path_is_left_for_loading_to_name():
    assert tritlm_hub.resolve_model("no/such/model.gguf") == "no/such/model.gguf"  # not a Hub id
    assert tritlm_hub.resolve_model(default_model_path()) == default_model_path()
    assert tritlm_hub.resolve_model(None) is None


def test_a_file_is_hashed_once_until_it_changes(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path))
    path = tmp_path / "model.gguf"
    path.write_bytes(b"weights")
    expected = hashlib.sha256(b"weights").hexdigest()
    calls = []
    real = tritlm_hub.sha256_file
    monkeypatch.setattr(tritlm_hub, "sha256_file", lambda p: calls.append(p) or real(p))
    tritlm_hub._verify(path, expected, "x")
    tritlm_hub._verify(path, expected, "x")
    assert len(calls) == 1
    path.write_bytes(b"weightz")
    os.utime(path, ns=(1, 1))  # a different mtime too
    with pytest.raises(ValueError, match="corrupt and was deleted"):
        tritlm_hub._verify(path, expected, "x")
    assert len(calls) == 2 and not path.exists()


def test_info_sha256(capsys):
    from tritlm.cli import main

    main(["info", "--sha256", default_model_path()])
    assert f"sha256: {hashlib.sha256(TINY).hexdigest()}  {default_model_path()}" in capsys.readouterr().out


def test_model_name():
    cached = "/c/hub/models--microsoft--bitnet-b1.58-2B-4T-gguf/snapshots/abc/ggml-model-i2_s.gguf"
    assert tritlm_hub.model_name(cached) == "microsoft/bitnet-b1.58-2B-4T-gguf"
    assert tritlm_hub.model_name("/c/hub/models--org--st/snapshots/abc") == "org/st"
    assert tritlm_hub.model_name("/models/x.gguf") == "x.gguf"
    assert tritlm_hub.model_name("/models/hf-dir/") == "hf-dir"
