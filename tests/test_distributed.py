"""Two CPU processes under torchrun (gloo) against one process with the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
METHODS = "std,freelb,r3f,smart"


def run(args, env=None):
    result = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=900,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    script = str(ROOT / "examples" / "torchrun_trainer.py")
    common = ["--model", str(tiny_checkpoint), "--method", METHODS, "--no-dropout", "--max-steps", "4"]
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533", script,
         *common, "--batch-size", "4", "--count-allreduce", "--output-dir", str(out / "two")])
    run([sys.executable, script, *common, "--batch-size", "8", "--output-dir", str(out / "one")])
    return out


@pytest.mark.parametrize("method", ["std", "freelb"])
def test_deterministic_methods_match_one_process(runs, method):
    two = json.loads((runs / "two" / method / "run.json").read_text())
    assert two["world_size"] == 2 and two["updates"] == 4
    a = load_file(runs / "two" / method / "final" / "model.safetensors")
    b = load_file(runs / "one" / method / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["r3f", "smart"])
def test_random_methods_end_close_to_one_process(runs, method):
    two = json.loads((runs / "two" / method / "run.json").read_text())["losses"]
    one = json.loads((runs / "one" / method / "run.json").read_text())["losses"]
    assert all(torch.isfinite(torch.tensor(two)))
    assert two[-1] == pytest.approx(one[-1], abs=0.02)


@pytest.mark.parametrize("method", METHODS.split(","))
def test_one_all_reduce_per_update(runs, method):
    """SMART's ascent steps and FreeLB's first K-1 backward calls do not all-reduce:
    every method communicates exactly as often as STD does."""
    report = json.loads((runs / "two" / method / "run.json").read_text())
    std = json.loads((runs / "two" / "std" / "run.json").read_text())
    assert report["allreduce_calls"] == std["allreduce_calls"] >= report["updates"]
