"""Test helpers for capture / neurons: a byte-level chat tokenizer, a tiny random Llama, and the
explicit oracle that forwards one prompt at a time (no padding) and keeps every token."""
from __future__ import annotations

import torch

from edit_runtime.arch import find_mlp
from edit_runtime.capture import encode_prompts

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer():
    """Byte-level BPE without merges (one token per byte) + ChatML specials and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    t = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.add_special_tokens(["<|im_start|>", "<|im_end|>", "<pad>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", eos_token="<|im_end|>",
                                  bos_token="<|im_start|>")
    tok.chat_template = CHATML
    return tok


def tiny_llama(vocab_size: int, *, n_layers: int = 4, seed: int = 0, arch: str = "llama",
               dtype: torch.dtype = torch.float32):
    """A random tiny decoder of ``arch`` (tests/tiny_models.py) sized for :func:`tiny_tokenizer`,
    with weights large enough that activations vary between prompts."""
    from tiny_models import make_tiny_model

    return make_tiny_model(arch, seed=seed, dtype=dtype, num_layers=n_layers,
                           vocab_size=vocab_size, initializer_range=0.2, max_position_embeddings=512)


def explicit_activations(model, tok, texts, layer: int, *, position: str = "last",
                         system_prompt: str | None = None) -> dict[str, torch.Tensor]:
    """``{"x": (n, d_model), "up"/"gate"/"h": (n, d_ff)}`` float64, one prompt per forward."""
    info = find_mlp(model, layer)
    get = model.get_submodule
    seen: dict[str, torch.Tensor] = {}

    def fused(m, a, o):
        seen["gate"], seen["up"] = o[..., :info.d_ff], o[..., info.d_ff:]

    hs = [
        get(info.path).register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0])),
        get(info.down).register_forward_pre_hook(lambda m, a: seen.__setitem__("h", a[0])),
    ]
    if info.fused:
        hs.append(get(info.gate_up).register_forward_hook(fused))
    else:
        hs.append(get(info.up).register_forward_hook(lambda m, a, o: seen.__setitem__("up", o)))
        hs.append(get(info.gate).register_forward_hook(lambda m, a, o: seen.__setitem__("gate", o)))
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("x", "up", "gate", "h")}
    device = next(model.parameters()).device
    try:
        for ids in encode_prompts(tok, list(texts), system_prompt=system_prompt):
            with torch.no_grad():
                model(input_ids=torch.tensor([ids], device=device), use_cache=False)
            for k in out:
                v = seen[k][0].double()  # (T, D)
                out[k].append(v[-1] if position == "last" else v.mean(0))
    finally:
        for h in hs:
            h.remove()
    return {k: torch.stack(v).cpu() for k, v in out.items()}
