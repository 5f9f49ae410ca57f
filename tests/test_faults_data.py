"""Data faults: misspelt --columns keys, stale tokenisation caches, gzip and binary
files, and hub loading without network. Each must be one clear error (or the right
data), never a silent fallback or a traceback."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from rxf.cli import main
from rxf.errors import DataError
from rxf.tasks import get_task, load_local
from rxf.tasks.loading import Examples, examples_from_file, find_split_file, load_hub, parse_column_map, read_records
from rxf.tasks.tokenize import cache_key, cache_root, tokenize

RTE_TRAIN = "sentence1\tsentence2\tlabel\nA man sleeps.\tSomeone rests.\tentailment\nIt rains.\tIt is dry.\tnot_entailment\n"
SST2 = "sentence\tlabel\ngood\t1\nbad\t0\n"


def one_line(message: str) -> bool:
    return "\n" not in message.strip()


# --- 1. --columns keys -----------------------------------------------------------------


def test_misspelt_column_key_is_refused_with_the_valid_keys(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text(RTE_TRAIN.replace("label", "gold", 1))
    with pytest.raises(DataError) as info:
        examples_from_file(get_task("rte"), path, {"lable": "gold"})
    message = str(info.value)
    assert message.startswith("--columns: unknown key 'lable'") and "did you mean 'label'" in message
    assert "sentence1, sentence2, label" in message and one_line(message)
    # The same key spelt right is used.
    assert examples_from_file(get_task("rte"), path, {"label": "gold"}).labels == [0, 1]


def test_unknown_column_key_is_refused_before_the_file_is_read(tmp_path):
    # The option is wrong whatever the file holds: say so rather than "file not found".
    with pytest.raises(DataError, match="--columns: unknown key 'text'"):
        load_local(get_task("sst2"), tmp_path / "nowhere", {"text": "review"})


def test_parse_column_map_checks_keys_only_when_told_them():
    assert parse_column_map("lable=gold") == {"lable": "gold"}  # callers that check later
    assert parse_column_map("label=gold", valid_keys=("sentence", "label")) == {"label": "gold"}
    with pytest.raises(DataError, match=r"--columns: unknown key 'lable'.*sentence, label"):
        parse_column_map("lable=gold", valid_keys=("sentence", "label"))


# --- 2. tokenisation cache ---------------------------------------------------------------


def _bert_tokenizer_folder(folder: Path) -> Path:
    """A lower-casing character-level WordPiece tokenizer (fast) saved in ``folder``."""
    from transformers import BertTokenizerFast

    folder.mkdir()
    chars = list("abcdefghijklmnopqrstuvwxyz")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + [c.upper() for c in chars] + ["##" + c for c in chars]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast.from_pretrained(folder).save_pretrained(folder)
    return folder


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _ids(folder: Path, examples: Examples, use_cache: bool) -> list[list[int]]:
    from transformers import AutoTokenizer

    return tokenize(examples, AutoTokenizer.from_pretrained(folder), 32, use_cache=use_cache)["input_ids"]


EXAMPLES = Examples(["Hello World", "low"], None, [1, 0], "test")


def _swap_vocab_entries(data: dict) -> None:
    vocab = data["model"]["vocab"]
    vocab["##l"], vocab["##o"] = vocab["##o"], vocab["##l"]


def _stop_lower_casing(data: dict) -> None:
    data["do_lower_case"] = False


@pytest.mark.parametrize("file, edit", [("tokenizer.json", _swap_vocab_entries), ("tokenizer_config.json", _stop_lower_casing)])
def test_tokenizer_edited_in_place_does_not_reuse_the_cache(tmp_path, file, edit):
    folder = _bert_tokenizer_folder(tmp_path / "tok")
    before = _ids(folder, EXAMPLES, use_cache=True)
    assert before == _ids(folder, EXAMPLES, use_cache=False)
    _edit_json(folder / file, edit)
    fresh = _ids(folder, EXAMPLES, use_cache=False)
    assert fresh != before, "the edit should change the ids (precondition)"
    assert _ids(folder, EXAMPLES, use_cache=True) == fresh


def test_cache_key_is_stable_across_loads_and_use(tmp_path):
    """The key must not depend on the backend's per-call truncation state, or a cache
    written in one run would never be found by the next."""
    from transformers import AutoTokenizer

    folder = _bert_tokenizer_folder(tmp_path / "tok")
    used = AutoTokenizer.from_pretrained(folder)
    used(["some text"], truncation=True, max_length=4)
    assert cache_key(EXAMPLES, used, 32) == cache_key(EXAMPLES, AutoTokenizer.from_pretrained(folder), 32)
    assert cache_key(EXAMPLES, used, 32) != cache_key(EXAMPLES, used, 16)
    tokenize(EXAMPLES, used, 32)
    tokenize(EXAMPLES, AutoTokenizer.from_pretrained(folder), 32)
    assert len(list(cache_root().glob(cache_key(EXAMPLES, used, 32) + "*"))) == 1


class SlowTokenizer:
    """What the key reads from a tokenizer without a fast backend."""

    def __init__(self, vocab: dict[str, int], lower: bool = True):
        self.vocab, self.init_kwargs = vocab, {"do_lower_case": lower}

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)


def test_cache_key_of_a_slow_tokenizer_follows_its_vocabulary_and_settings():
    key = cache_key(EXAMPLES, SlowTokenizer({"a": 0, "b": 1}), 32)
    assert key == cache_key(EXAMPLES, SlowTokenizer({"b": 1, "a": 0}), 32)
    assert key != cache_key(EXAMPLES, SlowTokenizer({"a": 1, "b": 0}), 32)
    assert key != cache_key(EXAMPLES, SlowTokenizer({"a": 0, "b": 1}, lower=False), 32)


# --- 3. gzip and binary files ------------------------------------------------------------


def _gzip(path: Path, text: str) -> Path:
    path.write_bytes(gzip.compress(text.encode()))
    return path


def test_gzipped_split_files_are_found_and_read(tmp_path):
    _gzip(tmp_path / "train.tsv.gz", SST2)
    _gzip(tmp_path / "dev.jsonl.gz", '{"sentence": "fine", "label": "1"}\n')
    assert find_split_file(get_task("sst2"), tmp_path, "train") == tmp_path / "train.tsv.gz"
    splits = load_local(get_task("sst2"), tmp_path)
    assert splits["train"].text_a == ["good", "bad"] and splits["train"].labels == [1, 0]
    assert splits["dev"].text_a == ["fine"] and splits["dev"].source.endswith("dev.jsonl.gz")


def test_gzipped_csv_and_headerless_cola(tmp_path):
    csv_path = _gzip(tmp_path / "x.csv.gz", 'premise,hyp,verdict\n"A, quoted",B,entailment\n')
    examples = examples_from_file(get_task("rte"), csv_path, {"sentence1": "premise", "sentence2": "hyp", "label": "verdict"})
    assert examples.text_a == ["A, quoted"] and examples.labels == [0]
    cola = _gzip(tmp_path / "train.tsv.gz", "gj04\t1\t\tOur friends won't buy this.\ngj04\t0\t*\tThey drank the pub.\n")
    assert examples_from_file(get_task("cola"), cola).labels == [1, 0]


def test_plain_named_gzip_file_says_to_name_it_gz(tmp_path):
    _gzip(tmp_path / "train.tsv", SST2)
    (tmp_path / "dev.tsv").write_text(SST2)
    with pytest.raises(DataError) as info:
        load_local(get_task("sst2"), tmp_path)
    message = str(info.value)
    assert str(tmp_path / "train.tsv") in message and "train.tsv.gz" in message and one_line(message)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("train.tsv", b"sentence\tlabel\ngood\t1\nbad\xff\t0\n", r"train\.tsv:3: not valid UTF-8 \(byte 0xff\)"),
        ("train.csv", b"sentence,label\ngood,1\nb\x00d,0\n", r"train\.csv:3: binary content \(a NUL byte\)"),
        ("train.jsonl", "sentence\tlabel\n".encode("utf-16"), r"train\.jsonl: the file is UTF-16 text"),
        ("train.tsv.gz", SST2.encode(), r"train\.tsv\.gz: cannot decompress it as gzip"),
        ("train.tsv.gz", gzip.compress(SST2.encode())[:20], r"train\.tsv\.gz: cannot decompress it as gzip"),
        ("train.tsv.gz", gzip.compress(b""), r"train\.tsv\.gz: empty file"),
        ("train.tsv", b"", r"train\.tsv: empty file"),
        ("train.tsv", b"sentence\tlabel\n", r"train\.tsv: no data rows"),
        ("train.csv", b"sentence,label\r\n", r"train\.csv: no data rows"),
        ("train.parquet", b"PAR1\x00\x00", r"train\.parquet: unsupported file type '\.parquet'"),
    ],
)
def test_unreadable_files_are_one_line_errors(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=message) as info:
        examples_from_file(get_task("sst2"), tmp_path / name)
    assert one_line(str(info.value))


def test_read_records_reads_gzip_for_other_callers(tmp_path):
    path = _gzip(tmp_path / "pairs.jsonl.gz", '{"article": "a", "highlights": "b"}\n\n{"article": "c", "highlights": "d"}\n')
    assert read_records(path) == [(1, {"article": "a", "highlights": "b"}), (3, {"article": "c", "highlights": "d"})]


# --- 4. the hub without network ------------------------------------------------------------


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """datasets and huggingface_hub in offline mode with empty caches. They read the
    environment at import, so their settings are patched as well as the variables."""
    import datasets
    import huggingface_hub.constants

    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nowhere, should anything still try
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def test_hub_in_offline_mode_is_one_line_pointing_at_local_files(offline_hub):
    with pytest.raises(DataError) as info:
        load_hub(get_task("rte"))  # the real datasets code path, offline
    message = str(info.value)
    assert message.startswith("hub dataset nyu-mll/glue (rte): offline mode is on") and one_line(message)
    assert "--data-dir" in message and "--train-file" in message


def _network_failures():
    from huggingface_hub.errors import OfflineModeIsEnabled
    from huggingface_hub.utils import httpx

    return [
        ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)"),
        OfflineModeIsEnabled("Offline mode is enabled."),
        httpx.ConnectError("[Errno 111] Connection refused"),
        TimeoutError("timed out"),
    ]


@pytest.mark.parametrize("failure", _network_failures(), ids=lambda e: type(e).__name__)
def test_unreachable_hub_is_one_line(monkeypatch, failure):
    import datasets

    def unreachable(*args, **kwargs):
        raise failure

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    with pytest.raises(DataError) as info:
        load_hub(get_task("mnli"))
    message = str(info.value)
    assert message.startswith("hub dataset nyu-mll/glue (mnli): the Hugging Face hub is unreachable (")
    assert str(failure) in message and "--data-dir" in message and one_line(message)


def test_other_hub_errors_are_not_disguised_as_network_ones(monkeypatch):
    import datasets

    def broken(*args, **kwargs):
        raise ValueError("BuilderConfig 'rte' not found")

    monkeypatch.setattr(datasets, "load_dataset", broken)
    with pytest.raises(ValueError, match="BuilderConfig"):
        load_hub(get_task("rte"))


# --- the CLI: one line, exit 2, nothing written ----------------------------------------------


def _finetune(model: Path, out: Path, task: str, *extra: str) -> int:
    return main(["finetune", "--task", task, "--model", str(model), "--output-dir", str(out), "--no-progress", *extra])


def test_cli_refuses_gzip_content_in_a_plain_file(tiny_checkpoint, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    _gzip(data / "train.tsv", SST2)
    (data / "dev.tsv").write_text(SST2)
    out = tmp_path / "out"
    assert _finetune(tiny_checkpoint, out, "sst2", "--data-dir", str(data)) == 2
    err = capsys.readouterr().err
    assert "train.tsv: the file is gzip-compressed; name it train.tsv.gz" in err and err.count("\n") == 1
    assert not out.exists()


def test_cli_refuses_a_misspelt_columns_key(tiny_checkpoint, tmp_path, capsys):
    data = tmp_path / "RTE"
    data.mkdir()
    (data / "train.tsv").write_text(RTE_TRAIN.replace("label", "gold", 1))
    (data / "dev.tsv").write_text(RTE_TRAIN.replace("label", "gold", 1))
    out = tmp_path / "out"
    assert _finetune(tiny_checkpoint, out, "rte", "--data-dir", str(tmp_path), "--columns", "lable=gold") == 2
    err = capsys.readouterr().err
    assert "--columns: unknown key 'lable'" in err and "sentence1, sentence2, label" in err
    assert err.count("\n") == 1 and not out.exists()


def test_cli_without_hub_access_is_one_line(tiny_checkpoint, tmp_path, capsys, offline_hub):
    out = tmp_path / "out"
    assert _finetune(tiny_checkpoint, out, "rte") == 2
    err = capsys.readouterr().err
    assert "offline mode is on" in err and "--data-dir" in err and err.count("\n") == 1
    assert not out.exists()
