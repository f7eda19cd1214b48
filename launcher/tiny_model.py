"""The embedded default model: a tiny Qwen2 and its tokenizer, built locally.

``build_tiny_model(out_dir)`` writes a normal Hugging Face directory
(``config.json``, ``model.safetensors``, ``tokenizer.json``,
``tokenizer_config.json`` with a chat template) that transformers and vLLM load
like any other. Everything is deterministic in ``seed``: the byte-level BPE
tokenizer is trained on a fixed corpus from the arithmetic task (digits are
split one per token so numbers can be copied digit by digit) and the weights
are a seeded random init. Attention head_dim is 64 (vLLM CPU needs >= 32).
"""

from __future__ import annotations

import json
from pathlib import Path

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
]

# Qwen2.5-style markup, with the tool list rendered compactly (a tiny model
# has a short context): tool calls are <tool_call>{json}</tool_call> in the
# assistant turn, tool results come back as a user turn wrapped in
# <tool_response>.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set rest = messages[1:] %}{% else %}{% set system = 'You are a helpful assistant.' %}"
    "{% set rest = messages %}{% endif %}"
    "<|im_start|>system\n{{ system }}"
    "{% if tools %}{{ '\nTools: ' }}{% for t in tools %}{{ (t.function or t).name }}"
    "{% if not loop.last %}{{ ', ' }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% for m in rest %}"
    "{% if m['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m['content'] }}\n</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TINY_CONFIG = dict(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=2048,  # GSM8K prompts reach ~550 tokens with this byte-level tokenizer
    rope_theta=10000.0,
    tie_word_embeddings=True,
    rms_norm_eps=1e-6,
)


def build_tokenizer(vocab_size: int = TINY_CONFIG["vocab_size"]):
    """Train the byte-level BPE tokenizer (deterministic) and wrap it for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from envs.tasks import arithmetic

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(arithmetic.corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Build (or reuse) the embedded tiny model directory at ``out_dir``."""
    out = Path(out_dir)
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return out
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        **TINY_CONFIG,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen2ForCausalLM(cfg)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "relay_model.json").write_text(json.dumps({"kind": "relay-tiny", "seed": seed}))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.replace(out)
    return out


def deepen_model(src_dir: str | Path, out_dir: str | Path, num_layers: int, seed: int = 0) -> Path:
    """A copy of the Qwen2/Llama-style model at ``src_dir`` with ``num_layers`` decoder layers: its own
    first, then new ones that compute (random attention and MLP weights, seeded) but add nothing to the
    residual stream (``o_proj`` and ``down_proj`` zero), so the copy's logits equal the source's bit for
    bit while each step costs what a model of that depth costs. ``bench/bench_actor.py --deepen`` uses
    it: the demo's RL'd model is the only one here that calls its tool, and its 2 layers make a step
    ~1.5 ms, where the actor loop's fixed Python per turn weighs most. Reuses ``out_dir`` when built."""
    out = Path(out_dir)
    if (out / "config.json").exists():
        return out
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    src = Path(src_dir)
    cfg = AutoConfig.from_pretrained(src)
    have = cfg.num_hidden_layers
    if num_layers < have:
        raise ValueError(f"deepen_model: {src} has {have} layers; num_layers={num_layers} would drop some")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    cfg.num_hidden_layers = num_layers
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = list(cfg.layer_types) + [cfg.layer_types[-1]] * (num_layers - have)
    torch.manual_seed(seed)
    deep = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = deep.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not k.startswith("model.layers.") for k in missing):
        raise ValueError(f"deepen_model: {src}'s weights do not fit a deeper copy (missing {missing[:3]}, unexpected {unexpected[:3]})")
    with torch.no_grad():
        for layer in deep.model.layers[have:]:
            try:
                outputs = (layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight)
            except AttributeError:
                raise ValueError(f"deepen_model: {src} is not a Qwen2/Llama-style model (a layer without "
                                 "self_attn.o_proj and mlp.down_proj)") from None
            for w in outputs:
                w.zero_()
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    deep.save_pretrained(tmp)
    for f in src.iterdir():  # tokenizer, chat template: as they are; not the source's weights (or its tiny-model stamp)
        weights = f.suffix in (".safetensors", ".bin", ".pt", ".pth") or f.name.endswith(".index.json")
        if f.is_file() and not weights and f.name != "relay_model.json" and not (tmp / f.name).exists():
            shutil.copy2(f, tmp / f.name)
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    return out
