"""Every method's options in one dataclass.

The same fields serve the functional API (``r3f_loss(model, batch, MethodOptions(...))``),
``RXFConfig`` (which inherits them beside ``TrainingArguments``) and the ``rxf`` command
(one ``--flag`` per field, help text from the field's metadata), so a default lives in
exactly one place. Defaults follow the paper and the reference implementations, as
documented in docs/methods.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from rxf.errors import OptionError

# Kept here, not in rxf.noise, so that reading the options (the CLI's --help) needs no torch.
NOISE_TYPES = ("uniform", "normal")

METHODS = ("std", "std++", "r3f", "r4f", "smart", "freelb")
NORMS = ("inf", "l2")
R4F_SCOPES = ("all", "last")
NOISE_TARGETS = ("encoder", "decoder")


def _opt(default, help_text: str, choices=None):
    meta = {"help": help_text}
    if choices is not None:
        meta["choices"] = list(choices)
    return field(default=default, metadata=meta)


@dataclass
class MethodOptions:
    """Options of the six fine-tuning methods (Aghajanyan et al., ICLR 2021, and the
    baselines it compares against)."""

    method: str = _opt(
        "r3f",
        "Fine-tuning method: std (Standard), std++ (Standard++, Zhang et al. 2020), "
        "r3f, r4f (Aghajanyan et al. 2021), smart (Jiang et al. 2020), freelb (Zhu et al. 2020).",
        METHODS,
    )
    adam_bias_correction: bool | None = _opt(
        None,
        "Adam bias correction. Unset: off for std (the original BERT/RoBERTa recipe), on "
        "for every other method. This and train_length_factor are the two knobs that "
        "separate std from std++.",
    )
    train_length_factor: float | None = _opt(
        None,
        "Multiplies the training length (epochs, or max steps when set). Unset: 2.0 for "
        "std++ (longer training, Zhang et al. 2020), 1.0 otherwise.",
    )
    # --- R3F / R4F ---------------------------------------------------------------
    noise_type: str | None = _opt(
        None,
        "R3F/R4F noise distribution on the word embeddings: uniform U(-eps, eps) or normal "
        "N(0, eps^2). Unset: uniform for classification, normal for generation (fairseq's defaults).",
        NOISE_TYPES,
    )
    noise_eps: float = _opt(1e-5, "R3F/R4F noise scale sigma (paper and fairseq: 1e-5).")
    r3f_lambda: float = _opt(
        1.0, "R3F/R4F weight lambda of the symmetric KL term (paper searches 0.1, 0.5, 1, 5)."
    )
    r3f_detach_embeddings: bool = _opt(
        True,
        "Noise detached word embeddings (e.detach() + z), as fairseq does for "
        "classification: the embedding table then gets gradient through the clean pass "
        "only. The KL stays differentiable through both passes' encoders either way.",
    )
    r3f_noised_no_grad: bool = _opt(
        False,
        "Run R3F's noised pass without gradient, as a fixed target: the KL's gradient then "
        "flows through the clean pass only, so the backward covers one graph. Cheaper than "
        "the paper's R3F (whose KL is differentiable through both passes) and not the same.",
    )
    r3f_concat_batch: bool | None = _opt(
        None,
        "Run R3F's clean and noised inputs as one batch of 2B instead of two passes of B (the "
        "same result). Unset: on for CUDA tensors, where one large batch measured faster "
        "(docs/performance.md), off on CPUs.",
    )
    r4f_scope: str = _opt(
        "all",
        "R4F spectral normalisation scope: all linear layers of the head (the paper's "
        "statement) or only its last layer (fairseq parity).",
        R4F_SCOPES,
    )
    # --- generation (R3F for seq2seq and decoder-only LMs) ----------------------------
    label_smoothing: float = _opt(0.1, "Generation: label smoothing of the cross entropy (BART's usual 0.1).")
    noise_target: str = _opt(
        "encoder", "Generation: noise the encoder input embeddings (the paper) or the decoder's.", NOISE_TARGETS
    )
    # --- SMART ---------------------------------------------------------------------
    smart_steps: int = _opt(1, "SMART projected ascent steps S per update.")
    smart_step_size: float = _opt(1e-3, "SMART ascent step size eta.")
    smart_epsilon: float = _opt(1e-5, "SMART radius epsilon of the perturbation ball.")
    smart_norm: str = _opt("inf", "SMART ball norm: inf (per token) or l2 (per example).", NORMS)
    smart_noise_var: float = _opt(1e-5, "SMART std sigma of the initial perturbation N(0, sigma^2).")
    smart_lambda: float = _opt(1.0, "SMART weight lambda_s of the adversarial smoothness term (paper: 1, 3, 5).")
    smart_bregman: bool = _opt(
        True, "SMART Bregman proximal point term with an EMA teacher (on in the paper's configuration)."
    )
    smart_mu: float = _opt(1.0, "SMART weight mu of the Bregman proximal term.")
    smart_beta: float = _opt(0.99, "SMART teacher EMA momentum beta for the first updates.")
    smart_beta_late: float = _opt(0.999, "SMART teacher EMA momentum beta after the switch point.")
    smart_beta_switch: float = _opt(0.1, "Fraction of all updates after which beta becomes smart_beta_late.")
    # --- FreeLB --------------------------------------------------------------------
    freelb_steps: int = _opt(3, "FreeLB ascent steps K per update (K forward and K backward passes).")
    freelb_step_size: float = _opt(0.1, "FreeLB ascent step size alpha.")
    freelb_init_mag: float = _opt(0.0, "FreeLB initial perturbation magnitude (0: start from the clean input).")
    freelb_max_norm: float = _opt(0.0, "FreeLB projection radius (0: no projection).")
    freelb_norm: str = _opt("l2", "FreeLB norm: l2 (per example) or inf.", NORMS)
    freelb_start_after: int = _opt(
        0, "FreeLB runs plain updates for this many updates before the adversary starts."
    )

    def resolved_bias_correction(self) -> bool:
        if self.adam_bias_correction is not None:
            return self.adam_bias_correction
        return self.method != "std"

    def resolved_noise_type(self, generation: bool = False) -> str:
        if self.noise_type is not None:
            return self.noise_type
        return "normal" if generation else "uniform"

    def resolved_length_factor(self) -> float:
        if self.train_length_factor is not None:
            return self.train_length_factor
        return 2.0 if self.method == "std++" else 1.0

    def validate(self) -> None:
        """Raise OptionError naming the first bad option."""
        import math

        for f in fields(MethodOptions):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):  # NaN passes every comparison below
                raise OptionError(f"{_flag(f.name)} must be a finite number, got {value}")
        _choice("method", self.method, METHODS)
        if self.noise_type is not None:
            _choice("noise_type", self.noise_type, NOISE_TYPES)
        _choice("r4f_scope", self.r4f_scope, R4F_SCOPES)
        _choice("smart_norm", self.smart_norm, NORMS)
        _choice("freelb_norm", self.freelb_norm, NORMS)
        _choice("noise_target", self.noise_target, NOISE_TARGETS)
        if not 0 <= self.label_smoothing < 1:
            raise OptionError(f"{_flag('label_smoothing')} must lie in [0, 1), got {self.label_smoothing}")
        for name in (
            "noise_eps", "r3f_lambda", "smart_step_size", "smart_epsilon", "smart_noise_var",
            "smart_lambda", "smart_mu", "freelb_step_size", "freelb_init_mag", "freelb_max_norm",
            "freelb_start_after",
        ):
            if getattr(self, name) < 0:
                raise OptionError(f"{_flag(name)} must be >= 0, got {getattr(self, name)}")
        for name in ("smart_steps", "freelb_steps"):
            if getattr(self, name) < 1:
                raise OptionError(f"{_flag(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("smart_beta", "smart_beta_late", "smart_beta_switch"):
            if not 0 <= getattr(self, name) <= 1:
                raise OptionError(f"{_flag(name)} must lie in [0, 1], got {getattr(self, name)}")
        if self.train_length_factor is not None and self.train_length_factor <= 0:
            raise OptionError(f"{_flag('train_length_factor')} must be > 0, got {self.train_length_factor}")


def method_option_names() -> list[str]:
    return [f.name for f in fields(MethodOptions)]


def _flag(name: str) -> str:
    return f"{name} (--{name.replace('_', '-')})"


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise OptionError(f"{_flag(name)} must be one of {', '.join(choices)}; got {value!r}")
