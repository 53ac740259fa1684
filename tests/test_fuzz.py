"""A short seeded run of the model-file fuzzer (tests/fuzzing.py; benchmarks/fuzz.py runs it
for long). It covers the "format" mutations only: structure of GGUF files (lengths, counts,
offsets, dimensions, types, bytes flipped, inserted, deleted, truncation), of safetensors files
(dtype, shape, data_offsets, header length, header JSON, bytes, truncation) and of Hugging Face
directories (shard paths in the index, the index and config.json broken as JSON, files deleted,
emptied, made directories or symlinks, shards mutated as above). Each input, loaded by
tritlm.LLM in a forked child (and one token's logits computed if it loads), must load or raise
ValueError or OSError: never crash, hang, raise anything else, or open a file outside the model
directory."""

import pytest
from fuzzing import KINDS, ForkServer, Mutator, write_seeds

INPUTS = 300  # per kind: a few seconds each


@pytest.fixture(scope="module")
def fuzzer(tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzz")
    seeds = write_seeds(str(base))
    with ForkServer(str(base), seeds, timeout=20) as server:
        yield server, Mutator(seeds, str(base), areas=("format",)), seeds


def test_seeds_load(fuzzer):
    server, _, seeds = fuzzer
    for kind, inputs in seeds.items():
        for x in inputs:
            result, _ = server.run(x)
            assert result.outcome == "loaded", (kind, result)


@pytest.mark.parametrize("probe", ["crash", "hang", "other", "memory", "escape"])
def test_every_failure_is_reported(fuzzer, probe):
    server, _, seeds = fuzzer
    timeout, server.timeout = server.timeout, 1
    try:
        result, _ = server.run(seeds["gguf"][0], probe=probe)
    finally:
        server.timeout = timeout
    expected = {"crash": ("crash", "SIGSEGV"), "hang": ("hang", ""), "other": ("other", "builtins.KeyError"),
                "memory": ("other", "builtins.MemoryError"), "escape": ("escaped", "")}[probe]
    assert (result.outcome, result.type) == expected, result


@pytest.mark.parametrize("kind", KINDS)
def test_format_mutations_load_or_raise_value_or_os_error(fuzzer, kind):
    server, mutator, _ = fuzzer
    failures = []

    def check(x, result, _):
        if not result.passed:
            failures.append(f"{x.describe()}\n-> {result.outcome} {result.type}: {result.message}\n"
                            f"{result.traceback}")

    counts = server.fuzz(mutator, kind, INPUTS, seed=KINDS.index(kind), on_result=check)
    assert not failures, f"{len(failures)} of {INPUTS} inputs failed; the first:\n" + "\n".join(failures[:3])
    assert counts["ValueError"] > INPUTS // 2 and counts["loaded"]  # the mutations reach the checks
