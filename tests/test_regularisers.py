"""The regularisers that followed R3F — R-Drop, NEFTune, NoisyTune, HyPe, Child-Tuning and
Mixout — and their composition with the other losses, on tiny random models. Each golden
test writes its paper's formula out independently of rxf's code."""

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model, toy_batch
from transformers import AutoModelForSequenceClassification, BartConfig, BartForConditionalGeneration, GPT2Config, GPT2LMHeadModel

import rxf.methods.mixout as mixout_module
from rxf.errors import OptionError
from rxf.methods import (
    ChildTuning, Composite, Generation, GenerationComposite, Mixout, MethodOptions, NoisyTune, R3F, RDrop,
    RDropGeneration, build_method, r3f_loss, rdrop_loss, transformer_layers,
)
from rxf.methods.mixout import mixout_weight
from rxf.methods.neftune import neftune_scale
from rxf.methods.standard import task_loss

REGULARISERS = ("rdrop", "neftune", "noisytune", "hype", "childtune", "mixout")


def inputs_of(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


def kl(p_logits, q_logits):
    """KL(P || Q) per row, from the definition."""
    p, q = p_logits.float().softmax(-1), q_logits.float().softmax(-1)
    return (p * (p.log() - q.log())).sum(-1)


def built(method, model, batches=(), **options):
    """The method's life cycle, set up (and prepared with ``batches``) on ``model``."""
    lifecycle = build_method(MethodOptions(method=method, **options), model)
    lifecycle.setup(model)
    if batches and hasattr(lifecycle, "prepare"):  # a Composite's modifiers (Child-Tuning-D) may use data
        lifecycle.prepare(model, list(batches))
    return lifecycle


# --- R-Drop ----------------------------------------------------------------------------

@pytest.mark.parametrize("concat", [False, True])
def test_rdrop_is_eq3_summed_task_losses_plus_half_symmetric_kl(concat):
    model = tiny_model(dropout=0.1).train()
    batch = toy_batch()
    torch.manual_seed(3)
    loss, logs = rdrop_loss(model, batch, MethodOptions(method="rdrop", rdrop_alpha=0.7, rdrop_concat_batch=concat))

    torch.manual_seed(3)  # the same dropout masks, drawn in the same order
    if concat:
        doubled = {k: torch.cat([v, v]) for k, v in inputs_of(batch).items()}
        p1, p2 = model(**doubled).logits.chunk(2)
    else:
        p1, p2 = model(**inputs_of(batch)).logits, model(**inputs_of(batch)).logits
    y = batch["labels"]
    ce1 = -p1.log_softmax(-1).gather(1, y[:, None]).squeeze(1)
    ce2 = -p2.log_softmax(-1).gather(1, y[:, None]).squeeze(1)
    per_example = ce1 + ce2 + 0.7 * 0.5 * (kl(p1, p2) + kl(p2, p1))
    torch.testing.assert_close(loss, per_example.mean(), atol=1e-6, rtol=1e-5)
    assert logs["regularizer"] > 0  # dropout made the two passes differ
    torch.testing.assert_close(logs["task_loss"], (ce1 + ce2).mean() / 2, atol=1e-6, rtol=1e-5)


def test_rdrop_regression_uses_the_squared_error_between_the_passes():
    model = tiny_model(num_labels=1, dropout=0.1).train()
    batch = toy_batch(regression=True)
    torch.manual_seed(4)
    loss, _ = rdrop_loss(model, batch, MethodOptions(method="rdrop", rdrop_alpha=2.0, rdrop_concat_batch=False))
    torch.manual_seed(4)
    p1, p2 = (model(**inputs_of(batch)).logits.squeeze(-1) for _ in range(2))
    y = batch["labels"]
    expected = ((p1 - y) ** 2).mean() + ((p2 - y) ** 2).mean() + 2.0 * ((p1 - p2) ** 2).mean()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


def tiny_gpt2(dropout=0.1):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_positions=32,
                        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    return GPT2LMHeadModel(config)


def lm_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100  # the prompt carries no loss
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_rdrop_for_a_decoder_only_lm_masks_prompt_and_padding():
    model = tiny_gpt2().train()
    batch = lm_batch()
    method = build_method(MethodOptions(method="rdrop", rdrop_alpha=0.5, rdrop_concat_batch=False), model)
    assert isinstance(method, RDropGeneration) and isinstance(method, Generation)
    torch.manual_seed(5)
    loss, logs = method.loss(model, batch)

    torch.manual_seed(5)
    l1, l2 = (model(**inputs_of(batch)).logits[:, :-1] for _ in range(2))
    target = batch["labels"][:, 1:]
    scored = target != -100

    def smoothed(logits, eps=0.1):
        logp = logits.log_softmax(-1)
        nll = -logp.gather(-1, target.clamp_min(0)[..., None]).squeeze(-1)
        return ((1 - eps) * nll - eps * logp.mean(-1))[scored].mean()

    kls = (kl(l1, l2) + kl(l2, l1))[scored].mean()
    expected = smoothed(l1) + smoothed(l2) + 0.5 * 0.5 * kls
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    assert (logs["forward_passes"], logs["backward_passes"]) == (2, 1)


# --- NEFTune ----------------------------------------------------------------------------

def test_neftune_scale_uses_each_sequences_real_length():
    model = tiny_model(dropout=0.0).train()
    batch = toy_batch()  # its second half is padded to shorter lengths
    seen = []
    # The LayerNorm of BERT's embeddings sees e (+ noise) + position + type embeddings.
    model.bert.embeddings.LayerNorm.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        model(**inputs_of(batch))
    clean = seen.pop()
    torch.manual_seed(0)
    built("neftune", model, neftune_alpha=5.0).loss(model, batch)
    noise = seen.pop() - clean
    mask = batch["attention_mask"].bool()
    width, padded_length = noise.shape[-1], mask.shape[1]
    for row in range(mask.shape[0]):
        length = int(mask[row].sum())
        bound = 5.0 / math.sqrt(length * width)  # alpha / sqrt(L_real * d)
        assert noise[row][~mask[row]].abs().max() == 0 if length < padded_length else True
        largest = noise[row][mask[row]].abs().max().item()
        assert 0.9 * bound < largest <= bound * (1 + 1e-4)
        if length < 0.8 * padded_length:  # the padded length's scale would be visibly smaller
            assert largest > 1.05 * 5.0 / math.sqrt(padded_length * width)


def test_neftune_scale_splits_packed_rows_at_position_zero():
    batch = {
        "input_ids": torch.zeros(2, 8, dtype=torch.long),
        "attention_mask": torch.tensor([[1] * 8, [1] * 5 + [0] * 3]),
        "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 2, 3, 4, 0, 0, 0]]),
    }
    embeds = torch.zeros(2, 8, 16)
    lengths = torch.tensor([[3, 3, 3, 2, 2, 3, 3, 3], [5, 5, 5, 5, 5, 0, 0, 0]], dtype=torch.float)
    expected = torch.where(lengths > 0, 10.0 / (lengths * 16).clamp_min(1).sqrt(), torch.zeros(()))
    torch.testing.assert_close(neftune_scale(batch, embeds, 10.0).squeeze(-1), expected)
    unpacked = {k: v for k, v in batch.items() if k != "position_ids"}
    torch.testing.assert_close(neftune_scale(unpacked, embeds, 10.0)[0, :, 0], torch.full((8,), 10.0 / math.sqrt(8 * 16)))
    # R3F and R-Drop may run the batch stacked with itself: the scale is tiled.
    torch.testing.assert_close(neftune_scale(batch, torch.zeros(4, 8, 16), 10.0)[2:], neftune_scale(batch, embeds, 10.0))


# --- NoisyTune --------------------------------------------------------------------------

def test_noisytune_adds_uniform_noise_scaled_by_each_tensors_std():
    model = tiny_model()
    model.register_parameter("scalar", torch.nn.Parameter(torch.ones(1)))  # std undefined: skipped
    model.classifier.bias.requires_grad_(False)  # frozen: never perturbed
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(11)
    method = built("noisytune", model, noisytune_lambda=0.15)
    method.setup(model)  # a second set-up adds nothing
    torch.manual_seed(11)
    for name, param in model.named_parameters():
        w = before[name]
        if not param.requires_grad or w.numel() <= 1:
            assert torch.equal(param.detach(), w), name
            continue
        expected = w + (torch.rand(w.shape) - 0.5) * 0.15 * w.std()  # W + U(-l/2, l/2) * std(W)
        torch.testing.assert_close(param.detach(), expected, atol=1e-7, rtol=1e-6)
        assert (param.detach() - w).abs().max() <= 0.075 * w.std() + 1e-7
    assert isinstance(method.modifiers[0], NoisyTune) and "bert.embeddings.word_embeddings.weight" in method.modifiers[0].perturbed


def test_noisytune_is_deterministic_under_the_seed():
    def weights(seed):
        model = tiny_model()
        torch.manual_seed(seed)
        built("noisytune", model)
        return model.bert.encoder.layer[0].attention.self.query.weight.detach()

    assert torch.equal(weights(1), weights(1)) and not torch.equal(weights(1), weights(2))


# --- HyPe -------------------------------------------------------------------------------

@pytest.mark.parametrize("noise_type", ["uniform", "normal"])
def test_hype_noise_reaches_every_layer_input_only_in_training(noise_type):
    model = tiny_model(dropout=0.0).train()
    batch = toy_batch()
    layers = model.bert.encoder.layer
    entering, leaving, embedded = {}, {}, []
    model.bert.embeddings.register_forward_hook(lambda m, a, out: embedded.append(out.detach()))
    for i, layer in enumerate(layers):
        # The query projection sees the hidden states the layer was given (after HyPe's hook).
        layer.attention.self.query.register_forward_pre_hook(lambda m, a, i=i: entering.__setitem__(i, a[0].detach()))
        layer.register_forward_hook(
            lambda m, a, out, i=i: leaving.__setitem__(i, (out[0] if isinstance(out, tuple) else out).detach()))
    eps = 1e-3
    method = built("hype", model, hype_eps=eps, hype_noise_type=noise_type)
    torch.manual_seed(0)
    method.loss(model, batch)
    previous = [embedded[-1]] + [leaving[i] for i in range(len(layers) - 1)]
    for i in range(len(layers)):
        noise = entering[i] - previous[i]
        assert noise.abs().max() > 0, f"layer {i} got no noise"
        if noise_type == "uniform":
            assert noise.abs().max() <= eps * (1 + 1e-3) + 1e-6
        else:
            assert 0.8 * eps < noise.std() < 1.2 * eps
        assert noise.mean().abs() < 0.1 * eps
    model.eval()
    method.loss(model, batch)
    previous = [embedded[-1]] + [leaving[i] for i in range(len(layers) - 1)]
    assert all(torch.equal(entering[i], previous[i]) for i in range(len(layers)))


def test_hype_finds_the_layers_of_encoders_decoders_and_refuses_models_without():
    assert [n for n, _ in transformer_layers(tiny_model())] == ["bert.encoder.layer.0", "bert.encoder.layer.1"]
    assert [n for n, _ in transformer_layers(tiny_gpt2())] == ["transformer.h.0", "transformer.h.1"]
    bart = BartForConditionalGeneration(BartConfig(vocab_size=50, d_model=16, encoder_layers=2, decoder_layers=1,
                                                   encoder_attention_heads=2, decoder_attention_heads=2,
                                                   encoder_ffn_dim=20, decoder_ffn_dim=20, max_position_embeddings=32))
    assert [n for n, _ in transformer_layers(bart)] == [
        "model.encoder.layers.0", "model.encoder.layers.1", "model.decoder.layers.0"]
    with pytest.raises(OptionError, match="hype"):
        built("hype", torch.nn.Sequential(torch.nn.Linear(4, 4)))


# --- Child-Tuning -----------------------------------------------------------------------

def reference_fisher(model, batches):
    """1/N sum over batches of the squared batch gradient of the cross entropy, for the
    parameters of the encoder layers."""
    params = {n: p for n, p in model.named_parameters() if ".encoder.layer." in n}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    for batch in batches:
        loss = F.cross_entropy(model(**inputs_of(batch)).logits, batch["labels"])
        for (n, _), g in zip(params.items(), torch.autograd.grad(loss, list(params.values()))):
            fisher[n] += g ** 2 / len(batches)
    return fisher


def test_childtune_d_keeps_the_top_fisher_fraction_and_zeroes_the_rest():
    model = tiny_model(dropout=0.0).train()
    twin = copy.deepcopy(model)
    batches = [toy_batch(seed=s) for s in (1, 2)]
    fisher = reference_fisher(copy.deepcopy(model), batches)
    flat = torch.cat([f.flatten() for f in fisher.values()]).sort(descending=True).values
    threshold = flat[round(0.3 * flat.numel()) - 1]

    method = built("childtune", model, batches, childtune_reserve=0.3)
    child = method.modifiers[0]
    assert isinstance(child, ChildTuning) and set(child.mask) == set(fisher) and child.fisher_batches == 2
    for name, mask in child.mask.items():
        assert torch.equal(mask, fisher[name] >= threshold), name
    kept = sum(int(m.sum()) for m in child.mask.values()) / flat.numel()
    assert abs(kept - 0.3) < 1e-3

    batch = toy_batch(seed=7)
    method.step(model, batch)
    F.cross_entropy(twin(**inputs_of(batch)).logits, batch["labels"]).backward()
    plain = dict(twin.named_parameters())
    for name, param in model.named_parameters():
        if name in child.mask:
            mask = child.mask[name]
            assert (param.grad[~mask] == 0).all(), name  # outside the child network: exactly zero
            assert torch.equal(param.grad[mask], plain[name].grad[mask]), name  # inside: unchanged
        else:  # embeddings and the head always train in full
            assert torch.equal(param.grad, plain[name].grad), name


def test_childtune_mask_round_trips_through_a_checkpoint(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_model(dropout=0.0).train()
    twin = copy.deepcopy(model)
    method = built("childtune", model, [toy_batch(seed=1)])
    state = method.state_dict(model)
    assert state and all(k.startswith("childtune.") for k in state)
    save_file(state, tmp_path / "state.safetensors")
    resumed = built("childtune", twin)
    resumed.load_state_dict(twin, load_file(tmp_path / "state.safetensors"))
    resumed.prepare(twin, [toy_batch(seed=99)])  # the loaded mask is kept, not recomputed
    assert resumed.modifiers[0].fisher_batches == 0
    for name, mask in method.modifiers[0].mask.items():
        assert torch.equal(resumed.modifiers[0].mask[name], mask)


def test_childtune_without_prepare_warns_and_uses_the_first_batch():
    model = tiny_model().train()
    method = built("childtune", model)
    with pytest.warns(UserWarning, match="prepare"):
        method.step(model, toy_batch())
    assert method.modifiers[0].fisher_batches == 1


def test_childtune_f_draws_one_bernoulli_mask_per_update_rescaled():
    model = tiny_model(dropout=0.0).train()
    twin = copy.deepcopy(model)
    batch = toy_batch()
    F.cross_entropy(twin(**inputs_of(batch)).logits, batch["labels"]).backward()
    plain = {n: p.grad for n, p in twin.named_parameters()}
    method = built("childtune", model, childtune_mode="f", childtune_reserve=0.5)
    torch.manual_seed(0)
    method.step(model, batch)
    first = {n: p.grad.clone() for n, p in model.named_parameters()}
    kept = total = 0
    for name, grad in first.items():
        on = grad != 0
        assert torch.equal(grad[on], plain[name][on] / 0.5), name  # kept gradients scaled by 1/p
        nonzero = plain[name] != 0  # (unused embedding rows have no gradient to keep)
        kept, total = kept + int(on[nonzero].sum()), total + int(nonzero.sum())
    assert abs(kept / total - 0.5) < 0.02
    method.step(model, batch)  # the same update (gradient accumulation): the same mask
    layer = "bert.encoder.layer.0.intermediate.dense.weight"
    grad = dict(model.named_parameters())[layer].grad
    assert torch.equal(grad, 2 * first[layer])
    model.zero_grad()
    method.after_step(model, 1, 2)
    method.step(model, batch)
    assert not torch.equal(dict(model.named_parameters())[layer].grad != 0, first[layer] != 0)


# --- Mixout -----------------------------------------------------------------------------

def test_mixout_weight_has_expectation_w_exactly_and_empirically():
    torch.manual_seed(0)
    w, u, p = torch.randn(4, 6), torch.randn(4, 6), 0.7
    paper = lambda m: (m * w + (1 - m) * u - p * u) / (1 - p)  # Lee et al. 2020
    for mask in (torch.ones(1, 6), torch.zeros(1, 6), (torch.arange(6) % 2).float()[None]):
        torch.testing.assert_close(mixout_weight(w, u, p, mask), paper(mask.expand(4, 6)))
    # E over the mask, M = 1 with probability 1 - p: exactly w.
    torch.testing.assert_close((1 - p) * paper(torch.ones(4, 6)) + p * paper(torch.zeros(4, 6)), w)
    draws = torch.stack([mixout_weight(w, u, p) for _ in range(20000)])
    spread = (w - u).abs() * math.sqrt(p * (1 - p)) / (1 - p) / math.sqrt(len(draws))
    assert ((draws.mean(0) - w).abs() <= 5 * spread + 1e-6).all()
    # One mask per input neuron: a column is all pre-trained or all mixed.
    one = mixout_weight(w, u, p)
    kept = u + (w - u) / (1 - p)
    assert all(torch.equal(one[:, j], u[:, j]) or torch.allclose(one[:, j], kept[:, j]) for j in range(6))


def test_mixout_forward_and_gradient_match_the_formula_with_a_fixed_mask(monkeypatch):
    model = tiny_model(dropout=0.1).train()
    p = 0.6
    method = built("mixout", model, mixout_p=p)
    assert isinstance(method.modifiers[0], Mixout)
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))  # mixout replaces dropout
    pretrained = {n: w.detach().clone() for n, w in model.named_parameters()}
    with torch.no_grad():  # as if trained for a while: w != u
        for w in model.parameters():
            w.add_(0.05 * torch.randn_like(w))
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    g = torch.Generator().manual_seed(1)
    masks = {m.weight.data_ptr(): torch.bernoulli(torch.full((1, m.weight.shape[1]), 1 - p), generator=g)
             for m in linears.values()}
    monkeypatch.setattr(mixout_module, "mixout_mask", lambda weight, prob: masks[weight.data_ptr()])
    keys = set(model.state_dict())
    batch = toy_batch()
    loss, _ = method.loss(model, batch)
    assert set(model.state_dict()) == keys  # plain keys, parameters back in place

    mixed = {}
    for name, module in linears.items():
        w, u, m = module.weight.detach(), pretrained[f"{name}.weight"], masks[module.weight.data_ptr()]
        mixed[f"{name}.weight"] = ((m * w + (1 - m) * u - p * u) / (1 - p)).requires_grad_(True)
    logits = torch.func.functional_call(model, mixed, args=(), kwargs=inputs_of(batch)).logits
    expected = F.cross_entropy(logits, batch["labels"])
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)
    loss.backward()
    expected.backward()
    for name, module in linears.items():
        m = masks[module.weight.data_ptr()]
        torch.testing.assert_close(module.weight.grad, mixed[f"{name}.weight"].grad * m / (1 - p), atol=1e-7, rtol=1e-5)


def test_mixout_is_the_identity_in_eval_and_checkpoints_load_plainly(tmp_path):
    model = tiny_model().train()
    method = built("mixout", model)
    with torch.no_grad():
        for w in model.parameters():
            w.add_(0.05 * torch.randn_like(w))
    model.eval()
    batch = toy_batch()
    with torch.no_grad():
        plain = model(**inputs_of(batch)).logits
        loss, logs = method.loss(model, batch)
    assert torch.equal(loss, task_loss(plain, batch["labels"])) and logs["forward_passes"] == 1
    model.save_pretrained(tmp_path)
    loaded, info = AutoModelForSequenceClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**inputs_of(batch)).logits, plain, atol=1e-6, rtol=0)


def test_mixout_run_continues_identically_from_its_state(tmp_path):
    from safetensors.torch import load_file, save_file

    def train(model, method, optimizer, seeds):
        for seed in seeds:
            torch.manual_seed(seed)
            optimizer.zero_grad()
            method.step(model, toy_batch(seed=seed))
            optimizer.step()
            method.after_step(model, seed + 1, 4)

    model = tiny_model().train()
    method = built("mixout", model, mixout_p=0.5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, method, optimizer, [0, 1])
    weights = copy.deepcopy(model.state_dict())
    moments = copy.deepcopy(optimizer.state_dict())
    save_file(method.state_dict(model), tmp_path / "mixout.safetensors")
    train(model, method, optimizer, [2, 3])

    def resumed(with_state):
        twin = tiny_model(seed=5).train()
        twin.load_state_dict(weights)
        again = built("mixout", twin, mixout_p=0.5)  # set-up alone would take the trained weights as u
        if with_state:
            again.load_state_dict(twin, load_file(tmp_path / "mixout.safetensors"))
        opt = torch.optim.AdamW(twin.parameters(), lr=1e-2)
        opt.load_state_dict(moments)
        train(twin, again, opt, [2, 3])
        return twin

    final = dict(model.named_parameters())
    for name, param in resumed(True).named_parameters():
        assert torch.equal(param, final[name]), name
    assert any(not torch.equal(p, final[n]) for n, p in resumed(False).named_parameters())


# --- every method: passes, eval, composition --------------------------------------------

class PassCounter:
    """Model forward calls (a hook) and backward calls (patched autograd)."""

    def __init__(self, model, monkeypatch):
        self.forward = self.backward = 0
        model.register_forward_hook(lambda *a: setattr(self, "forward", self.forward + 1))
        real = torch.autograd.backward

        def backward(*a, **k):
            self.backward += 1
            return real(*a, **k)

        monkeypatch.setattr(torch.autograd, "backward", backward)


@pytest.mark.parametrize("method", REGULARISERS)
def test_counted_passes_match_the_run_and_eval_is_the_plain_forward(monkeypatch, method):
    model = tiny_model().train()
    lifecycle = built(method, model, [toy_batch(seed=1)], rdrop_concat_batch=False)
    counter = PassCounter(model, monkeypatch)
    _, logs = lifecycle.step(model, toy_batch())
    expected = (2, 1) if method == "rdrop" else (1, 1)
    assert (logs["forward_passes"], logs["backward_passes"]) == (counter.forward, counter.backward) == expected
    model.eval()
    batch = toy_batch(seed=3)
    with torch.no_grad():
        plain = model(**inputs_of(batch)).logits
        loss, logs = lifecycle.loss(model, batch)
    assert torch.equal(loss, task_loss(plain, batch["labels"])) and logs["forward_passes"] == 1


def test_composition_runs_the_main_loss_inside_the_modifiers():
    options = MethodOptions(method="r3f", extras="hype, noisytune", noisytune_lambda=0.1, hype_eps=0.0)
    model = tiny_model(dropout=0.0).train()
    twin = copy.deepcopy(model)
    method = build_method(options, model)
    assert isinstance(method, Composite) and isinstance(method.main, R3F)
    assert [m.name for m in method.modifiers] == ["noisytune", "hype"]  # set-up order, whatever the order given
    assert options.method_label() == "r3f+noisytune+hype"
    torch.manual_seed(0)
    method.setup(model)
    torch.manual_seed(1)
    loss, logs = method.loss(model, toy_batch())
    # By hand: NoisyTune's perturbation, then R3F's loss (HyPe with eps 0 adds nothing).
    from rxf.methods.noisytune import noisy_tune

    torch.manual_seed(0)
    noisy_tune(twin, 0.1)
    torch.manual_seed(1)
    expected, _ = r3f_loss(twin, toy_batch(), options)
    assert torch.equal(loss, expected) and logs["forward_passes"] == 2


def test_mixout_with_rdrop_draws_one_mask_per_pass():
    """A weight mask is shared by the rows of a pass, so with Mixout R-Drop runs two passes
    (a stacked 2B batch would compare two identical predictions: dropout is off)."""
    model = tiny_model().train()
    method = built("rdrop", model, extras="mixout")
    assert method.main.options.rdrop_concat_batch is False
    with torch.no_grad():  # as if trained for a while (at w = u every mask mixes to u)
        for w in model.parameters():
            w.add_(0.05 * torch.randn_like(w))
    _, logs = method.loss(model, toy_batch())
    assert logs["regularizer"] > 0


def test_composite_state_keeps_the_main_keys_and_prefixes_the_modifiers():
    model = tiny_model().train()
    method = built("smart", model, extras="mixout,childtune,neftune,hype", batches=[toy_batch(seed=1)])
    method.step(model, toy_batch())  # SMART's teacher is made on the first update
    state = method.state_dict(model)
    prefixes = {key.split(".")[0] for key in state}
    assert prefixes == {"teacher", "mixout", "childtune"} and method.teacher is not None
    # The teacher was copied before the modifiers' hooks went on: it has none of them.
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in method.teacher.model.modules())
    twin = copy.deepcopy(model)
    again = built("smart", twin, extras="mixout,childtune,neftune,hype")
    again.load_state_dict(twin, state)
    assert all(torch.equal(again.state_dict(twin)[k], v) for k, v in state.items())


def test_generation_models_compose_too():
    model = tiny_gpt2().train()
    method = built("neftune", model, extras="hype")
    assert isinstance(method, GenerationComposite) and isinstance(method, Generation)
    loss, logs = method.loss(model, lm_batch(), num_items_in_batch=torch.tensor(10))
    assert torch.isfinite(loss) and logs["forward_passes"] == 1
    assert isinstance(build_method(MethodOptions(method="rdrop"), tiny_model()), RDrop)
    with pytest.raises(OptionError, match="smart"):
        build_method(MethodOptions(method="smart", extras="hype"), model)


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"extras": "dropout"}, "--extras"),
        ({"extras": "r3f"}, "--extras"),
        ({"rdrop_alpha": -1.0}, "--rdrop-alpha"),
        ({"neftune_alpha": -5.0}, "--neftune-alpha"),
        ({"childtune_reserve": 0.0}, "--childtune-reserve"),
        ({"childtune_mode": "e"}, "--childtune-mode"),
        ({"mixout_p": 1.0}, "--mixout-p"),
        ({"hype_noise_type": "laplace"}, "--hype-noise-type"),
    ],
)
def test_bad_options_name_the_option(kwargs, flag):
    with pytest.raises(OptionError, match=flag):
        MethodOptions(**kwargs).validate()


# --- through RXFTrainer and the command line ---------------------------------------------

class ToyDataset(torch.utils.data.Dataset):
    def __init__(self, n=16):
        batch = toy_batch(batch_size=n)
        self.rows = [{k: v[i] for k, v in batch.items()} for i in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


@pytest.mark.parametrize("method", REGULARISERS)
def test_rxf_trainer_runs_each_regulariser_and_checkpoints_its_state(tmp_path, method):
    from safetensors.torch import load_file
    from transformers import default_data_collator

    from rxf import RXFConfig, RXFTrainer
    from rxf.trainer import METHOD_STATE

    config = RXFConfig(
        output_dir=str(tmp_path), method=method, per_device_train_batch_size=8, max_steps=2, learning_rate=2e-3,
        logging_steps=1, save_strategy="steps", save_steps=2, report_to="none", disable_tqdm=True,
        neftune_alpha=0.05,
    )
    trainer = RXFTrainer(model=tiny_model(), args=config, train_dataset=ToyDataset(), data_collator=default_data_collator)
    # RXFTrainer calls prepare() with its training batches: Child-Tuning-D measures its
    # Fisher information there and never falls back to a single batch.
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*prepare.*")
        trainer.train()
    logs = [e for e in trainer.state.log_history if "task_loss" in e]
    assert len(logs) == 2 and all(math.isfinite(e["loss"]) for e in logs)
    assert (trainer.passes["forward"], trainer.passes["backward"]) == ((2, 1) if method == "rdrop" else (1, 1))
    state = load_file(tmp_path / "checkpoint-2" / METHOD_STATE)
    if method in ("childtune", "mixout"):
        assert any(k.startswith(f"{method}.") for k in state)


def test_compare_runs_the_regularisers_from_the_command_line(tiny_checkpoint, tmp_path, capsys):
    from rxf.cli import build_parser, main
    from rxf.demo import DEMO_DATA

    help_text = build_parser()._subparsers._group_actions[0].choices["finetune"].format_help()
    for flag in ("--extras", "--rdrop-alpha", "--neftune-alpha", "--noisytune-lambda", "--hype-eps",
                 "--childtune-reserve", "--childtune-fisher-batches", "--mixout-p", "--no-mixout-keep-dropout"):
        assert flag in help_text
    rows = [line.split("\t") for line in (DEMO_DATA / "train.tsv").read_text().splitlines()[1:]]
    (tmp_path / "SST-2").mkdir()
    for split, part in (("train", rows[:32]), ("dev", rows[64:80])):
        (tmp_path / "SST-2" / f"{split}.tsv").write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in part))
    methods = "std,r3f," + ",".join(REGULARISERS)
    out = tmp_path / "cmp"
    code = main(["compare", "--tasks", "sst2", "--methods", methods, "--seeds", "1", "--model", str(tiny_checkpoint),
                 "--data-dir", str(tmp_path), "--output-dir", str(out), "--batch-size", "16", "--max-length", "32",
                 "--learning-rate", "1e-3", "--max-steps", "2", "--no-progress"])
    assert code == 0
    assert sorted(p.parent.parent.name for p in out.glob("runs/sst2/*/seed1/results.json")) == sorted(methods.split(","))
    report = (out / "report.md").read_text()
    assert all(f"| {m} |" in report for m in methods.split(","))
