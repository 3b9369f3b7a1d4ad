"""Per-family quirks of Hugging Face causal LMs, as data.

The patcher keeps no copy of any family's forward. It runs the family's own decoder and needs to know only
where the decoder and the output head live, and what the family does to the logits after the head: a
final-logit softcap (Gemma-2: `tanh(z / c) * c`) and a constant logit scale (Cohere multiplies by
`config.logit_scale`, Granite divides by `config.logits_scaling`). Each entry names the config keys that hold
those constants; `Family.softcap(config)` and `Family.logit_scale(config)` read them.

Supporting a new family is one row here plus its tiny config in `sftfuse.train.models` and a pass of
tests/patch/test_patcher.py. A family missing from the table still gets its LoRA and 4-bit linears swapped (those are
generic); only the loss swap needs the row, because an unknown family might transform its logits in a way the
fused loss would not reproduce.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """How one model family's causal-LM head is laid out.

    Attributes:
        model_type: `config.model_type`.
        decoder: attribute of the `*ForCausalLM` holding the decoder stack (returns `last_hidden_state`).
        lm_head: attribute holding the output projection (an `nn.Linear`, maybe tied to the input embedding).
        softcap_key: config key of the final-logit softcap, or None.
        logit_scale_key: config key of a constant multiplier (or divisor) of the logits, or None.
        logit_scale_divides: True when the family divides the logits by that constant (Granite's style).
        norm_class: class name of the family's RMSNorm; norm_rule: its output rule ("weight": w * dtype(x_hat),
            Llama's; "one_plus": dtype(x_hat * (1 + w)), Gemma-2's). See `sftfuse.kernels.rms_norm`.
        mlp_class: class name of the family's gated MLP, down(act(gate(x)) * up(x)), or None.
        attn_class: class name of the family's attention module (its forward calls the attention function that
            `config._attn_implementation` selects), or None.
    """

    model_type: str
    decoder: str = "model"
    lm_head: str = "lm_head"
    softcap_key: str | None = None
    logit_scale_key: str | None = None
    logit_scale_divides: bool = False
    norm_class: str | None = None
    norm_rule: str = "weight"
    mlp_class: str | None = None
    attn_class: str | None = None

    @property
    def modeling_module(self) -> str:
        """The transformers module that defines the family's classes."""
        return f"transformers.models.{self.model_type}.modeling_{self.model_type}"

    def softcap(self, config) -> float | None:
        """The final-logit softcap of `config`, or None when the family has none or it is switched off."""
        value = getattr(config, self.softcap_key, None) if self.softcap_key else None
        return None if value is None else float(value)

    def logit_scale(self, config) -> float:
        """The constant the logits are multiplied by (1.0 when the family has none)."""
        value = getattr(config, self.logit_scale_key, None) if self.logit_scale_key else None
        if value is None:
            return 1.0
        return 1.0 / float(value) if self.logit_scale_divides else float(value)


# Supported and tested (tests/patch/test_patcher.py runs every row on its tiny config). SmolLM2 is a Llama.
FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama", norm_class="LlamaRMSNorm", mlp_class="LlamaMLP", attn_class="LlamaAttention"),
        Family("mistral", norm_class="MistralRMSNorm", mlp_class="MistralMLP", attn_class="MistralAttention"),
        Family("qwen2", norm_class="Qwen2RMSNorm", mlp_class="Qwen2MLP", attn_class="Qwen2Attention"),
        Family("qwen3", norm_class="Qwen3RMSNorm", mlp_class="Qwen3MLP", attn_class="Qwen3Attention"),
        Family("gemma2", softcap_key="final_logit_softcapping", norm_class="Gemma2RMSNorm", norm_rule="one_plus",
               mlp_class="Gemma2MLP", attn_class="Gemma2Attention"),
    )
}


def family_of(model) -> Family | None:
    """The table row for `model` (a `*ForCausalLM`, by `config.model_type`), or None if the family is unknown."""
    config = getattr(model, "config", None)
    return FAMILIES.get(getattr(config, "model_type", None))


def loaded_classes(module_name: str, *names: str) -> tuple[type, ...]:
    """The classes `names` of `module_name` if that module is already imported, else (): a model that holds an
    instance of one has imported its module, so matching by `isinstance` never needs to import a library."""
    mod = sys.modules.get(module_name)
    return tuple(c for n in names if isinstance(c := getattr(mod, n, None), type)) if mod is not None else ()


def family_class_of(module, attr: str) -> Family | None:
    """The family whose `attr` class ("norm_class", "mlp_class" or "attn_class") `module` is an instance of."""
    for f in FAMILIES.values():
        name = getattr(f, attr)
        if name and isinstance(module, loaded_classes(f.modeling_module, name)):
            return f
    return None
