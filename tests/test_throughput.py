"""The throughput levers (their speed is measured in benchmarks/throughput.py, not here):
``--jobs N`` gives the results of one job at a time, length-grouped batches hold the same
examples with less padding, and sorted evaluation gives the same metrics."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_experiments import TINY_RUN, glue_like  # noqa: F401 (a fixture)

from rxf.cli import main
from rxf.experiments.parallel import run_jobs, threads_per_job


def _square_with_threads(x):
    return x * x, torch.get_num_threads()


def test_run_jobs_keeps_the_order_and_divides_the_cores():
    results = run_jobs(_square_with_threads, [(i,) for i in range(4)], jobs=2)
    assert [r[0] for r in results] == [0, 1, 4, 9]
    assert all(r[1] == threads_per_job(2) for r in results)  # each job its share of the cores
    assert run_jobs(_square_with_threads, [(3,)], jobs=1)[0][0] == 9


def test_compare_with_two_jobs_gives_the_results_of_one(tiny_checkpoint, glue_like, tmp_path):  # noqa: F811
    scores = {}
    for jobs in ("1", "2"):
        out = tmp_path / f"jobs{jobs}"
        assert main(["compare", "--tasks", "sst2", "--methods", "std,r3f", "--seeds", "1", "--model",
                     str(tiny_checkpoint), "--data-dir", str(glue_like), "--output-dir", str(out), "--jobs", jobs,
                     "--max-steps", "4", *TINY_RUN]) == 0
        scores[jobs] = {m: json.loads((out / "runs" / "sst2" / m / "seed1" / "results.json").read_text())
                        for m in ("std", "r3f")}
    for method in ("std", "r3f"):
        one, two = scores["1"][method], scores["2"][method]
        assert abs(one["final"]["dev"]["loss"] - two["final"]["dev"]["loss"]) < 1e-5


def test_length_grouped_batches_have_less_padding(tiny_checkpoint):
    from transformers import AutoTokenizer
    from transformers.trainer_pt_utils import LengthGroupedSampler

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    texts = [("word " * (1 + (7 * i) % 40)).strip() for i in range(256)]
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]

    def padded_tokens(order):
        batches = [order[i:i + 16] for i in range(0, len(order), 16)]
        return sum(len(b) * max(lengths[j] for j in b) for b in batches)

    torch.manual_seed(0)
    grouped = list(LengthGroupedSampler(16, lengths=lengths))
    shuffled = torch.randperm(len(lengths)).tolist()
    assert sorted(grouped) == list(range(len(lengths)))  # every example once per epoch
    assert padded_tokens(grouped) < 0.8 * padded_tokens(shuffled)


def test_group_by_length_is_a_defining_option_and_trains(tiny_checkpoint, glue_like, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    args = ["finetune", "--task", "sst2", "--model", str(tiny_checkpoint), "--data-dir", str(glue_like),
            "--output-dir", str(out), "--max-steps", "4", *TINY_RUN]
    assert main([*args, "--group-by-length"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["train_sampling_strategy"] == "group_by_length"
    capsys.readouterr()
    assert main(args) == 2  # the same folder without grouping is another run
    assert "group_by_length" in capsys.readouterr().err


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _until(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


@pytest.mark.parametrize("stop", ["ctrl-c", "kill -9 of the command"])
def test_a_stopped_command_with_two_jobs_leaves_no_run_going(stop, tiny_checkpoint, glue_like, tmp_path):  # noqa: F811
    """Ctrl-C (SIGINT to the terminal's whole process group) stops ``--jobs 2`` at once and
    starts no queued run (the pool used to start them while it waited); a command killed
    outright takes its workers with it, so no run goes on writing a folder that the
    restarted command resumes."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "rxf.cli", "compare", "--tasks", "sst2", "--methods", "std,r3f", "--seeds", "1,2",
               "--model", str(tiny_checkpoint), "--data-dir", str(glue_like), "--output-dir", str(out), "--jobs", "2",
               *TINY_RUN, "--epochs", "1000", "--eval-steps", "100000"]
    # A shell's background job ignores SIGINT; a terminal's foreground job does not.
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        started = [out / "runs/sst2/std" / f"seed{s}" / "run.json" for s in (1, 2)]
        assert _until(lambda: all(p.is_file() for p in started), 120), process.communicate(timeout=5)
        time.sleep(3)  # both workers inside their training loops
        if stop == "ctrl-c":
            os.killpg(process.pid, signal.SIGINT)
            assert process.wait(timeout=60) == 130
            assert "interrupted; the same command resumes" in process.stderr.read()
        else:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=60)
        assert _until(lambda: not _group_alive(process.pid), 30), "a worker outlived the command"
        assert not (out / "runs/sst2/r3f").exists()  # the queued runs never started
    finally:
        if _group_alive(process.pid):
            os.killpg(process.pid, signal.SIGKILL)
