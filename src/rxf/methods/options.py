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

# Losses: what one update computes (one of them is always the main part).
LOSSES = ("std", "std++", "r3f", "r4f", "smart", "freelb", "rdrop")
# Modifiers: training-time changes that combine with any loss (``extras``), in the order
# their set-up runs: Mixout records the pre-trained weights before NoisyTune perturbs them.
MODIFIERS = ("mixout", "noisytune", "childtune", "hype", "neftune")
# A modifier named as the method on its own means the task loss (std's) plus the modifier.
METHODS = LOSSES + ("neftune", "noisytune", "hype", "childtune", "mixout")


def check_methods(methods: list[str]) -> None:
    """Refuse an unknown name in a ``--methods`` list (all checked before any run starts)."""
    for method in methods:
        if method not in METHODS:
            raise OptionError(f"--methods: unknown method {method!r}; choose from {', '.join(METHODS)}")


NORMS = ("inf", "l2")
R4F_SCOPES = ("all", "last")
NOISE_TARGETS = ("encoder", "decoder")
CHILDTUNE_MODES = ("d", "f")


def _opt(default, help_text: str, choices=None):
    meta = {"help": help_text}
    if choices is not None:
        meta["choices"] = list(choices)
    return field(default=default, metadata=meta)


@dataclass
class MethodOptions:
    """Options of the fine-tuning methods (Aghajanyan et al., ICLR 2021, the baselines it
    compares against, and the regularisers that followed it; docs/methods.md)."""

    method: str = _opt(
        "r3f",
        "Fine-tuning method: std (Standard), std++ (Standard++, Zhang et al. 2020), "
        "r3f, r4f (Aghajanyan et al. 2021), smart (Jiang et al. 2020), freelb (Zhu et al. 2020), "
        "rdrop (Liang et al. 2021); or one modifier on the task loss: neftune (Jain et al. 2023), "
        "noisytune (Wu et al. 2022), hype (Yuan et al. 2023), childtune (Xu et al. 2021), mixout (Lee et al. 2020).",
        METHODS,
    )
    extras: str = _opt(
        "",
        "Comma-separated modifiers combined with --method's loss: " + ", ".join(MODIFIERS) + " (e.g. "
        "--method r3f --extras noisytune,hype). Each keeps its own set-up, hooks and checkpoint state; "
        "the loss is --method's. Set-up runs in the order " + ", ".join(MODIFIERS) + ", whatever the order given.",
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
    # --- R-Drop (Liang et al. 2021) -------------------------------------------------
    rdrop_alpha: float = _opt(
        1.0,
        "R-Drop weight alpha of 1/2 (KL(P1||P2) + KL(P2||P1)) between two dropout passes, beside the sum of "
        "both passes' task losses (the paper's Eq. 3; its GLUE search: 0.1, 0.5, 1.0).",
    )
    rdrop_concat_batch: bool | None = _opt(
        None,
        "Run R-Drop's two passes as one batch of 2B (independent dropout masks per row, the usual "
        "implementation). Unset: on for CUDA tensors, off on CPUs.",
    )
    # --- NEFTune (Jain et al. 2023) ---------------------------------------------------
    neftune_alpha: float = _opt(
        5.0,
        "NEFTune alpha: embeddings + U(-1, 1) * alpha / sqrt(L * d) with L each sequence's real length "
        "(paper searches 5, 10, 15).",
    )
    # --- NoisyTune (Wu et al. 2022) ---------------------------------------------------
    noisytune_lambda: float = _opt(
        0.15,
        "NoisyTune lambda: once before training, every trainable parameter tensor W <- W + "
        "U(-lambda/2, lambda/2) * std(W) (paper: 0.15).",
    )
    # --- HyPe (Yuan et al. 2023) --------------------------------------------------------
    hype_noise_type: str = _opt(
        "uniform",
        "HyPe noise on the hidden states entering each Transformer layer: uniform U(-eps, eps) or normal "
        "N(0, eps^2) (the official script's example uses uniform).",
        NOISE_TYPES,
    )
    hype_eps: float = _opt(1e-5, "HyPe noise scale eps (the official scripts: 1e-5).")
    # --- Child-Tuning (Xu et al. 2021) ------------------------------------------------
    childtune_mode: str = _opt(
        "d",
        "Child-Tuning variant: d (a fixed child network, the top --childtune-reserve of the Transformer "
        "layers' parameters by Fisher information, computed before training) or f (a fresh Bernoulli mask "
        "on every parameter's gradient each update, rescaled by 1/p).",
        CHILDTUNE_MODES,
    )
    childtune_reserve: float = _opt(
        0.3, "Child-Tuning reserve ratio p: the fraction of gradients kept (official script: 0.3)."
    )
    childtune_fisher_batches: int = _opt(
        0, "Child-Tuning-D: training batches of the Fisher estimate (0: one pass over the training set, as "
           "the official code does)."
    )
    childtune_fisher_clip: float = _opt(
        0.0,
        "Child-Tuning-D: clip each parameter's batch gradient to this norm before squaring it (0: no clipping, "
        "the paper's Fisher; the official code clips to max_grad_norm, 1.0).",
    )
    # --- Mixout (Lee et al. 2020) --------------------------------------------------------
    mixout_p: float = _opt(
        0.9,
        "Mixout probability p in [0, 1): each input neuron's weights of every linear layer take their "
        "pre-trained value with probability p, rescaled so that the expectation is the current weight "
        "(the official example: 0.9).",
    )
    mixout_keep_dropout: bool = _opt(
        False,
        "Keep dropout on beside Mixout. Off: every dropout module is set to p = 0, as in the paper's "
        "experiments and the official code, where mixout replaces dropout.",
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

    def resolved_extras(self) -> tuple[str, ...]:
        """The modifiers of this run in set-up order: those of ``extras`` and the method
        itself when it is one (``--method hype`` = std's loss + HyPe). Raises OptionError
        for an unknown name."""
        names = {name.strip() for name in self.extras.split(",") if name.strip()}
        for name in sorted(names):
            if name not in MODIFIERS:
                hint = f" (it is a loss: pass it as --method {name})" if name in LOSSES else ""
                raise OptionError(f"{_flag('extras')}: unknown modifier {name!r}{hint}; choose from "
                                  f"{', '.join(MODIFIERS)}")
        if self.method in MODIFIERS:
            names.add(self.method)
        return tuple(name for name in MODIFIERS if name in names)

    def resolved_loss(self) -> str:
        """The loss of the run: the method, or std's task loss for a modifier on its own."""
        return "std" if self.method in MODIFIERS else self.method

    def method_label(self) -> str:
        """The run's method with its extras, e.g. ``r3f+noisytune+hype`` (``hype`` alone
        for ``--method hype``)."""
        extras = [name for name in self.resolved_extras() if name != self.method]
        return "+".join([self.method, *extras])

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
        _choice("hype_noise_type", self.hype_noise_type, NOISE_TYPES)
        _choice("childtune_mode", self.childtune_mode, CHILDTUNE_MODES)
        if not isinstance(self.extras, str):
            raise OptionError(f"{_flag('extras')} must be a comma-separated string, got {self.extras!r}")
        self.resolved_extras()
        if not 0 <= self.label_smoothing < 1:
            raise OptionError(f"{_flag('label_smoothing')} must lie in [0, 1), got {self.label_smoothing}")
        for name in (
            "noise_eps", "r3f_lambda", "smart_step_size", "smart_epsilon", "smart_noise_var",
            "smart_lambda", "smart_mu", "freelb_step_size", "freelb_init_mag", "freelb_max_norm",
            "freelb_start_after", "rdrop_alpha", "neftune_alpha", "noisytune_lambda", "hype_eps",
            "childtune_fisher_batches", "childtune_fisher_clip",
        ):
            if getattr(self, name) < 0:
                raise OptionError(f"{_flag(name)} must be >= 0, got {getattr(self, name)}")
        for name in ("smart_steps", "freelb_steps"):
            if getattr(self, name) < 1:
                raise OptionError(f"{_flag(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("smart_beta", "smart_beta_late", "smart_beta_switch"):
            if not 0 <= getattr(self, name) <= 1:
                raise OptionError(f"{_flag(name)} must lie in [0, 1], got {getattr(self, name)}")
        if not 0 < self.childtune_reserve <= 1:
            raise OptionError(f"{_flag('childtune_reserve')} must lie in (0, 1], got {self.childtune_reserve}")
        if not 0 <= self.mixout_p < 1:
            raise OptionError(f"{_flag('mixout_p')} must lie in [0, 1) (p = 1 divides by zero), got {self.mixout_p}")
        if self.train_length_factor is not None and self.train_length_factor <= 0:
            raise OptionError(f"{_flag('train_length_factor')} must be > 0, got {self.train_length_factor}")


def method_option_names() -> list[str]:
    return [f.name for f in fields(MethodOptions)]


def _flag(name: str) -> str:
    return f"{name} (--{name.replace('_', '-')})"


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise OptionError(f"{_flag(name)} must be one of {', '.join(choices)}; got {value!r}")
