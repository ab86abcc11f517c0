"""benchmarks/provenance.py: what every result file records about the run that made it."""

import json
import re
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def prov_module(monkeypatch):
    # Benchmark scripts import it as a top-level module (benchmarks/ is their sys.path[0]).
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import provenance

    return provenance


def test_provenance_names_commit_command_and_machine(prov_module, monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(BENCHMARKS / "search_cost.py"), "--steps", "2"])
    p = prov_module.provenance(threads=3)
    assert p["commit"] is None or re.fullmatch(r"[0-9a-f]{40}", p["commit"])
    assert p["command"].endswith("benchmarks/search_cost.py --steps 2")   # relative to the root
    assert {"python", "torch", "onnx", "onnxruntime", "numpy"} <= set(p["packages"])
    assert p["threads"] == 3 and p["cpu"]["cores"] >= 1 and len(p["load_avg"]) == 3
    json.dumps(p)   # goes into the .json files as it is


def test_markdown_block_carries_commit_and_command(prov_module):
    p = prov_module.provenance(threads=1)
    md = prov_module.provenance_markdown(p)
    assert md.startswith("## Provenance") and p["command"] in md
    assert (p["commit"] or "unknown") in md
