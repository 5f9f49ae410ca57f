"""R3F for seq2seq and decoder-only models, ROUGE, and summarisation through the CLI."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import write_tiny_checkpoint
from test_methods import PassCounter
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    GPT2Config,
    GPT2LMHeadModel,
    T5Config,
    T5ForConditionalGeneration,
)

import rxf.methods.generation as generation
from rxf import MethodOptions
from rxf.cli import main
from rxf.errors import OptionError
from rxf.methods.generation import Generation, generation_loss, label_smoothed_nll, token_divergence
from rxf.tasks.summarization import rouge

V = 60


def tiny(kind: str, dropout: float = 0.0):
    torch.manual_seed(0)
    if kind == "bart":
        return BartForConditionalGeneration(BartConfig(
            vocab_size=V, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=64,
            pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, dropout=dropout,
            attention_dropout=dropout, activation_dropout=dropout))
    if kind == "t5":
        return T5ForConditionalGeneration(T5Config(
            vocab_size=V, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=2, pad_token_id=0, eos_token_id=1,
            decoder_start_token_id=0, dropout_rate=dropout))
    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=2, n_positions=64, bos_token_id=V - 1,
                                      eos_token_id=V - 1, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout))


def batch_for(kind: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if kind == "gpt2":
        ids = torch.randint(3, V - 1, (4, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[2:, 9:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :5] = -100  # the prompt: no loss there
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    ids = torch.randint(3, V, (4, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[2:, 7:] = 0
    labels = torch.randint(3, V, (4, 6), generator=g)
    labels[1:, 4:] = -100  # padded targets
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


KINDS = ["bart", "t5", "gpt2"]


@pytest.mark.parametrize("kind", KINDS)
def test_zero_noise_gives_zero_term(kind):
    model = tiny(kind).train()
    loss, logs = generation_loss(model, batch_for(kind), MethodOptions(method="r3f", noise_eps=0.0))
    std, _ = generation_loss(model, batch_for(kind), MethodOptions(method="std"))
    assert logs["regularizer"].item() == 0.0 and torch.equal(loss, std)


def test_label_smoothed_loss_matches_reference():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, V)
    labels = torch.randint(0, V, (3, 5))
    labels[1, 3:] = -100
    expected = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), ignore_index=-100, label_smoothing=0.1)
    assert label_smoothed_nll(logits, labels, 0.1).item() == pytest.approx(expected.item(), abs=1e-6)
    manual = []
    for b in range(3):
        for t in range(5):
            if labels[b, t] != -100:
                logp = F.log_softmax(logits[b, t].double(), -1)
                manual.append(0.9 * -logp[labels[b, t]] + 0.1 * -logp.mean())
    assert label_smoothed_nll(logits, labels, 0.1).item() == pytest.approx(torch.stack(manual).mean().item(), abs=1e-6)


def test_padding_targets_do_not_touch_the_kl():
    torch.manual_seed(1)
    clean, noised = torch.randn(2, 6, V), torch.randn(2, 6, V)
    labels = torch.randint(0, V, (2, 6))
    labels[0, 4:] = -100
    before = token_divergence(clean, noised, labels)
    changed = noised.clone()
    changed[labels == -100] += 50 * torch.randn_like(changed[labels == -100])
    assert torch.equal(token_divergence(clean, changed, labels), before)


def test_decoder_only_prompt_positions_do_not_affect_the_term(monkeypatch):
    """Logits at positions outside the response mask are changed after the forward
    pass; the R3F term stays the same to the bit."""
    model = tiny("gpt2").train()
    batch = batch_for("gpt2")
    noise_calls = []
    monkeypatch.setattr(generation, "sample_noise", lambda e, k, s: noise_calls.append(1) or torch.full_like(e, 0.05))
    _, logs = generation_loss(model, batch, MethodOptions(method="r3f"))

    original_forward = model.forward
    scored = torch.zeros_like(batch["labels"], dtype=torch.bool)
    scored[:, :-1] = batch["labels"][:, 1:] != -100  # position t is scored when token t+1 has a label

    def forward_with_garbage_outside(*args, **kwargs):
        out = original_forward(*args, **kwargs)
        out.logits = out.logits.masked_fill(~scored.unsqueeze(-1), 0.0) + (~scored).unsqueeze(-1) * torch.randn_like(out.logits) * 30
        return out

    monkeypatch.setattr(model, "forward", forward_with_garbage_outside)
    _, changed = generation_loss(model, batch, MethodOptions(method="r3f"))
    assert changed["regularizer"].item() == logs["regularizer"].item() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_training_lowers_the_loss_with_two_forward_one_backward(kind, monkeypatch):
    model = tiny(kind, dropout=0.1).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    options = MethodOptions(method="r3f", noise_eps=1e-3)
    batch = batch_for(kind)
    counter = PassCounter(model, monkeypatch)
    losses = []
    for _ in range(15):
        loss, logs = generation_loss(model, batch, options)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(logs["task_loss"].item())
    assert losses[-1] < losses[0]
    assert (logs["forward_passes"], logs["backward_passes"]) == (2, 1)
    assert (counter.forward, counter.backward) == (30, 15)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert len(changed) == len(before)


def test_decoder_noise_option_runs():
    model = tiny("bart").train()
    _, logs = generation_loss(model, batch_for("bart"), MethodOptions(method="r3f", noise_target="decoder", noise_eps=1e-2))
    assert logs["regularizer"].item() > 0


def test_r4f_and_adversarial_methods_refused_for_generation(tmp_path):
    from rxf import RXFConfig, RXFTrainer

    with pytest.raises(OptionError, match="r4f is not defined for generation"):
        generation_loss(tiny("t5"), batch_for("t5"), MethodOptions(method="r4f"))
    with pytest.raises(OptionError, match="r4f"):
        RXFTrainer(model=tiny("bart"), args=RXFConfig(output_dir=str(tmp_path), method="r4f", report_to="none"))
    with pytest.raises(OptionError, match="smart"):
        generation_loss(tiny("gpt2"), batch_for("gpt2"), MethodOptions(method="smart"))


def test_rouge_agrees_with_rouge_score():
    from rouge_score import rouge_scorer

    predictions = ["the cat sat on the mat. it was happy.", "police arrested a man on monday"]
    references = ["a cat was sitting on the mat. the cat was happy!", "a man was arrested by police"]
    ours = rouge(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    direct = [scorer.score(r, p) for p, r in zip(predictions, references)]
    for key in ("rouge1", "rouge2", "rougeL"):
        assert ours[key] == pytest.approx(100 * sum(d[key].fmeasure for d in direct) / 2)
    lsum = [scorer.score("a cat was sitting on the mat.\nthe cat was happy!", "the cat sat on the mat.\nit was happy."),
            scorer.score(references[1], predictions[1])]
    assert ours["rougeLsum"] == pytest.approx(100 * sum(s["rougeLsum"].fmeasure for s in lsum) / 2)


@pytest.fixture(scope="module")
def tiny_bart_checkpoint(tmp_path_factory):
    """A tiny random BART with the character-level tokenizer of the tiny BERT."""
    from transformers import AutoTokenizer

    folder = write_tiny_checkpoint(tmp_path_factory.mktemp("bart"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
        decoder_start_token_id=tokenizer.cls_token_id, forced_eos_token_id=None,
    )
    for f in folder.glob("model.safetensors"):
        f.unlink()
    (folder / "config.json").unlink()
    BartForConditionalGeneration(config).save_pretrained(folder)
    return folder


def test_gigaword_end_to_end_with_tiny_bart(data_dir, tiny_bart_checkpoint, tmp_path, capsys):
    out = tmp_path / "giga"
    assert main(["finetune", "--task", "gigaword", "--method", "r3f", "--model", str(tiny_bart_checkpoint),
                 "--data-dir", str(data_dir / "summarization" / "Gigaword"), "--max-train-samples", "32",
                 "--max-eval-samples", "6", "--max-steps", "4", "--batch-size", "8", "--max-length", "64",
                 "--max-target-length", "12", "--num-beams", "2", "--learning-rate", "1e-3", "--no-progress",
                 "--output-dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["rouge"]) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    assert len(results["generated"]) == 6 and results["passes_per_update"] == {"forward": 2, "backward": 1}
    assert "rougeL" in results["best"]["dev"]
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 6 and {"source", "reference", "prediction"} <= set(predictions[0])
    assert predictions[0]["reference"] == (data_dir / "summarization/Gigaword/val/val.target").read_text().splitlines()[0]

    capsys.readouterr()
    assert main(["finetune", "--task", "gigaword", "--method", "r4f", "--model", str(tiny_bart_checkpoint),
                 "--data-dir", str(data_dir / "summarization" / "Gigaword"), "--output-dir", str(tmp_path / "r4f")]) == 2
    assert "r4f is not defined for generation" in capsys.readouterr().err
    assert not (tmp_path / "r4f").exists()


def test_label_smoothing_is_the_uniform_prior_over_all_tokens_not_fairseqs():
    """Golden: the cross entropy against the target 1 - eps + eps/V on the label and eps/V
    elsewhere. fairseq's eps/(V-1) on the other tokens differs by eps/V * (mean over the
    other tokens of -log p - NLL), as the docstring states."""
    torch.manual_seed(3)
    eps = 0.1
    logits = 3 * torch.randn(2, 4, V)
    labels = torch.randint(0, V, (2, 4))
    labels[1, 2:] = -100
    scored = labels != -100
    logp = F.log_softmax(logits.double(), -1)[scored]  # (N, V)
    target = torch.full_like(logp, eps / V)
    target[torch.arange(len(target)), labels[scored]] += 1 - eps
    expected = -(target * logp).sum(-1).mean()
    assert label_smoothed_nll(logits, labels, eps).item() == pytest.approx(expected.item(), abs=1e-6)

    nll = -logp[torch.arange(len(logp)), labels[scored]]
    others = (-logp.sum(-1) - nll) / (V - 1)
    fairseq = ((1 - eps - eps / (V - 1)) * nll + eps / (V - 1) * -logp.sum(-1)).mean()
    assert (fairseq - expected).item() == pytest.approx((eps / V * (others - nll)).mean().item(), abs=1e-9)
    assert abs((fairseq - expected).item()) > 1e-4  # the two are distinguishable here


def accumulation_batches(kind: str):
    """Four one-example micro-batches with 2, 7, 7, 7 scored target tokens, and the same
    four examples as one batch (padded: labels -100, attention mask 0)."""
    g = torch.Generator().manual_seed(4)
    micro = []
    for n in (2, 7, 7, 7):
        if kind == "gpt2":  # a 3-token prompt, then n scored tokens (the first predicted from the prompt)
            ids = torch.randint(3, V - 1, (1, 3 + n), generator=g)
            labels = ids.clone()
            labels[:, :3] = -100
            micro.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
        else:
            ids = torch.randint(3, V, (1, 8), generator=g)
            micro.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                          "labels": torch.randint(3, V, (1, n), generator=g)})

    def stack(key, fill):
        width = max(b[key].shape[1] for b in micro)
        return torch.cat([F.pad(b[key], (0, width - b[key].shape[1]), value=fill) for b in micro])

    full = {"input_ids": stack("input_ids", 1), "attention_mask": stack("attention_mask", 0),
            "labels": stack("labels", -100)}
    return micro, full


def gradient(model, losses):
    model.zero_grad()
    sum(losses).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("kind", ["bart", "gpt2"])
def test_gradient_accumulation_weighs_micro_batches_by_their_tokens(kind, monkeypatch):
    model = tiny(kind).train()
    # A deterministic noise that depends on the token only, so that an example gets the
    # same noise alone and in the full batch.
    monkeypatch.setattr(generation, "sample_noise", lambda e, kind, sigma: 0.05 * torch.sin(1000 * e.detach()))
    options = MethodOptions(method="r3f", noise_eps=1e-2)
    micro, full = accumulation_batches(kind)
    scored = 23  # 2 + 7 + 7 + 7
    full_loss, full_logs = generation_loss(model, full, options)
    expected = gradient(model, [full_loss])

    method = Generation(options)
    losses, logs = zip(*(method.loss(model, b, num_items_in_batch=torch.tensor(scored)) for b in micro))
    accumulated = gradient(model, losses)
    assert (accumulated - expected).abs().max().item() <= 1e-5
    assert sum(losses).item() == pytest.approx(full_loss.item(), abs=1e-6)
    assert full_logs["regularizer"].item() > 0
    # The logs stay means over each micro-batch's own tokens.
    alone, alone_logs = generation_loss(model, micro[0], options)
    assert logs[0]["task_loss"].item() == pytest.approx(alone_logs["task_loss"].item(), abs=1e-6)
    assert logs[0]["regularizer"].item() == pytest.approx(alone_logs["regularizer"].item(), abs=1e-7)

    # Per-micro-batch means divided by the number of accumulation steps weigh the
    # 2-token example like a 7-token one: a gradient error of tens of percent.
    per_batch_means = gradient(model, [generation_loss(model, b, options)[0] / len(micro) for b in micro])
    assert (per_batch_means - expected).norm() / expected.norm() > 0.1


def test_generation_noise_is_normal_unless_set(monkeypatch):
    drawn = []
    monkeypatch.setattr(generation, "sample_noise", lambda e, kind, sigma: drawn.append(kind) or torch.zeros_like(e))
    model, batch = tiny("bart").train(), batch_for("bart")
    for noise_type in (None, "uniform", "normal"):
        generation_loss(model, batch, MethodOptions(method="r3f", noise_type=noise_type))
    assert drawn == ["normal", "uniform", "normal"]


def test_default_options_give_normal_noise_for_generation_and_uniform_for_classification():
    options = MethodOptions()
    assert options.noise_type is None
    assert options.resolved_noise_type(generation=True) == "normal"
    assert options.resolved_noise_type(generation=False) == "uniform"
    assert MethodOptions(noise_type="uniform").resolved_noise_type(generation=True) == "uniform"


def test_the_trainer_accumulates_generation_gradients_by_tokens(tmp_path):
    """Through RXFTrainer: four micro-batches of 2, 7, 7, 7 scored tokens, accumulated into
    one SGD update, move the weights as the full batch's token mean does."""
    from rxf import RXFConfig, RXFTrainer

    micro, full = accumulation_batches("gpt2")
    model = tiny("gpt2").train()
    expected_model = tiny("gpt2").train()
    options = MethodOptions(method="std", label_smoothing=0.0)
    loss, _ = generation_loss(expected_model, full, options)
    expected = gradient(expected_model, [loss])

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(micro)

        def __getitem__(self, i):
            return {k: v[0] for k, v in micro[i].items()}

    config = RXFConfig(output_dir=str(tmp_path), method="std", label_smoothing=0.0, per_device_train_batch_size=1,
                       gradient_accumulation_steps=4, max_steps=1, learning_rate=1.0, lr_scheduler_type="constant",
                       warmup_ratio=0.0, max_grad_norm=0.0, weight_decay=0.0, save_strategy="no", report_to="none",
                       disable_tqdm=True, dataloader_pin_memory=False)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    trainer = RXFTrainer(model=model, args=config, train_dataset=Rows(), optimizers=(sgd, None),
                         data_collator=lambda rows: {k: torch.stack([r[k] for r in rows]) for k in rows[0]})
    trainer.train()
    moved = before - torch.cat([p.detach().flatten() for p in model.parameters()])
    assert (moved - expected).abs().max().item() <= 1e-5
