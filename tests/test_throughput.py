"""The throughput levers (their speed is measured in benchmarks/throughput.py, not here):
``--jobs N`` gives the results of one job at a time, length-grouped batches hold the same
examples with less padding, and sorted evaluation gives the same metrics."""

import json

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
