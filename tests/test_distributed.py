"""Two CPU processes under torchrun (gloo) against one process with the same global batch."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
METHODS = "std,freelb,r3f,smart"
# Seconds per command: each takes well under a minute alone on two cores, and a full test
# run on a loaded machine may be several times slower.
TIMEOUT = 600


def run(args: list[str], timeout: float = TIMEOUT) -> str:
    """Run ``args`` from the repository root and return its stdout; fail with the command,
    its exit status and the ends of its output. A command past ``timeout`` is killed with
    its whole process group: torchrun's workers too, which would otherwise live on."""
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                               env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout)
        status = f"exit status {process.returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        status = f"still running after {timeout} s, killed"
    if process.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args))}\n{status}\n--- stdout (end) ---\n{out[-2000:]}\n"
                    f"--- stderr (end) ---\n{err[-6000:]}", pytrace=False)
    return out


def torchrun(*args: str) -> str:
    """``args`` in two processes. ``--standalone`` has torchrun bind its rendezvous store to
    a free port of its own choosing: a fixed --master_port collides with any other run on
    the machine (another test session, a port left in use), which is how these runs failed
    on a loaded machine."""
    return run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args])


@pytest.fixture(scope="module")
def runs(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    script = str(ROOT / "examples" / "torchrun_trainer.py")
    common = ["--model", str(tiny_checkpoint), "--method", METHODS, "--no-dropout", "--max-steps", "4"]
    torchrun(script, *common, "--batch-size", "4", "--count-allreduce", "--output-dir", str(out / "two"))
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



def test_rxf_finetune_under_torchrun_scores_every_dev_example_once(tiny_checkpoint, tmp_path):
    """``torchrun -m rxf.cli finetune`` (docs/scaling.md): both ranks exit 0, and the dev
    score written is the best model's on the whole dev set. An odd dev set makes the
    distributed sampler pad one rank with a repeated example; a score over the padded set
    would differ from one process's evaluation of the same checkpoint."""
    from rxf.demo import DEMO_DATA

    data = tmp_path / "data"
    data.mkdir()
    (data / "train.tsv").write_text((DEMO_DATA / "train.tsv").read_text())
    dev = (DEMO_DATA / "dev.tsv").read_text().splitlines(keepends=True)[:1 + 99]  # header + 99 examples
    (data / "dev.tsv").write_text("".join(dev))
    out = tmp_path / "run"
    torchrun("-m", "rxf.cli", "finetune", "--task", "sst2", "--method", "r3f", "--model", str(tiny_checkpoint),
             "--data-dir", str(data), "--output-dir", str(out), "--batch-size", "8", "--max-length", "32",
             "--learning-rate", "1e-3", "--max-steps", "6", "--eval-steps", "3", "--eval-batch-size", "16",
             "--no-progress")
    results = json.loads((out / "results.json").read_text())
    assert results["updates"] == 6 and results["hardware"]["processes"] == 2
    assert results["data"]["dev"]["examples"] == 99
    run([sys.executable, "-m", "rxf.cli", "evaluate", "--checkpoint", str(out / "best"), "--file",
         str(data / "dev.tsv"), "--output", str(tmp_path / "eval.json")])
    alone = json.loads((tmp_path / "eval.json").read_text())["files"][str(data / "dev.tsv")]
    assert alone["examples"] == 99
    assert results["best"]["dev"]["accuracy"] == pytest.approx(alone["metrics"]["accuracy"], abs=1e-9)


@pytest.fixture(scope="module")
def fsdp_runs(tiny_checkpoint, tmp_path_factory):
    """examples/fsdp_loop.py in two processes (FSDP2) and in one, same global batches."""
    out = tmp_path_factory.mktemp("fsdp")
    script = str(ROOT / "examples" / "fsdp_loop.py")
    common = ["--model", str(tiny_checkpoint), "--method", "std,freelb,r3f,r4f,smart", "--steps", "4"]
    torchrun(script, *common, "--batch-size", "4", "--output-dir", str(out / "two"))
    run([sys.executable, script, *common, "--batch-size", "8", "--output-dir", str(out / "one")])
    return out


@pytest.mark.parametrize("method", ["std", "freelb", "r3f", "r4f", "smart"])
def test_fsdp2_training_matches_one_process(fsdp_runs, method):
    """Sharded with FSDP2, with the perturbation added by the embedding hook and the extra
    passes through the sharded model, every method ends with one process's weights.
    STD and FreeLB (init 0) are deterministic; R3F/R4F/SMART noise of scale 1e-5 moves
    the weights by less than the looser tolerance."""
    two = json.loads((fsdp_runs / "two" / method / "run.json").read_text())
    assert two["world_size"] == 2 and two["sharded"]
    a = load_file(fsdp_runs / "two" / method / "model.safetensors")
    b = load_file(fsdp_runs / "one" / method / "model.safetensors")
    assert a.keys() == b.keys()
    tolerance = 1e-5 if method in ("std", "freelb") else 1e-4
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=tolerance, rtol=0)


FSDP_TEACHER = """
import sys, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForSequenceClassification
from rxf.errors import OptionError
from rxf.methods import EMATeacher, MethodOptions
dist.init_process_group("gloo")
model = AutoModelForSequenceClassification.from_pretrained(sys.argv[1], num_labels=2)
fully_shard(model)
try:
    EMATeacher(model, MethodOptions(method="smart"))
    message = "no error"
except OptionError as exc:
    message = str(exc)
if dist.get_rank() == 0:
    print(message)
dist.barrier()
dist.destroy_process_group()
"""


def test_smart_teacher_of_an_fsdp2_model_is_refused_clearly(tiny_checkpoint, tmp_path):
    """SMART's Bregman teacher cannot copy a sharded model: refused with the fix named."""
    script = tmp_path / "teacher.py"
    script.write_text(FSDP_TEACHER)
    out = torchrun(str(script), str(tiny_checkpoint))
    assert "--no-smart-bregman" in out.strip().splitlines()[-1]
