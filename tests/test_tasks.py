"""GLUE task definitions, metrics and data loading."""


import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from rxf.errors import DataError
from rxf.tasks import GLUE_TASKS, get_task, load_local
from rxf.tasks.loading import examples_from_file, load_hub

# --- metrics -------------------------------------------------------------------------

PRED = np.array([1, 0, 1, 1, 0, 1, 0, 0, 1, 1])
GOLD = np.array([1, 0, 0, 1, 0, 1, 1, 0, 1, 0])


def test_classification_metrics_agree_with_sklearn():
    assert get_task("sst2").compute_metrics(PRED, GOLD) == {"accuracy": 0.7}
    mrpc = get_task("mrpc").compute_metrics(PRED, GOLD)
    assert mrpc["accuracy"] == accuracy_score(GOLD, PRED) and mrpc["f1"] == pytest.approx(f1_score(GOLD, PRED))
    assert mrpc["f1"] == pytest.approx(2 * 4 / (2 * 4 + 2 + 1))  # tp 4, fp 2, fn 1
    cola = get_task("cola").compute_metrics(PRED, GOLD)
    assert cola["matthews_correlation"] == pytest.approx(matthews_corrcoef(GOLD, PRED))


def test_regression_metrics_agree_with_scipy():
    pred, gold = np.array([0.1, 2.0, 3.5, 4.0, 1.0]), np.array([0.0, 2.5, 3.0, 5.0, 1.5])
    stsb = get_task("stsb").compute_metrics(pred, gold)
    assert stsb["pearson"] == pytest.approx(pearsonr(pred, gold)[0])
    assert stsb["spearman"] == pytest.approx(spearmanr(pred, gold)[0]) == pytest.approx(1.0)


def test_task_table():
    assert sorted(GLUE_TASKS) == ["cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb", "wnli"]
    assert get_task("mnli").labels == ("entailment", "neutral", "contradiction")  # hub ids
    assert get_task("stsb").is_regression and get_task("stsb").num_labels == 1
    with pytest.raises(Exception, match="--task"):
        get_task("sst-2")


# --- local files ---------------------------------------------------------------------

OFFICIAL = {"cola": 8551, "sst2": 67349, "mrpc": 3667, "stsb": 5749, "rte": 2490, "wnli": 635}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_glue_tsvs_load(data_dir, name):
    splits = load_local(get_task(name), data_dir / "glue")
    assert len(splits["train"]) == OFFICIAL[name]
    assert len(splits["dev"]) > 0


@pytest.mark.parametrize("name", ["qnli", "qqp", "mnli"])
@pytest.mark.parametrize("subset", ["glue_pretrain", "k-shot/16-13"])
def test_pretrain_jsonl_and_kshot_tsv_load(data_dir, name, subset):
    task = get_task(name)
    splits = load_local(task, data_dir / "glue" / task.folder / subset)
    assert len(splits["train"]) >= 32 and len(splits[task.dev_splits[0]]) >= 32
    assert set(splits["train"].labels) == set(range(task.num_labels))
    assert splits["train"].text_b is not None and all(splits["train"].text_b)


def test_known_rows(data_dir):
    glue = data_dir / "glue"
    sst2 = load_local(get_task("sst2"), glue)["train"]
    assert (sst2.text_a[0].strip(), sst2.labels[0]) == ("hide new secretions from the parental units", 0)
    mrpc = load_local(get_task("mrpc"), glue)["train"]  # header behind a byte-order mark
    assert mrpc.text_a[0].startswith("Amrozi accused his brother") and mrpc.labels[0] == 1
    cola = load_local(get_task("cola"), glue)["train"]  # headerless
    assert cola.text_a[0].startswith("Our friends won't buy this analysis") and cola.labels[0] == 1
    rte = load_local(get_task("rte"), glue)["train"]
    assert rte.text_b[0] == "Weapons of Mass Destruction Found in Iraq." and rte.labels[0] == 1  # not_entailment
    stsb = load_local(get_task("stsb"), glue)["train"]
    assert stsb.labels[:2] == [5.0, 3.8]
    mnli = load_local(get_task("mnli"), glue / "MNLI" / "glue_pretrain")
    assert mnli["dev_matched"].source.endswith("dev.jsonl")
    assert mnli["train"].labels[0] == 0  # "entailment"


def test_quotes_are_text_not_quoting(tmp_path):
    (tmp_path / "train.tsv").write_text('sentence\tlabel\n"a quoted start\t1\nplain " middle\t0\n')
    (tmp_path / "dev.tsv").write_text('sentence\tlabel\nx\t1\n')
    splits = load_local(get_task("sst2"), tmp_path)
    assert splits["train"].text_a == ['"a quoted start', 'plain " middle']


def test_column_mapping_for_csv(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("premise,hyp,verdict\nA man sleeps.,Someone rests.,entailment\n")
    examples = examples_from_file(get_task("rte"), path, {"sentence1": "premise", "sentence2": "hyp", "label": "verdict"})
    assert examples.text_a == ["A man sleeps."] and examples.text_b == ["Someone rests."] and examples.labels == [0]
    with pytest.raises(DataError, match="missing column"):
        examples_from_file(get_task("rte"), path)


@pytest.mark.parametrize(
    "content, message",
    [
        ("sentence\tlabel\ngood\t1\nbad\t0\textra\n", r"train\.tsv:3: expected 2 tab-separated fields, found 3"),
        ("sentence\tlabel\ngood\t1\nbad\t7\n", r"train\.tsv:3: label '7' is not one of 0, 1"),
        ("", r"train\.tsv: empty file"),
    ],
)
def test_bad_files_name_file_and_line(tmp_path, content, message):
    (tmp_path / "train.tsv").write_text(content)
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nok\t1\n")
    with pytest.raises(DataError, match=message):
        load_local(get_task("sst2"), tmp_path)


def test_non_numeric_score_and_missing_split(tmp_path):
    (tmp_path / "train.tsv").write_text("sentence1\tsentence2\tscore\na\tb\t4.5\nc\td\thigh\n")
    with pytest.raises(DataError, match=r"train\.tsv:3: score 'high' is not a number"):
        load_local(get_task("stsb"), tmp_path)
    (tmp_path / "train.tsv").write_text("sentence1\tsentence2\tscore\na\tb\t4.5\n")
    with pytest.raises(DataError, match="no dev split for stsb"):
        load_local(get_task("stsb"), tmp_path)


def test_missing_train_split_points_at_subfolders(data_dir):
    with pytest.raises(DataError, match="glue_pretrain"):
        load_local(get_task("qnli"), data_dir / "glue")


def test_hub_loading_maps_columns_and_splits(monkeypatch):
    """The hub path, fed a local DatasetDict in the hub's schema (no network here)."""
    import datasets

    def fake_load_dataset(name, config, **kwargs):
        assert (name, config) == ("nyu-mll/glue", "mnli") and "trust_remote_code" not in kwargs
        split = datasets.Dataset.from_dict({"premise": ["p1", "p2"], "hypothesis": ["h1", "h2"], "label": [2, 0], "idx": [0, 1]})
        return datasets.DatasetDict(train=split, validation_matched=split, validation_mismatched=split)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    splits = load_hub(get_task("mnli"))
    assert set(splits) == {"train", "dev_matched", "dev_mismatched"}
    assert splits["train"].text_a == ["p1", "p2"] and splits["train"].text_b == ["h1", "h2"]
    assert splits["train"].labels == [2, 0]
