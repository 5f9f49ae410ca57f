"""rxf compare, report, cost and xnli with a tiny model (rxf sweep: test_sweep.py)."""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import torch

from rxf.cli import main
from rxf.demo import DEMO_DATA
from rxf.experiments.cost import measure, measure_runners, method_grid, random_batch
from rxf.experiments.xnli import read_language_file
from rxf.methods import MethodOptions

TINY_RUN = ["--batch-size", "16", "--max-length", "48", "--learning-rate", "1e-3", "--epochs", "1", "--no-progress"]


@pytest.fixture(scope="module")
def glue_like(tmp_path_factory) -> Path:
    """A small folder in the official GLUE layout: SST-2 from the demo data, RTE made of
    pairs of demo sentences (entailment when both have the same sentiment)."""
    root = tmp_path_factory.mktemp("glue")
    rows = [line.split("\t") for line in (DEMO_DATA / "train.tsv").read_text().splitlines()[1:]]
    (root / "SST-2").mkdir()
    for split, part in (("train", rows[:64]), ("dev", rows[64:96])):
        (root / "SST-2" / f"{split}.tsv").write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in part))
    (root / "RTE").mkdir()
    for split, part in (("train", rows[100:164]), ("dev", rows[164:196])):
        pairs = [(a[0], b[0], "entailment" if a[1] == b[1] else "not_entailment") for a, b in zip(part, part[1:])]
        (root / "RTE" / f"{split}.tsv").write_text(
            "index\tsentence1\tsentence2\tlabel\n" + "".join(f"{i}\t{a}\t{b}\t{y}\n" for i, (a, b, y) in enumerate(pairs))
        )
    return root


def test_compare_runs_the_grid_and_reports(tiny_checkpoint, glue_like, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--tasks", "sst2,rte", "--methods", "std,r3f", "--seeds", "1,2", "--model", str(tiny_checkpoint),
            "--data-dir", str(glue_like), "--output-dir", str(out), *TINY_RUN]
    assert main(args) == 0
    runs = sorted(out.glob("runs/*/*/seed*/results.json"))
    assert len(runs) == 8
    report = json.loads((out / "report.json").read_text())["summary"]
    for task in ("sst2", "rte"):
        for method in ("std", "r3f"):
            scores = [json.loads((out / "runs" / task / method / f"seed{s}" / "results.json").read_text())["best"]["dev"]["accuracy"]
                      for s in (1, 2)]
            assert report[task][method]["max"] == max(scores)
            assert report[task][method]["median"] == statistics.median(scores)
            assert f"{100 * max(scores):.1f}" in (out / "report.md").read_text()
            # Figure 1's two factors: updates to the best checkpoint and seconds per update.
            results = [json.loads((out / "runs" / task / method / f"seed{s}" / "results.json").read_text())
                       for s in (1, 2)]
            assert report[task][method]["median_best_update"] == statistics.median(r["best_step"] for r in results)
            assert report[task][method]["median_seconds_per_update"] == pytest.approx(
                statistics.median(r["train_seconds"] / r["updates"] for r in results))
    assert "| median best update | median s per update |" in (out / "report.md").read_text()
    for png in ("violin_sst2.png", "violin_rte.png", "seconds_to_best.png"):
        image = plt.imread(out / png)
        assert image.ndim == 3 and image.shape[0] > 100

    mtimes = [p.stat().st_mtime_ns for p in runs]
    capsys.readouterr()
    assert main(args) == 0
    assert "running" not in capsys.readouterr().out.replace("rxf compare", "")
    assert [p.stat().st_mtime_ns for p in runs] == mtimes  # nothing trained again

    merged = tmp_path / "merged"
    assert main(["report", "--runs", str(out / "runs"), "--output-dir", str(merged)]) == 0
    assert json.loads((merged / "report.json").read_text())["summary"] == report
    # --seeds: e.g. all but the seed a sweep chose the configuration on.
    assert main(["report", "--runs", str(out / "runs"), "--output-dir", str(merged), "--seeds", "2"]) == 0
    only = json.loads((merged / "report.json").read_text())["summary"]
    assert only["rte"]["r3f"]["seeds"] == [2] and only["rte"]["r3f"]["scores"] == report["rte"]["r3f"]["scores"][1:]
    assert main(["report", "--runs", str(out / "runs"), "--output-dir", str(merged), "--seeds", "7"]) == 2


def test_cost_counts_the_paper_table_passes(tiny_checkpoint, capsys):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoint, num_labels=2)
    rows = measure(model, random_batch(4, 16, model.config.vocab_size, "cpu"), method_grid(), warmup=0, repeats=1)
    counted = {r["method"]: (r["forward"], r["backward"]) for r in rows}
    assert counted == {"std": (1, 1), "r3f": (2, 1), "r4f": (2, 1), "smart1": (3, 2), "smart2": (4, 3),
                       "freelb2": (2, 2), "freelb3": (3, 3)}
    paper = {r["method"]: r["paper_forward_units"] for r in rows}
    assert paper["std"] == 3 and paper["r3f"] == 4 and paper["smart1"] == 6 and paper["freelb3"] == 9
    assert rows[0]["time_ratio"] == 1.0 and all(r["median_s"] > 0 for r in rows)
    assert main(["cost", "--model", str(tiny_checkpoint), "--batch-size", "4", "--seq-len", "16",
                 "--warmup", "0", "--repeats", "1"]) == 0
    printed = capsys.readouterr()
    assert "| smart1 | 2/2 | 6 | 3/2 (+1 teacher) | 7 |" in printed.out
    assert "--repeats 1 --warmup 0 times too few updates" in printed.err  # its ratios are said to be noise



def test_measure_runners_shuffles_the_order_of_every_round():
    """No runner always runs first or after the same neighbour: each round has its own order."""
    calls = []

    class Runner:
        options, logs = MethodOptions(method="std"), {"forward_passes": 1, "backward_passes": 1}

        def __init__(self, name):
            self.name = name

        def update(self):
            torch.ones(2, 2) @ torch.ones(2, 2)  # some FLOPs to count
            calls.append(self.name)

    names = ["a", "b", "c", "d"]
    rows = measure_runners([Runner(n) for n in names], batch_size=1, warmup=1, repeats=8)
    rounds = [tuple(calls[i:i + 4]) for i in range(0, len(calls), 4)]
    assert len(rounds) == 10 and all(sorted(r) == names for r in rounds)
    assert len(set(rounds[2:])) > 1  # the timed rounds are not all in one order
    assert len({r[0] for r in rounds[2:]}) > 1  # nor with the same one first
    assert [r["method"] for r in rows] == names and all(len(r["times"]) == 8 for r in rows)


def test_step_benchmark_times_the_peers_and_counts_their_passes(tiny_checkpoint, tmp_path):
    """The benchmark script (never a test itself) runs end to end on a tiny model; its peers
    count the passes they run, which must be what each peer's algorithm implies; each target
    comes with an interval that holds it, and a saved run prints again from its JSON."""
    script = Path(__file__).parents[1] / "benchmarks" / "step_benchmark.py"
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, str(script), "--model", str(tiny_checkpoint), "--batch-size", "4",
                           "--seq-len", "16", "--warmup", "0", "--repeats", "2", "--smart-steps", "1",
                           "--freelb-steps", "2", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    counted = {r["method"]: (r["forward"], r["backward"]) for r in json.loads(out.read_text())["rows"]}
    assert counted["hf-trainer"] == counted["rxf-trainer-std"] == counted["rxf-trainer-std++"] == (1, 1)
    assert counted["fairseq-r3f"] == counted["r3f"] == counted["r3f-nograd"] == (2, 1)
    assert counted["smart-pytorch1"] == counted["smart1-nobregman"] == (3, 2)
    assert counted["forward-nograd"] == counted["forward-nograd-nodropout"] == (1, 0)
    assert "its gradient-free training-mode pass alone (forward-nograd)" in done.stdout
    assert "drawing the dropout masks" in done.stdout
    targets = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in done.stdout.splitlines()
               if line.startswith("| rxf ")}
    for what in ("rxf R3F vs fairseq-style R3F", "rxf SMART S=1 without teacher vs smart-pytorch S=1"):
        measured, interval, bound, verdict = targets[what]
        lo, hi = (float(x) for x in interval.split("–"))
        assert 0 < lo <= float(measured) <= hi  # the bootstrap interval holds the measured ratio
        assert verdict.strip(" |") in {"yes", "no", "within noise"}
    again = subprocess.run([sys.executable, str(script), "--from-json", str(out)], capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0 and "| rxf R3F vs fairseq-style R3F | " + " | ".join(
        targets["rxf R3F vs fairseq-style R3F"]) in again.stdout

XNLI_FILES = {
    "sw": ("myXNLI/sw.genre.dev.tsv", 2490, "Naye akasema, Mama, niko nyumbani.", 1),
    "my": ("myXNLI/my.genre.dev.tsv", 2490, None, 1),
    "de": ("de_SuperGLEBer_XGLUE/dev.txt", 250, "und er hat gesagt, Mama ich bin daheim.", 1),
    "hr": ("hr_C-XNLI/xnli.dev.hr.csv", 2490, "Pa je rekao: Mama, kod kuće sam.", 1),
    "es": ("es_eu_XNLIvar/xnli-es-original.tsv", 5010, None, 2),
    "eu": ("es_eu_XNLIvar/xnli-eu-original.tsv", 5010, None, 2),
}


@pytest.mark.parametrize("language", sorted(XNLI_FILES))
def test_xnli_local_formats_and_labels(data_dir, language):
    path, rows, first_premise, first_label = XNLI_FILES[language]
    examples = read_language_file(data_dir / "xnli" / path, language)
    assert len(examples) == rows
    assert examples.labels[0] == first_label  # neutral = 1, contradiction = 2 (MNLI ids)
    assert set(examples.labels) == {0, 1, 2}
    if first_premise:
        assert examples.text_a[0] == first_premise
    if language == "my":  # the Burmese columns, not the English ones in the same file
        assert not examples.text_a[0].startswith("And he said")


def test_xnli_zero_shot_end_to_end(tiny_checkpoint, data_dir, tmp_path):
    out = tmp_path / "xnli"
    x = data_dir / "xnli"
    assert main(["xnli", "--methods", "std,r3f", "--model", str(tiny_checkpoint),
                 "--data-dir", str(data_dir / "glue" / "MNLI" / "k-shot" / "16-13"),
                 "--eval", f"de={x / 'de_SuperGLEBer_XGLUE/dev.txt'}", "--eval", f"es={x / 'es_eu_XNLIvar/xnli-es-original.tsv'}",
                 "--max-eval-samples", "30", "--output-dir", str(out), *TINY_RUN]) == 0
    report = json.loads((out / "xnli.json").read_text())
    assert set(report["methods"]) == {"std", "r3f"}
    for row in report["methods"].values():
        assert set(row["accuracy"]) == {"de", "es"}
        assert row["average"] == pytest.approx(sum(row["accuracy"].values()) / 2)
    assert report["languages"]["es"]["examples"] == 30
    table = (out / "xnli.md").read_text()
    assert "| method | de | es | avg |" in table


def _fake_run(folder: Path, seed: int, learning_rate: float = 2e-5, examples: int = 100, subfolder: str = "",
              processes: int | None = None) -> None:
    """A results.json as rxf finetune writes it, reduced to what the report reads
    (``processes``: recorded under ``hardware``; None: a run of an rxf that did not)."""
    run = {"task": "cola", "method": "r3f", "seed": seed, "main_metric": "dev/matthews_correlation",
           "best": {"dev": {"matthews_correlation": 0.1 * seed}}, "seconds_to_best": 10.0 * seed,
           "spec": {"task": "cola", "seed": seed, "learning_rate": learning_rate, "output_dir": str(folder),
                    "data_dir": f"/machine{seed}/glue"},
           "config": {"method": "r3f", "r3f_lambda": 1.0, "seed": seed, "output_dir": str(folder)},
           "data": {"train": {"source": f"/machine{seed}/glue/CoLA/train.tsv", "examples": examples}}}
    if processes is not None:
        run["hardware"] = {"processes": processes}
    path = folder / "cola" / "r3f" / subfolder / f"seed{seed}"
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps(run))


def test_report_refuses_runs_that_are_not_seeds_of_one_configuration(tmp_path, capsys):
    """Seeds of one task and method may come from other machines (other paths), but a seed
    found twice, or a run at another learning rate or on other data, would silently become
    part of the method's max and median: refused, naming both files."""
    same = tmp_path / "same"
    for seed in (1, 2, 3):
        _fake_run(same, seed)
    # Seeds 1-2 record an option (at its default) that seed 3's older rxf did not have yet:
    # it counts at its default there, as when a run folder is resumed.
    for seed in (1, 2):
        record = same / f"cola/r3f/seed{seed}/results.json"
        newer = json.loads(record.read_text())
        newer["config"]["r3f_noised_no_grad"] = False
        newer["hardware"] = {"processes": 1}  # seed 3's rxf did not record it: one process
        record.write_text(json.dumps(newer))
    assert main(["report", "--runs", str(same), "--output-dir", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out/report.json").read_text())["summary"]["cola"]["r3f"]["max"] == pytest.approx(0.3)

    for name, extra, says in (("twice", dict(seed=1, subfolder="copy"), "seed 1 twice"),
                              ("lr", dict(seed=2, learning_rate=5e-5), "spec.learning_rate (2e-05 there, 5e-05 here)"),
                              ("data", dict(seed=2, examples=99), "examples.train (100 there, 99 here)"),
                              # the batch is per process: seed 2 under torchrun saw twice the batch
                              ("procs", dict(seed=2, processes=2), "spec.processes (1 there, 2 here)")):
        folder = tmp_path / name
        _fake_run(folder, 1)
        _fake_run(folder, **extra)
        capsys.readouterr()
        assert main(["report", "--runs", str(folder), "--output-dir", str(tmp_path / f"out-{name}")]) == 2
        err = capsys.readouterr().err
        assert says in err and str(folder / "cola/r3f") in err
        assert not (tmp_path / f"out-{name}").exists()


def test_report_pools_several_folders_of_runs(tmp_path, capsys):
    """--runs repeated: seeds run into other output folders are reported as one method's,
    as if copied together; a seed in two of them is still refused."""
    for seed, folder in ((1, "a"), (2, "a"), (3, "b")):
        _fake_run(tmp_path / folder, seed)
    pooled = ["report", "--runs", str(tmp_path / "a"), "--runs", str(tmp_path / "b")]
    assert main([*pooled, "--output-dir", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out/report.json").read_text())["summary"]["cola"]["r3f"]
    assert summary["seeds"] == [1, 2, 3] and summary["scores"] == pytest.approx([0.1, 0.2, 0.3])
    assert summary["median"] == pytest.approx(0.2) and summary["mean"] == pytest.approx(0.2)
    # A folder given again, or one inside another, adds no run twice.
    assert main([*pooled, "--runs", str(tmp_path / "a" / "cola"), "--output-dir", str(tmp_path / "again")]) == 0
    assert json.loads((tmp_path / "again/report.json").read_text())["summary"]["cola"]["r3f"] == summary

    capsys.readouterr()
    assert main(pooled) == 2  # no single folder to write into
    assert "--output-dir is needed" in capsys.readouterr().err
    _fake_run(tmp_path / "b", 2)
    assert main([*pooled, "--output-dir", str(tmp_path / "bad")]) == 2
    assert "seed 2 twice" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_report_leaves_no_plot_of_an_earlier_report_in_its_folder(tmp_path):
    """A report written into a folder that holds an earlier report's plots of other tasks
    removes them: every plot beside report.md is of this report's runs."""
    for seed in (1, 2):
        _fake_run(tmp_path / "runs", seed)
    out = tmp_path / "out"
    out.mkdir()
    (out / "violin_sst2.png").write_bytes(b"an earlier report's")
    assert main(["report", "--runs", str(tmp_path / "runs"), "--output-dir", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["seconds_to_best.png", "violin_cola.png"]


def test_report_compares_the_model_and_data_digests_of_run_json(tmp_path, capsys):
    """Seeds trained from another model, or on data of the same size but other content,
    differ only in the digests run.json keeps beside results.json: refused too."""
    for name, key, value in (("model", "model_files", "other"), ("data", "data", {"train": "other", "dev": "d"})):
        folder = tmp_path / name
        for seed in (1, 2):
            _fake_run(folder, seed)
            record = {"model_files": "m", "data": {"train": "t", "dev": "d"}}
            if seed == 2:
                record[key] = value
            (folder / f"cola/r3f/seed{seed}/run.json").write_text(json.dumps(record))
        assert main(["report", "--runs", str(folder), "--output-dir", str(tmp_path / f"out-{name}")]) == 2
        assert f"content.{'model_files' if name == 'model' else 'data.train'}" in capsys.readouterr().err
    # A run without run.json (copied results only) is compared on what it has.
    (tmp_path / "model/cola/r3f/seed2/run.json").unlink()
    assert main(["report", "--runs", str(tmp_path / "model"), "--output-dir", str(tmp_path / "out-ok")]) == 0


def test_report_refuses_a_folder_it_cannot_read_in_one_line(tmp_path, capsys):
    assert main(["report", "--runs", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: not found" in capsys.readouterr().err
    for content in ([], {}, {"task": "cola", "method": "r3f", "seed": "1", "main_metric": "m", "best": {}}):
        (tmp_path / "runs").mkdir(exist_ok=True)
        (tmp_path / "runs/results.json").write_text(json.dumps(content))
        assert main(["report", "--runs", str(tmp_path / "runs")]) == 2
        assert "not the results.json of an rxf run" in capsys.readouterr().err
