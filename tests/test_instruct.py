"""Instruction tuning from the command: ``rxf finetune --task instruct`` end to end with tiny
random causal LMs (GPT-2 and Llama) and a byte-level tokenizer made here, on prompt/response
and chat JSONL. The dev loss in results.json is checked against one computed here, from
best/ with the model's own forward one example at a time and a response mask built here."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from rxf.cli import main
from rxf.errors import DataError
from rxf.tasks.instruct import Instructions, encode, read_instructions

EOS = "<|endoftext|>"
# A chat template whose renderings this file writes out by hand (``chat_texts``).
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% if m['role'] == 'assistant' %}"
            "{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
RUN = ["--max-steps", "4", "--eval-steps", "2", "--batch-size", "4", "--eval-batch-size", "4",
       "--learning-rate", "3e-3", "--warmup-ratio", "0", "--max-length", "96", "--no-progress"]


# --- tiny models and data ----------------------------------------------------------------


def byte_tokenizer(chat_template: str | None = None):
    """Every byte is a token (no merges), plus the EOS token: any text tokenises."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab[EOS] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def write_causal_lm(folder: Path, kind: str) -> Path:
    """A 2-layer, 32-wide random GPT-2 (dropout 0.1, no chat template) or Llama (with
    ``TEMPLATE``) and its tokenizer, saved in ``folder``."""
    tokenizer = byte_tokenizer(TEMPLATE if kind == "llama" else None)
    V, eos = len(tokenizer), tokenizer.eos_token_id
    torch.manual_seed(0)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=2, n_positions=128,
                                           bos_token_id=eos, eos_token_id=eos))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                                             bos_token_id=eos, eos_token_id=eos, pad_token_id=None))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return {kind: write_causal_lm(tmp_path_factory.mktemp(kind), kind) for kind in ("gpt2", "llama")}


def pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """Long prompts, short responses of varying length: a loss over the prompt too would differ."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        word = "".join("abcdefgh"[int(i)] for i in torch.randint(0, 8, (int(torch.randint(2, 7, (1,), generator=g)),),
                                                                 generator=g))
        rows.append((f"Question: what is the reverse of {word}?\nAnswer: ", word[::-1]))
    return rows


def write_jsonl(path: Path, records: list[dict]) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in records)
    path.write_bytes(gzip.compress(text.encode()) if path.suffix == ".gz" else text.encode())
    return path


def data(folder: Path, style: str) -> tuple[Path, Path]:
    """Train (12) and dev (6) files: "plain" prompt/response, "mapped" instruction/output
    (gzipped) or "chat" messages."""
    def record(prompt, response):
        if style == "chat":
            return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]}
        return {"instruction": prompt, "output": response} if style == "mapped" else {"prompt": prompt,
                                                                                      "response": response}
    suffix = ".jsonl.gz" if style == "mapped" else ".jsonl"
    return tuple(write_jsonl(folder / f"{name}{suffix}", [record(p, r) for p, r in pairs(n, seed)])
                 for name, n, seed in (("train", 12, 0), ("dev", 6, 1)))


def chat_texts(prompt: str, response: str) -> tuple[str, str]:
    """What ``TEMPLATE`` renders, written out: the prompt with the generation cue, then the response."""
    return f"<user>{prompt}\n<assistant>", f"{response}{EOS}\n"


def response_loss(model, tokenizer, examples: list[tuple[str, str]], chat: bool) -> float:
    """Mean cross entropy over every response token of ``examples``, one example at a
    time (no padding), each response token predicted from the tokens before it."""
    total, count = 0.0, 0
    for prompt, response in examples:
        if chat:  # the template writes every special token
            prompt, response = chat_texts(prompt, response)
            p = tokenizer.encode(prompt, add_special_tokens=False)
            r = tokenizer.encode(response, add_special_tokens=False)
        else:
            p = tokenizer.encode(prompt)
            r = tokenizer.encode(response, add_special_tokens=False) + [tokenizer.eos_token_id]
        ids = torch.tensor([p + r])
        with torch.no_grad():
            log_probs = F.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        positions = torch.arange(len(p), len(p) + len(r))  # the response tokens, predicted from position - 1
        total -= log_probs[positions - 1, ids[0, positions]].sum().item()
        count += len(r)
    return total / count


def finetune(model: Path, train: Path, dev: Path, out: Path, *extra: str) -> int:
    return main(["finetune", "--task", "instruct", "--model", str(model), "--train-file", str(train),
                 "--dev-file", str(dev), "--output-dir", str(out), *RUN, *extra])


# --- end to end ---------------------------------------------------------------------------


@pytest.mark.parametrize("method, kind, style, passes", [
    ("std", "gpt2", "plain", 1),
    ("r3f", "llama", "chat", 2),
    ("rdrop", "gpt2", "mapped", 2),
    ("neftune", "llama", "plain", 1),
])
def test_finetune_scores_response_tokens_only(models, tmp_path, method, kind, style, passes):
    train, dev = data(tmp_path, style)
    extra = ["--columns", "prompt=instruction,response=output"] if style == "mapped" else []
    assert finetune(models[kind], train, dev, tmp_path / "run", "--method", method, *extra) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    best = results["best"]["dev"]
    assert results["task"] == "instruct" and results["method"] == method
    assert results["passes_per_update"] == {"forward": passes, "backward": 1}
    assert best["perplexity"] == pytest.approx(math.exp(best["loss"]), rel=1e-12)
    assert results["main_metric"] == "dev/loss" and results["best_checkpoint"] == "model"
    # The best checkpoint is the one with the lowest dev loss.
    assert best["loss"] == min(e["eval_dev_loss"] for e in results["history"])

    dev_pairs = pairs(6, 1)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "run" / "best")
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "best").eval()
    assert best["loss"] == pytest.approx(response_loss(trained, tokenizer, dev_pairs, style == "chat"), abs=1e-4)
    expected_tokens = sum(len(tokenizer.encode(chat_texts(p, r)[1] if style == "chat" else r + EOS,
                                               add_special_tokens=False)) for p, r in dev_pairs)
    assert best["response_tokens"] == expected_tokens == results["data"]["dev"]["response_tokens"]
    untrained = AutoModelForCausalLM.from_pretrained(models[kind]).eval()
    assert best["loss"] < response_loss(untrained, tokenizer, dev_pairs, style == "chat") - 0.1  # it learnt
    assert not (tmp_path / "run" / "checkpoints").exists()
    # A rerun of the finished run returns its results; one with other data is refused.
    assert finetune(models[kind], train, dev, tmp_path / "run", "--method", method, *extra) == 0
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == results
    assert finetune(models[kind], dev, dev, tmp_path / "run", "--method", method, *extra) == 2


def test_lora_trains_adapters_only_and_best_holds_the_adapter(models, tmp_path):
    pytest.importorskip("peft")
    from peft import PeftModel
    from safetensors.torch import load_file

    train, dev = data(tmp_path, "plain")
    assert finetune(models["llama"], train, dev, tmp_path / "run", "--method", "r3f", "--lora-r", "4",
                    "--learning-rate", "1e-2") == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    best = tmp_path / "run" / "best"
    assert results["best_checkpoint"] == "lora_adapter" and (best / "adapter_config.json").is_file()
    adapter = load_file(best / "adapter_model.safetensors")
    assert adapter and all("lora_" in name for name in adapter), sorted(adapter)
    # all-linear: every projection of every layer, not the output layer.
    assert {name.split(".")[-3] for name in adapter} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"}
    # Trained: B starts at 0.
    assert any(name.endswith("lora_B.weight") and t.abs().max() > 0 for name, t in adapter.items())

    # The frozen base plus the adapter is the model evaluated: nothing else changed.
    tokenizer = AutoTokenizer.from_pretrained(best)
    base = AutoModelForCausalLM.from_pretrained(models["llama"]).eval()
    base_loss = response_loss(base, tokenizer, pairs(6, 1), chat=False)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models["llama"]), best).eval()
    loss = response_loss(tuned, tokenizer, pairs(6, 1), chat=False)
    assert results["best"]["dev"]["loss"] == pytest.approx(loss, abs=1e-4)
    assert loss < base_loss - 0.1


# --- bad input: one line naming the file and line, nothing written -------------------------


@pytest.mark.parametrize("case", ["no response", "chat without template", "method", "no peft"])
def test_bad_input_exits_2_naming_the_file_and_line(models, tmp_path, capsys, monkeypatch, case):
    train, dev = data(tmp_path, "chat" if case == "chat without template" else "plain")
    model, extra = models["gpt2"], []
    expected = f"{train}:1: a chat example (messages) needs a tokenizer with a chat template"
    if case == "no response":
        lines = train.read_text().splitlines()
        lines[2] = json.dumps({"prompt": "hello", "answer": "oops"})
        train.write_text("\n".join(lines) + "\n")
        expected = f"{train}:3: no 'response' field (the line has answer, prompt)"
    elif case == "method":
        extra, expected = ["--method", "smart"], "--method smart is not offered for --task instruct"
    elif case == "no peft":
        import importlib.util

        find_spec = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: None if name == "peft" else find_spec(name, *a))
        extra, expected = ["--lora-r", "4"], "--lora-r: LoRA needs the peft package: pip install peft"
    capsys.readouterr()
    assert finetune(model, train, dev, tmp_path / "run", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


# --- tokenisation ---------------------------------------------------------------------------


def test_prompt_is_masked_and_kept_whole_and_the_response_cut_at_its_end():
    tokenizer = byte_tokenizer()
    split = Instructions([{"prompt": "0123456789", "response": "abcdefgh"},
                          {"prompt": "0123456789ABCD", "response": "x"}], [1, 2], "mem")
    columns, stats = encode(split, tokenizer, max_length=14)
    ids = tokenizer.encode("0123456789abcd")
    assert columns == {"input_ids": [ids], "labels": [[-100] * 10 + ids[10:]]}  # no room left for the second
    assert stats == {"used": 1, "dropped": 1, "truncated": 1, "response_tokens": 4}
    columns, stats = encode(split, tokenizer, max_length=64)
    assert columns["input_ids"][0] == tokenizer.encode("0123456789abcdefgh") + [tokenizer.eos_token_id]
    assert stats == {"used": 2, "dropped": 0, "truncated": 0, "response_tokens": 11}
    with pytest.raises(DataError, match="mem: no example leaves room"):
        encode(split, tokenizer, max_length=10)


def test_chat_template_that_rewrites_the_prompt_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}])
    # The generation cue differs from how the template writes an assistant turn.
    tokenizer = byte_tokenizer(TEMPLATE.replace("add_generation_prompt %}<assistant>", "add_generation_prompt %}<bot>"))
    with pytest.raises(DataError, match=f"{path}:1: the chat template's rendering .* does not begin"):
        encode(read_instructions(path), tokenizer, 64)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match=f"{bad}:1: messages must be a list of at least two"):
        read_instructions(bad)
