"""The path a perturbation takes into the model: a forward hook on the word-embedding
module (``rxf.models.perturbed_embeddings``), with the model called on its ordinary inputs.

What is checked, on tiny random models with dropout off:
(a) STD through rxf gives the model's own logits and loss;
(b) R3F with zero noise gives noised logits equal to the clean ones and STD's loss; this
    is what the old ``inputs_embeds`` path got wrong for PEGASUS/Marian (their encoders
    scale only looked-up ids by sqrt(d)) and for left-padded RoBERTa (its position ids come
    from the ids), and each such case is shown to be discriminative;
(c) positive noise reaches PEGASUS/Marian, on the encoder or the decoder as asked;
(d) a pass that never calls the embedding module raises;
(e) SMART's and FreeLB's perturbations reach BERT/RoBERTa and never touch padding.
"""

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    MarianConfig,
    MarianMTModel,
    PegasusConfig,
    PegasusForConditionalGeneration,
    RobertaConfig,
    RobertaForSequenceClassification,
)

import rxf.methods.generation as generation
import rxf.methods.r3f as r3f
from rxf import MethodOptions
from rxf.methods.freelb import freelb_step
from rxf.methods.generation import generation_loss
from rxf.methods.r3f import r3f_loss
from rxf.methods.smart import smart_loss
from rxf.methods.standard import standard_loss
from rxf.models import embedding_module, logits_of, perturbed_embeddings, with_decoder_inputs

V, D = 60, 32
NO_DROPOUT = dict(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
SEQ2SEQ = dict(vocab_size=V, d_model=D, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
               decoder_attention_heads=2, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=64,
               **NO_DROPOUT)
ENCODER = dict(vocab_size=V, hidden_size=D, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
               max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)


# --- tiny models and their batches ------------------------------------------------------
def build(kind: str):
    """A tiny random model of ``kind`` with dropout off, in training mode (the methods
    run their perturbed passes only there), and the id of its padding token."""
    torch.manual_seed(0)
    if kind == "bert":
        return BertForSequenceClassification(BertConfig(pad_token_id=0, **ENCODER)).train(), 0
    if kind.startswith("roberta"):
        return RobertaForSequenceClassification(RobertaConfig(pad_token_id=1, **ENCODER)).train(), 1
    if kind == "bart":
        config = BartConfig(pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, **SEQ2SEQ)
        return BartForConditionalGeneration(config).train(), 1
    if kind in ("pegasus", "marian"):
        # scale_embedding: the encoder multiplies looked-up ids (only) by sqrt(d). The
        # tables get std d^-1/2, as in the real models, so the scale matters.
        config_class, model_class = {"pegasus": (PegasusConfig, PegasusForConditionalGeneration),
                                     "marian": (MarianConfig, MarianMTModel)}[kind]
        config = config_class(pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, scale_embedding=True,
                              init_std=D ** -0.5, **SEQ2SEQ)
        return model_class(config).train(), 0
    config = GPT2Config(vocab_size=V, n_embd=D, n_layer=1, n_head=2, n_positions=64, bos_token_id=V - 1,
                        eos_token_id=V - 1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).train(), V - 1


def classification_batch(pad: int, left: bool = False):
    """(4, 9) ids; rows 2 and 3 padded (at the start when ``left``, else at the end)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (4, 9), generator=g)
    mask = torch.ones_like(ids)
    for row, keep in ((2, 6), (3, 4)):
        padded = slice(0, 9 - keep) if left else slice(keep, 9)
        mask[row, padded] = 0
        ids[row, padded] = pad
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 2, 1])}


def generation_batch(kind: str, pad: int):
    """Seq2seq: (3, 9) sources (row 2 padded) and (3, 6) labels (rows 1, 2 with -100 at
    the end). Decoder-only: (3, 9) inputs, labels with the prompt and padding at -100."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, V - 1, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    ids[2, 6:] = pad
    if kind == "gpt2":
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :3] = -100
    else:
        labels = torch.randint(3, V - 1, (3, 6), generator=g)
        labels[1, 4:] = labels[2, 2:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


CLASSIFIERS = {"bert": {}, "roberta-right": {}, "roberta-left": {"left": True}}
GENERATORS = ["bart", "pegasus", "marian", "gpt2"]


def setup_classifier(kind):
    model, pad = build(kind)
    return model, classification_batch(pad, **CLASSIFIERS[kind])


def setup_generator(kind):
    model, pad = build(kind)
    return model, generation_batch(kind, pad)


def plain_inputs(batch):
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def assert_close(actual, expected, tol=1e-6):
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() <= tol


# --- (a) STD is the model's own forward -------------------------------------------------
@pytest.mark.parametrize("kind", CLASSIFIERS)
def test_std_classification_is_the_models_own_forward(kind):
    model, batch = setup_classifier(kind)
    own = model(**plain_inputs(batch)).logits
    assert_close(logits_of(model, batch), own)
    loss, _ = standard_loss(model, batch)
    assert abs(loss.item() - F.cross_entropy(own, batch["labels"]).item()) <= 1e-6


@pytest.mark.parametrize("kind", GENERATORS)
def test_std_generation_is_the_models_own_forward(kind):
    model, batch = setup_generator(kind)
    own = model(**plain_inputs(batch), labels=batch["labels"])  # the model makes its decoder inputs itself
    rxf_batch = with_decoder_inputs(model, batch) if kind != "gpt2" else batch
    assert_close(logits_of(model, rxf_batch), own.logits)
    # Without smoothing, rxf's token mean is the model's own cross entropy.
    loss, _ = generation_loss(model, batch, MethodOptions(method="std", label_smoothing=0.0))
    assert abs(loss.item() - own.loss.item()) <= 1e-6


# --- (b) zero noise: the noised pass is the clean pass ----------------------------------
def record_calls(monkeypatch, module, name):
    """Patch ``module.name`` to record its arguments and call the original."""
    calls, real = [], getattr(module, name)

    def recording(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(module, name, recording)
    return calls


@pytest.mark.parametrize("concat", [False, True])
@pytest.mark.parametrize("kind", CLASSIFIERS)
def test_zero_noise_r3f_classification_equals_clean(kind, concat, monkeypatch):
    model, batch = setup_classifier(kind)
    calls = record_calls(monkeypatch, r3f, "output_divergence")
    loss, logs = r3f_loss(model, batch, MethodOptions(method="r3f", noise_eps=0.0, r3f_concat_batch=concat))
    (clean, noised), = calls
    own = model(**plain_inputs(batch)).logits
    assert_close(clean, own)
    assert_close(noised, own)
    assert logs["regularizer"].item() <= 1e-6
    assert abs(loss.item() - standard_loss(model, batch)[0].item()) <= 1e-6


@pytest.mark.parametrize("kind", GENERATORS)
def test_zero_noise_r3f_generation_equals_clean(kind, monkeypatch):
    model, batch = setup_generator(kind)
    calls = record_calls(monkeypatch, generation, "token_divergence")
    options = MethodOptions(method="r3f", noise_eps=0.0)
    loss, logs = generation_loss(model, batch, options)
    (clean, noised, _), = calls
    own = model(**plain_inputs(batch), labels=batch["labels"]).logits
    own = own if kind != "gpt2" else own[:, :-1]  # decoder-only: the positions that predict a next token
    assert_close(clean, own)
    assert_close(noised, own)
    assert logs["regularizer"].item() <= 1e-6
    std, _ = generation_loss(model, batch, MethodOptions(method="std"))
    assert abs(loss.item() - std.item()) <= 1e-6


@pytest.mark.parametrize("kind", ["pegasus", "marian"])
def test_the_old_inputs_embeds_path_differs_for_scaled_embeddings(kind):
    """Feeding the encoder's looked-up embeddings back as ``inputs_embeds`` skips the
    sqrt(d) scale: the zero-noise tests above would catch that path."""
    model, batch = setup_generator(kind)
    own = model(**plain_inputs(batch), labels=batch["labels"]).logits
    embeds = model.get_encoder().embed_tokens(batch["input_ids"])
    old = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]).logits
    assert (old - own).abs().max().item() > 1e-3


def test_the_old_inputs_embeds_path_differs_for_left_padded_roberta():
    """RoBERTa counts positions from the ids (skipping padding); from ``inputs_embeds`` it
    cannot, so left padding moved every position."""
    model, batch = setup_classifier("roberta-left")
    own = model(**plain_inputs(batch)).logits
    embeds = model.get_input_embeddings()(batch["input_ids"])
    old = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
    assert (old - own).abs().max().item() > 1e-3


# --- (c) positive noise reaches the stack it was aimed at --------------------------------
def record_layer_inputs(layer):
    """Record the hidden states entering ``layer`` at each call, (B, L, H)."""
    seen = []

    def hook(_module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    layer.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


@pytest.mark.parametrize("target", ["encoder", "decoder"])
@pytest.mark.parametrize("kind", ["pegasus", "marian"])
def test_noise_lands_on_the_target_stacks_embeddings(kind, target, monkeypatch):
    model, batch = setup_generator(kind)
    encoder_in = record_layer_inputs(model.get_encoder().layers[0])
    decoder_in = record_layer_inputs(model.get_decoder().layers[0])
    drawn = []

    def noise(like, noise_type, sigma):
        drawn.append(torch.randn(like.shape) * sigma)
        return drawn[-1]

    monkeypatch.setattr(generation, "sample_noise", noise)
    _, logs = generation_loss(model, batch, MethodOptions(method="r3f", noise_eps=1e-2, noise_target=target))
    assert logs["regularizer"].item() > 1e-7  # the noised pass differs from the clean one
    assert len(encoder_in) == len(decoder_in) == 2 and len(drawn) == 1  # clean pass, then noised pass
    hit, missed = (encoder_in, decoder_in) if target == "encoder" else (decoder_in, encoder_in)
    assert torch.equal(missed[1], missed[0])
    # The noise is added to the lookup E(x), before the model's own sqrt(d) scale.
    scale = (model.get_encoder() if target == "encoder" else model.get_decoder()).embed_scale
    assert scale != 1.0
    assert_close(hit[1] - hit[0], drawn[0] * scale, tol=1e-5)


# --- (d) a perturbation that reaches nothing raises -------------------------------------
def test_a_pass_that_bypasses_the_embedding_module_raises():
    model, batch = setup_classifier("bert")
    module = embedding_module(model)
    embeds = module(batch["input_ids"])
    with pytest.raises(RuntimeError, match="never reached"):
        with perturbed_embeddings(model, lambda e: e + 1.0):
            model(inputs_embeds=embeds, attention_mask=batch["attention_mask"])
    assert not module._forward_hooks  # and the hook is gone


def test_a_seq2seq_pass_that_skips_the_target_stack_raises():
    model, batch = setup_generator("pegasus")
    with pytest.raises(RuntimeError, match="never reached"):
        with perturbed_embeddings(model, lambda e: e + 1.0, target="decoder"):
            model.get_encoder()(**plain_inputs(batch))  # the decoder's embedding never runs
    with perturbed_embeddings(model, lambda e: e + 1.0, target="encoder"):
        model.get_encoder()(**plain_inputs(batch))


# --- (e) SMART and FreeLB: the perturbation reaches the model, never the padding --------
def record_embedding_sums(model):
    """The word + position (+ type) embedding sum entering the embeddings' LayerNorm at
    each call, (B, T, H): what the model consumes downstream of rxf's hook."""
    seen = []
    model.base_model.embeddings.LayerNorm.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    return seen


def assert_padding_untouched(clean, perturbed, mask):
    delta = perturbed - clean
    padding = mask == 0
    assert padding.any() and torch.equal(delta[padding], torch.zeros_like(delta[padding]))
    assert (delta[~padding].abs().amax(dim=-1) > 1e-4).all()  # every real token was perturbed
    return delta


@pytest.mark.parametrize("kind", ["bert", "roberta-left"])
def test_smart_perturbs_real_tokens_only(kind):
    model, batch = setup_classifier(kind)
    sums = record_embedding_sums(model)
    options = MethodOptions(method="smart", smart_epsilon=0.5, smart_step_size=0.5, smart_noise_var=0.1,
                            smart_bregman=False)
    loss, logs = smart_loss(model, batch, options)
    assert len(sums) == 3  # clean, one ascent step, the final pass at delta
    for perturbed in sums[1:]:
        delta = assert_padding_untouched(sums[0], perturbed, batch["attention_mask"])
        assert delta.abs().max().item() <= options.smart_epsilon + 1e-5  # inside the inf-ball
    std, _ = standard_loss(model, batch)
    assert logs["regularizer"].item() > 1e-4 and loss.item() > std.item() + 1e-4


@pytest.mark.parametrize("kind", ["bert", "roberta-left"])
def test_freelb_perturbs_real_tokens_only(kind):
    model, batch = setup_classifier(kind)
    sums = record_embedding_sums(model)
    std, _ = standard_loss(model, batch)  # records the clean sum first
    options = MethodOptions(method="freelb", freelb_steps=2, freelb_init_mag=20.0, freelb_step_size=20.0)
    loss, logs = freelb_step(model, batch, options)
    assert len(sums) == 3
    for perturbed in sums[1:]:
        assert_padding_untouched(sums[0], perturbed, batch["attention_mask"])
    # Both steps ran on perturbed embeddings, so even the first step's loss is not STD's.
    assert abs(logs["task_loss"].item() - std.item()) > 1e-4 and abs(loss.item() - std.item()) > 1e-4
