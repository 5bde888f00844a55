"""Tiny random decoder models built from transformers configs (no hub, no download).

``make_tiny_model(arch)`` gives an eval-mode ``*ForCausalLM`` with hidden 64, d_ff 128, vocab 128
and 3 layers (by default) for every architecture in :data:`ARCHS`; the same seed gives the same
weights. Tests of anything that walks a model's structure (arch, patch, capture, export) reuse it.
"""
from __future__ import annotations

import torch

# arch name -> (config class, model class) in transformers; Phi-3 has a fused gate_up_proj.
_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
}
ARCHS = tuple(_CLASSES)
FUSED_ARCHS = ("phi3",)

HIDDEN = 64
D_FF = 128
VOCAB = 128


def tiny_config(arch: str, *, num_layers: int = 3, **overrides):
    """A tiny config of ``arch``: hidden 64, 4 heads (2 KV heads) of 16, d_ff 128, vocab 128."""
    import transformers

    if arch not in _CLASSES:
        raise ValueError(f"unknown tiny arch {arch!r}; known: {ARCHS}")
    config_cls = getattr(transformers, _CLASSES[arch][0])
    kwargs = dict(
        hidden_size=HIDDEN,
        intermediate_size=D_FF,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=HIDDEN // 4,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        # Larger than the default 0.02, so random logits are not all alike and greedy
        # decoding reacts to an edit.
        initializer_range=0.1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(overrides)
    return config_cls(**kwargs)


def make_tiny_model(arch: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, num_layers: int = 3,
                    **overrides):
    """A randomly initialised tiny ``*ForCausalLM`` of ``arch`` in eval mode, weights in ``dtype``."""
    import transformers

    config = tiny_config(arch, num_layers=num_layers, **overrides)
    model_cls = getattr(transformers, _CLASSES[arch][1])
    torch.manual_seed(seed)
    model = model_cls(config).to(dtype).eval()
    model.generation_config.pad_token_id = config.pad_token_id
    return model


def tiny_input_ids(batch: int = 2, length: int = 7, *, seed: int = 1) -> torch.Tensor:
    """``(batch, length)`` random token ids avoiding the special ids 0..2."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)
