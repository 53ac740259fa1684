"""benchmarks/server_abuse.py as a test: the real `tritlm serve` (the bundled tiny model) on
loopback, normal streaming clients while every class of hostile or broken request hits it.
Bounded: a few seconds. The /health bound is generous here (a shared 2-core machine); the
benchmark run alone reports the worst latency."""

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "server_abuse.py"


@pytest.fixture(scope="module")
def abuse():
    spec = importlib.util.spec_from_file_location("server_abuse", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hostile_requests_cost_the_normal_ones_nothing(abuse):
    report = abuse.run(abuse.parse_args(["--health-bound", "1.0"]))
    normal = report["normal"]
    assert normal["complete_alone"] == 4 and normal["requests"] >= 4
    assert normal["identical_to_alone"] == normal["requests"], normal["wrong"]  # none lost or corrupted
    assert report["unexpected"] == {}, report["hostile"]  # each class got what it should: never a 5xx
    assert report["hostile_requests"] == 3 * len(report["hostile"]) and len(report["hostile"]) >= 20
    assert report["health"]["failures"] == [] and report["health"]["worst_ms"] < 1000
    assert report["after"]["slots_busy"] == 0 and report["after"]["queue"] == 0
    assert report["failed_sequences"] == 0 and report["http_5xx"] == 0 and report["tracebacks_in_log"] == 0
    assert report["sigterm_stop_seconds"] is not None
    assert report["ok"]
