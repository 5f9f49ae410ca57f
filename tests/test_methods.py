"""The six methods through the functional API, on tiny random encoders."""

import copy

import pytest
import torch
from conftest import ARCHITECTURES, tiny_model, toy_batch
from transformers import AutoModelForSequenceClassification

import rxf.methods.r3f as r3f_module
from rxf import MethodOptions, apply_spectral_norm, freelb_step, r3f_loss, smart_loss, standard_loss
from rxf.divergence import symmetric_kl
from rxf.errors import OptionError
from rxf.methods.r4f import normalised_linears, refresh_spectral_norm
from rxf.methods.smart import EMATeacher, find_perturbation
from rxf.models import extra_pass_model


# The reference path of these formulas: the word embeddings looked up by hand and fed to
# the model as inputs_embeds — the same function as the model's own for BERT with right
# padding (tests/test_perturbation_path.py checks rxf's path against the model's own).
def embed(model, input_ids):
    return model.get_input_embeddings()(input_ids)


def forward_embeds(model, embeds, batch):
    return model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits


def grads(model, loss):
    return {n: g for n, g in zip(
        [n for n, p in model.named_parameters()],
        torch.autograd.grad(loss, list(model.parameters()), allow_unused=True, retain_graph=True),
    )}


# --- R3F -----------------------------------------------------------------------------

def test_r3f_with_zero_noise_equals_standard():
    model = tiny_model(dropout=0.0).train()
    batch = toy_batch()
    std, _ = standard_loss(model, batch)
    loss, logs = r3f_loss(model, batch, MethodOptions(method="r3f", noise_eps=0.0))
    assert logs["regularizer"].item() == 0.0
    assert torch.equal(loss, std)


def test_r3f_term_is_positive_with_noise_and_absent_in_eval():
    model = tiny_model(dropout=0.0)
    batch = toy_batch()
    options = MethodOptions(method="r3f", noise_eps=1e-2, noise_type="normal")
    _, logs = r3f_loss(model.train(), batch, options)
    assert logs["regularizer"].item() > 0
    _, logs = r3f_loss(model.eval(), batch, options)
    assert "regularizer" not in logs and logs["forward_passes"] == 1


@pytest.mark.parametrize("detach", [True, False])
def test_r3f_gradient_flows_through_both_passes(monkeypatch, detach):
    model = tiny_model(dropout=0.0).train()
    batch = toy_batch()
    noise = torch.randn(8, 10, 32) * 0.1
    monkeypatch.setattr(r3f_module, "sample_noise", lambda like, kind, sigma: noise)
    options = MethodOptions(method="r3f", r3f_lambda=1.0, r3f_detach_embeddings=detach)

    full, _ = r3f_loss(model, batch, options)
    task, _ = standard_loss(model, batch)
    g_full, g_task = grads(model, full), grads(model, task)
    reg_grad = {n: g_full[n] - g_task[n] for n in g_full}

    # The regulariser's gradient split by pass, by hand.
    e = embed(model, batch["input_ids"])
    clean = forward_embeds(model, e, batch)
    noised = forward_embeds(model, (e.detach() if detach else e) + noise, batch)
    via_clean = grads(model, symmetric_kl(clean, noised.detach()))
    via_noised = grads(model, symmetric_kl(clean.detach(), noised))

    table = "bert.embeddings.word_embeddings.weight"
    layer = "bert.encoder.layer.0.attention.self.query.weight"
    for name in (layer, "classifier.weight"):
        assert via_clean[name].abs().sum() > 0 and via_noised[name].abs().sum() > 0
        torch.testing.assert_close(reg_grad[name], via_clean[name] + via_noised[name], atol=1e-6, rtol=1e-4)
    if detach:  # the table hears only the clean pass
        assert via_noised[table] is None or via_noised[table].abs().sum() == 0
        torch.testing.assert_close(reg_grad[table], via_clean[table], atol=1e-6, rtol=1e-4)
    else:
        assert via_noised[table].abs().sum() > 0
        torch.testing.assert_close(reg_grad[table], via_clean[table] + via_noised[table], atol=1e-6, rtol=1e-4)


def test_r3f_regression_head_gets_squared_error_term():
    model = tiny_model(num_labels=1, dropout=0.0).train()
    _, logs = r3f_loss(model, toy_batch(regression=True), MethodOptions(noise_eps=1e-1, noise_type="normal"))
    assert logs["regularizer"].item() > 0


# --- R4F -----------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_r4f_normalises_head_and_checkpoint_loads_plainly(tmp_path, arch):
    model = tiny_model(arch)
    names = apply_spectral_norm(model, "all")
    assert names and len(normalised_linears(model)) == len(names)
    options = MethodOptions(method="r4f", noise_eps=1e-3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-2)
    model.train()
    for step in range(6):
        loss, _ = r3f_loss(model, toy_batch(seed=step), options)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    refresh_spectral_norm(model)
    model.eval()
    for name, linear in normalised_linears(model):
        assert torch.linalg.matrix_norm(linear.weight, ord=2).item() <= 1 + 1e-3, name

    model.save_pretrained(tmp_path)
    loaded, info = AutoModelForSequenceClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    batch = toy_batch(seed=99)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**inputs).logits, model(**inputs).logits, atol=1e-5, rtol=0)


def test_r4f_last_scope_normalises_only_last_linear():
    model = tiny_model("roberta")  # head: dense, out_proj
    assert apply_spectral_norm(model, "last") == ["classifier.out_proj"]


def test_r4f_state_dict_round_trip_into_normalised_model():
    model = tiny_model("roberta")
    apply_spectral_norm(model)
    twin = copy.deepcopy(model)
    state = model.state_dict()
    assert "classifier.out_proj.weight" in state
    assert not any("parametrizations" in key for key in state)
    result = twin.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_r4f_without_a_head_is_refused():
    from transformers import BertConfig, BertModel

    bare = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20))
    with pytest.raises(OptionError, match="r4f"):
        apply_spectral_norm(bare)


# --- SMART ---------------------------------------------------------------------------

@pytest.mark.parametrize("norm", ["inf", "l2"])
def test_smart_perturbation_stays_in_ball_and_off_padding(norm):
    model = tiny_model(dropout=0.0).train()
    batch = toy_batch()
    options = MethodOptions(method="smart", smart_steps=3, smart_step_size=1.0, smart_epsilon=0.05,
                            smart_noise_var=1.0, smart_norm=norm)
    e = embed(model, batch["input_ids"]).detach()
    clean = forward_embeds(model, e, batch).detach()
    delta = find_perturbation(model, clean, batch, options)
    if norm == "inf":
        assert delta.abs().max().item() <= 0.05 + 1e-7
    else:
        assert delta.flatten(1).norm(dim=1).max().item() <= 0.05 + 1e-6
    assert delta.abs().max().item() > 0.01  # it moved towards the boundary
    assert delta[batch["attention_mask"] == 0].abs().max().item() == 0.0


def test_smart_teacher_is_the_manual_ema():
    model = tiny_model()
    options = MethodOptions(method="smart", smart_beta=0.9, smart_beta_late=0.5, smart_beta_switch=0.5)
    teacher = EMATeacher(model, options)
    manual = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    for step in range(1, 5):
        loss, _ = smart_loss(model, toy_batch(seed=step), options, teacher)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        teacher.update(model, step, total_steps=4)
        beta = 0.9 if step < 2 else 0.5
        for n, p in model.named_parameters():
            manual[n] = beta * manual[n] + (1 - beta) * p.detach()
    for n, p in teacher.model.named_parameters():
        torch.testing.assert_close(p, manual[n], atol=1e-6, rtol=1e-6)
    assert not any(p.requires_grad for p in teacher.model.parameters())


# --- FreeLB --------------------------------------------------------------------------

def test_freelb_accumulates_the_mean_of_k_step_gradients():
    options = MethodOptions(method="freelb", freelb_steps=3, freelb_step_size=0.3, freelb_init_mag=0.5, freelb_max_norm=1.0)
    model = tiny_model(dropout=0.0).train()
    batch = toy_batch()
    torch.manual_seed(5)
    freelb_step(model, batch, options)
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    # A manual loop replaying the same perturbations.
    from rxf.methods.freelb import _ascend, initial_perturbation
    from rxf.methods.standard import task_loss
    from rxf.models import token_mask

    twin = tiny_model(dropout=0.0).train()
    twin.load_state_dict(model.state_dict())
    torch.manual_seed(5)
    e = embed(twin, batch["input_ids"])
    mask = token_mask(batch, e)
    delta = initial_perturbation(e, mask, options)
    step_grads = []
    for k in range(3):
        delta.requires_grad_(True)
        loss = task_loss(forward_embeds(twin, embed(twin, batch["input_ids"]) + delta, batch), batch["labels"])
        params = list(twin.parameters())
        g = torch.autograd.grad(loss, params + [delta], allow_unused=True)
        step_grads.append(dict(zip([n for n, _ in twin.named_parameters()], g[:-1])))
        delta = _ascend(delta.detach(), g[-1], mask, options)
    for name, grad in got.items():
        mean = sum(s[name] for s in step_grads if s[name] is not None) / 3
        torch.testing.assert_close(grad, mean, atol=1e-6, rtol=1e-5)


def test_freelb_never_perturbs_padding():
    model = tiny_model().train()
    # What reaches the model: the input of the embeddings' LayerNorm is e + delta + the
    # position and type embeddings; subtracting the clean sum leaves delta.
    seen = []
    model.bert.embeddings.LayerNorm.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    batch = toy_batch()
    options = MethodOptions(method="freelb", freelb_steps=3, freelb_init_mag=1.0, freelb_step_size=1.0)
    freelb_step(model, batch, options)
    seen.clear()
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    clean = seen.pop()
    freelb_step(model, batch, options)
    pad = batch["attention_mask"] == 0
    assert len(seen) == 3
    for perturbed in seen:
        assert torch.equal(perturbed[pad], clean[pad])
        assert (perturbed[~pad] - clean[~pad]).abs().max() > 0


def test_freelb_start_after_runs_plain_updates():
    model = tiny_model().train()
    _, logs = freelb_step(model, toy_batch(), MethodOptions(method="freelb", freelb_start_after=5), update=2)
    assert (logs["forward_passes"], logs["backward_passes"]) == (1, 1)


# --- counted passes --------------------------------------------------------------------

class PassCounter:
    """Counts model forward calls (a hook) and backward calls (patched autograd)."""

    def __init__(self, model, monkeypatch):
        self.forward = self.backward = 0
        model.register_forward_hook(lambda *a: setattr(self, "forward", self.forward + 1))
        real_backward, real_grad = torch.autograd.backward, torch.autograd.grad

        def backward(*a, **k):
            self.backward += 1
            return real_backward(*a, **k)

        def grad(*a, **k):
            self.backward += 1
            return real_grad(*a, **k)

        monkeypatch.setattr(torch.autograd, "backward", backward)
        monkeypatch.setattr(torch.autograd, "grad", grad)


@pytest.mark.parametrize(
    "method, extra, expected",
    [
        ("std", {}, (1, 1)),
        ("r3f", {}, (2, 1)),
        ("r4f", {}, (2, 1)),
        ("smart", {"smart_steps": 1, "smart_bregman": False}, (3, 2)),
        ("smart", {"smart_steps": 2, "smart_bregman": False}, (4, 3)),
        ("freelb", {"freelb_steps": 2}, (2, 2)),
        ("freelb", {"freelb_steps": 3}, (3, 3)),
    ],
)
def test_counted_passes_match_the_run(monkeypatch, method, extra, expected):
    model = tiny_model().train()
    if method == "r4f":
        apply_spectral_norm(model)
    options = MethodOptions(method=method, **extra)
    counter = PassCounter(model, monkeypatch)
    batch = toy_batch()
    if method == "freelb":
        _, logs = freelb_step(model, batch, options)
    else:
        fn = {"std": standard_loss, "r3f": r3f_loss, "r4f": r3f_loss, "smart": smart_loss}[method]
        loss, logs = fn(model, batch, options)
        loss.backward()
    assert (logs["forward_passes"], logs["backward_passes"]) == expected
    assert (counter.forward, counter.backward) == expected


# --- options ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"method": "adamw"}, "--method"),
        ({"noise_eps": -1e-5}, "--noise-eps"),
        ({"r3f_lambda": -0.5}, "--r3f-lambda"),
        ({"smart_steps": 0}, "--smart-steps"),
        ({"freelb_steps": 0}, "--freelb-steps"),
        ({"noise_type": "laplace"}, "--noise-type"),
    ],
)
def test_bad_options_name_the_option(kwargs, flag):
    with pytest.raises(OptionError, match=flag):
        MethodOptions(**kwargs).validate()


def test_r3f_concat_batch_computes_the_same_loss(monkeypatch):
    model = tiny_model(dropout=0.0).train()
    batch = toy_batch()
    noise = torch.randn(8, 10, 32) * 0.05
    monkeypatch.setattr(r3f_module, "sample_noise", lambda like, kind, sigma: noise)
    separate, logs = r3f_loss(model, batch, MethodOptions(method="r3f"))
    stacked, stacked_logs = r3f_loss(model, batch, MethodOptions(method="r3f", r3f_concat_batch=True))
    torch.testing.assert_close(stacked, separate, atol=1e-6, rtol=1e-5)
    assert stacked_logs["forward_passes"] == logs["forward_passes"] == 2
    g_sep, g_cat = grads(model, separate), grads(model, stacked)
    for name in g_sep:
        if g_sep[name] is not None:
            torch.testing.assert_close(g_cat[name], g_sep[name], atol=1e-6, rtol=1e-4)


def test_r3f_noised_no_grad_takes_gradient_through_the_clean_pass_only(monkeypatch):
    model = tiny_model(dropout=0.0).train()
    batch = toy_batch()
    noise = torch.randn(8, 10, 32) * 0.1
    monkeypatch.setattr(r3f_module, "sample_noise", lambda like, kind, sigma: noise)
    full, _ = r3f_loss(model, batch, MethodOptions(method="r3f", r3f_noised_no_grad=True))
    task, _ = standard_loss(model, batch)
    e = embed(model, batch["input_ids"])
    clean = forward_embeds(model, e, batch)
    noised = forward_embeds(model, e.detach() + noise, batch).detach()
    via_clean = grads(model, symmetric_kl(clean, noised))
    g_full, g_task = grads(model, full), grads(model, task)
    for name in ("bert.encoder.layer.0.attention.self.query.weight", "classifier.weight"):
        torch.testing.assert_close(g_full[name] - g_task[name], via_clean[name], atol=1e-6, rtol=1e-4)


def test_fsdp1_wrapped_model_is_refused_with_the_alternatives_named():
    """FSDP1 keeps flat, sharded parameters that rxf's lookup outside the forward cannot
    use; the wrapper is recognised by its class name anywhere in the wrapping chain."""

    class FullyShardedDataParallel(torch.nn.Module):  # stands in for torch's FSDP1 wrapper
        def __init__(self, module):
            super().__init__()
            self.module = module

    model = tiny_model("bert")
    assert extra_pass_model(model) is model
    with pytest.raises(OptionError, match="FSDP2"):
        extra_pass_model(FullyShardedDataParallel(model))


# --- One power iteration per batch for R4F; the eval-mode warning ------------------------

def test_r4f_passes_share_one_power_iteration():
    from rxf.methods import R4F

    model = tiny_model(dropout=0.0).train()
    method = R4F(MethodOptions(method="r4f", noise_eps=0.0))
    method.setup(model)
    sn = model.classifier.parametrizations.weight[0]
    weight = model.classifier.parametrizations.weight.original.detach().clone()
    v = sn._v.clone()
    # One step of torch's power iteration (u from v, then v from u), written out.
    u = torch.nn.functional.normalize(weight @ v, dim=0, eps=sn.eps)
    v = torch.nn.functional.normalize(weight.t() @ u, dim=0, eps=sn.eps)
    twice_u = torch.nn.functional.normalize(weight @ v, dim=0, eps=sn.eps)
    assert (twice_u - u).abs().max() > 1e-6  # one step and two are told apart
    loss, logs = method.loss(model, toy_batch())
    torch.testing.assert_close(sn._u, u, atol=1e-7, rtol=0)
    torch.testing.assert_close(sn._v, v, atol=1e-7, rtol=0)
    # Both passes saw the same head: with no noise and no dropout they agree exactly.
    assert logs["regularizer"].item() < 1e-12


def test_a_regulariser_on_a_model_in_eval_mode_warns_once(monkeypatch):
    import rxf.models

    monkeypatch.setattr(rxf.models, "_warned_eval_mode", set())
    model = tiny_model().eval()  # as from_pretrained returns it
    with pytest.warns(UserWarning, match=r"model\.train\(\)"):
        _, logs = r3f_loss(model, toy_batch(), MethodOptions(method="r3f"))
    assert "regularizer" not in logs
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r3f_loss(model, toy_batch(), MethodOptions(method="r3f"))  # once only
        with torch.no_grad():
            smart_loss(model, toy_batch(), MethodOptions(method="smart"))  # evaluation: no warning
