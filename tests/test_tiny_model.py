"""``launcher.tiny_model``: the embedded model and its deeper copies."""

import pytest


def test_a_deepened_copy_gives_the_same_logits_bit_for_bit_with_more_layers(tmp_path, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from launcher.tiny_model import deepen_model

    deep_dir = deepen_model(tiny_model_dir, tmp_path / "deep", 5)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    deep = AutoModelForCausalLM.from_pretrained(deep_dir)
    assert (base.config.num_hidden_layers, deep.config.num_hidden_layers) == (2, 5)
    assert len(deep.config.layer_types) == 5
    extra = deep.model.layers[2]  # it computes: random attention and MLP weights, only its outputs are zero
    assert extra.self_attn.q_proj.weight.abs().sum() > 0 and extra.mlp.up_proj.weight.abs().sum() > 0
    assert extra.self_attn.o_proj.weight.abs().sum() == 0 and extra.mlp.down_proj.weight.abs().sum() == 0
    ids = torch.randint(0, base.config.vocab_size, (3, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(base(ids).logits, deep(ids).logits)
    tok = AutoTokenizer.from_pretrained(deep_dir)  # the tokenizer and chat template come along
    assert tok.chat_template == AutoTokenizer.from_pretrained(tiny_model_dir).chat_template
    assert deepen_model(tiny_model_dir, tmp_path / "deep", 5) == deep_dir  # built once
    assert not (deep_dir / "relay_model.json").exists()  # not stamped as the embedded tiny model


def test_deepening_refuses_to_drop_layers(tmp_path, tiny_model_dir):
    from launcher.tiny_model import deepen_model

    with pytest.raises(ValueError, match="has 2 layers; num_layers=1 would drop some"):
        deepen_model(tiny_model_dir, tmp_path / "shallow", 1)
    assert not (tmp_path / "shallow").exists()
