"""A tiny byte-level BPE tokenizer with chat special tokens, built in memory (no downloads).

For tests of agents, templates and the rollout loop::

    tok = tiny_chat_tokenizer("qwen2.5")
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

from envs.templates import get_template

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]

_CORPUS = [
    "You are a helpful assistant. What is 123 * 45? The answer is 5535.",
    '<tool_call>\n{"name": "calculator", "arguments": {"expression": "123*45"}}\n</tool_call>',
    "Thought: I should use a tool.\nAction: calculator\nAction Input: {\"expression\": \"2+2\"}\nFinal Answer: 4",
    "```python\nprint(sum(range(10)))\n```\nsystem user assistant tool ipython <tool_response> </tool_response>",
]


def tiny_chat_tokenizer(template: str | None = "qwen2.5", vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a few lines; ``chat_template`` set to the named template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>" if template != "llama3" else "<|eot_id|>",
        bos_token="<|begin_of_text|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS,
    )
    if template is not None:
        fast.chat_template = get_template(template)
    return fast
