"""A model's tokenizer and chat template without importing transformers, for counting prompt tokens.

Importing transformers' tokenizers takes 2-10 s (more on a loaded machine); the prompt-length
count (``learner.prompts.prompt_lengths``: the learner's overlong-prompt filter, and the launcher's
check before any process starts) needs only what the agents use of a tokenizer: its chat template
rendered to text and that text counted in tokens. ``load_fast_tokenizer(model_dir)`` reads
``tokenizer.json`` with the ``tokenizers`` library and renders the template with jinja2 the
way transformers' ``apply_chat_template`` does (``transformers.utils.chat_template_utils``:
a sandboxed environment with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` and
``{% generation %}`` tags, ``tojson`` without HTML escaping, ``raise_exception`` and
``strftime_now``, the named special tokens as variables), so the ids equal transformers' own
(``tests/test_preflight.py`` compares them).

The tokenizer class is the one ``AutoTokenizer`` picks (``models/auto/tokenization_auto.py``:
the hub's ``tokenizer_class``, unless the model type is one whose hub class transformers
overrides). Two kinds are built here: ``TokenizersBackend`` / ``PreTrainedTokenizerFast``, which
transformers loads from ``tokenizer.json`` as it is, and ``Qwen2Tokenizer`` (every Qwen2/2.5/3
model, and the embedded tiny model, whose model type is ``qwen2``), whose normalizer,
pre-tokenizer and BPE options transformers 5 defines in Python and applies to the vocabulary
and merges of ``tokenizer.json``; they are applied here the same way. It answers None, and the
caller loads transformers' tokenizer instead, for any other class, remote code, legacy files,
special tokens that transformers would add, Mistral's regex patch, or several named chat
templates. The constants copied from transformers are checked against it by the tests.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

AS_IS_CLASSES = frozenset({"TokenizersBackend", "PreTrainedTokenizerFast"})
"""``tokenizer_class`` values transformers 5 loads from ``tokenizer.json`` unchanged (classes
without an ``__init__`` of their own)."""

QWEN2_CLASSES = frozenset({"Qwen2Tokenizer", "Qwen2TokenizerFast"})

QWEN2_PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
"""transformers' ``models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX``."""

QWEN2_DEFAULT_TOKENS = {"unk_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
"""``Qwen2Tokenizer.__init__``'s defaults for special tokens its config does not set."""

QWEN2_MODEL_TYPES = frozenset({
    "audioflamingo3", "colqwen2", "cosmos3_omni", "fun_asr_nano", "hunyuan_vl", "internvl", "lighton_ocr", "ovis2",
    "qianfan_ocr", "qwen2", "qwen2_5_omni", "qwen2_5_vl", "qwen2_audio", "qwen2_moe", "qwen2_vl", "qwen3", "qwen3_asr",
    "qwen3_moe", "qwen3_next", "qwen3_omni_moe", "qwen3_vl", "qwen3_vl_moe", "vibevoice",
})
"""Model types ``TOKENIZER_MAPPING_NAMES`` maps to ``Qwen2Tokenizer``."""

MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS = frozenset({
    "arctic", "chameleon", "chatlm", "deepseek_v2", "deepseek_v3", "deepseek_v32", "deepseek_v4", "deepseek_vl",
    "deepseek_vl_hybrid", "deepseek_vl_v2", "deepseek_ocr", "deepseek_ocr2", "ernie4_5", "ernie4_5_moe", "fuyu",
    "h2ovl_chat", "hyperclovax", "hyperclovax_vlm", "hyperclovax_vision_v2", "internlm2", "jamba", "janus", "llava",
    "llava_next", "minicpm3", "minicpmv", "minimax_m2", "modernbert", "modernbert-decoder", "molmo", "molmo2",
    "nemotron", "nvfp4", "opencua", "openvla", "paddleocr_vl", "phi3", "phi3_v", "phimoe", "qwen2", "qwen3_5",
    "qwen3_5_moe", "qwen3_5_moe_text", "qwen4_exp", "step3p5", "step3_vl", "vipllava", "cohere_asr",
    "camembertv2-base", "smolvlm",
})
"""transformers' set of model types whose hub ``tokenizer_class`` it replaces by its own."""

MODEL_IDS_TO_TOKENIZERS_BACKEND = (
    "deepseek-ai/deepseek-r1-distill-llama-*", "deepseek-ai/deepseek-coder-*", "allenai/dolma2-tokenizer",
    "google/umt5-small", "naver-clova-ix/donut-*", "salesforce/blip2-opt-*", "salesforce/blip2-flan-t5-*",
    "salesforce/instructblip-flan-t5-*", "stepfun-ai/step-3.7-*",
)
"""Model paths (fnmatch, lower case) transformers always loads as ``TokenizersBackend``."""

NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
"""transformers' ``SPECIAL_TOKENS_ATTRIBUTES``: each set one is a template variable."""

LEGACY_FILES = ("special_tokens_map.json", "added_tokens.json", "additional_chat_templates")


def _token_text(value: Any) -> str | None:
    """A special token's text: a string, or an ``AddedToken`` as tokenizer_config.json stores it."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class FastTokenizer:
    """What the agents (``envs.templates``) and the length count read of a transformers tokenizer."""

    def __init__(self, tokenizer, chat_template: str | None, special: dict[str, str]):
        self._tokenizer = tokenizer
        self.chat_template = chat_template
        self._special = special
        """Template variables: ``bos_token``, ``eos_token``... (and model-specific ``*_token``s)."""
        self.eos_token = special.get("eos_token")
        self.bos_token = special.get("bos_token")
        self.pad_token = special.get("pad_token")

    def apply_chat_template(
        self,
        conversation: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        **kwargs: Any,
    ) -> str | list[int]:
        """transformers' ``apply_chat_template`` for one conversation and JSON-schema tools."""
        source = chat_template if chat_template is not None else self.chat_template
        if source is None:
            raise ValueError("Cannot use chat template functions because tokenizer.chat_template is not set "
                             "and no template argument was passed!")
        if not conversation:
            raise ValueError("Cannot apply chat template to an empty conversation. Provide at least one message.")
        text = _compile(source).render(
            messages=conversation, tools=tools, documents=None, add_generation_prompt=add_generation_prompt,
            **{**self._special, **kwargs},
        )
        return self(text, add_special_tokens=False)["input_ids"] if tokenize else text

    def __call__(self, text: str | list[str], add_special_tokens: bool = True) -> dict[str, Any]:
        """``{"input_ids": ids}`` of one text or ``[ids, ...]`` of a list, as transformers returns them."""
        if isinstance(text, str):
            return {"input_ids": self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids}
        return {"input_ids": [e.ids for e in self._tokenizer.encode_batch(list(text), add_special_tokens=add_special_tokens)]}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


_COMPILED: dict[str, Any] = {}


def _compile(source: str):
    """The jinja2 template of ``source`` in transformers' environment (``_compile_jinja_template``)."""
    if source in _COMPILED:
        return _COMPILED[source]
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (transformers' ``AssistantTracker``): the body
        as it is; the assistant-token mask it tracks is not needed here."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    _COMPILED[source] = env.from_string(source)
    return _COMPILED[source]


def _tokenizer_kind(model_dir: Path, tc: dict[str, Any], model_config: dict[str, Any]) -> str | None:
    """``"as-is"`` or ``"qwen2"``: how the class ``AutoTokenizer`` picks builds the tokenizer; None
    for any other class."""
    from fnmatch import fnmatch

    if any(fnmatch(str(model_dir).lower(), p) for p in MODEL_IDS_TO_TOKENIZERS_BACKEND):
        return "as-is"
    model_type = model_config.get("model_type")
    if model_type in MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS:  # transformers' registered class wins
        return "qwen2" if model_type in QWEN2_MODEL_TYPES else None
    hub = tc.get("tokenizer_class") or model_config.get("tokenizer_class")
    return "as-is" if hub in AS_IS_CLASSES else "qwen2" if hub in QWEN2_CLASSES else None


def _apply_qwen2_pipeline(tokenizer, add_prefix_space: bool) -> bool:
    """Give ``tokenizer`` (read from tokenizer.json) ``Qwen2Tokenizer.__init__``'s normalizer,
    pre-tokenizer, decoder and BPE options, keeping its vocabulary, merges and added tokens;
    False if it is not a BPE."""
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers

    model = tokenizer.model
    if type(model).__name__ != "BPE":
        return False
    model.dropout, model.unk_token = None, None
    model.continuing_subword_prefix, model.end_of_word_suffix = "", ""
    model.fuse_unk = model.byte_fallback = model.ignore_merges = False
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    return True


def load_fast_tokenizer(model_dir: str | Path) -> FastTokenizer | None:
    """The tokenizer of the Hugging Face directory ``model_dir`` without transformers, or None when
    only transformers can build it as transformers would (see the module docstring)."""
    d = Path(model_dir)
    try:
        config = json.loads((d / "tokenizer_config.json").read_text())
        model_config = json.loads((d / "config.json").read_text()) if (d / "config.json").is_file() else {}
    except (OSError, ValueError):
        return None
    if not (d / "tokenizer.json").is_file() or any((d / f).exists() for f in LEGACY_FILES) or "auto_map" in config:
        return None
    if config.get("split_special_tokens") or config.get("fix_mistral_regex") is not None:
        return None
    kind = _tokenizer_kind(d, config, model_config)
    if kind is None:
        return None
    template_file = d / "chat_template.jinja"
    template = template_file.read_text(encoding="utf-8") if template_file.is_file() else config.get("chat_template")
    if template is not None and not isinstance(template, str):
        return None  # named templates (default / tool_use): transformers' choice rules
    if "additional_special_tokens" in config and not config.get("extra_special_tokens"):
        config["extra_special_tokens"] = config.pop("additional_special_tokens")
    special: dict[str, str] = {}
    for key, value in config.items():  # named tokens and model-specific ``*_token``s are template variables
        if key in NAMED_SPECIAL_TOKENS or (key.endswith("_token") and _token_text(value) is not None):
            if value is None:
                continue
            text = _token_text(value)
            if text is None:
                return None
            special[key] = text
    if kind == "qwen2":
        special |= {k: v for k, v in QWEN2_DEFAULT_TOKENS.items() if k not in config}
    extra = config.get("extra_special_tokens") or []
    if isinstance(extra, dict):  # named extra tokens are template variables too
        for key, value in extra.items():
            if _token_text(value) is None:
                return None
            special[key] = _token_text(value)
        extra = list(extra.values())
    extra_texts = [_token_text(t) for t in extra]
    if None in extra_texts:
        return None
    try:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(d / "tokenizer.json"))
    except Exception:
        return None
    added = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    declared = {_token_text(t) for t in (config.get("added_tokens_decoder") or {}).values()}
    if declared and declared != added:
        return None  # transformers takes the config's added tokens
    if any(t not in added for t in [*special.values(), *extra_texts]):
        return None  # transformers would add these to the tokenizer
    if tokenizer.get_vocab_size(with_added_tokens=False) > 100000 and "istral" in str(model_config.get("model_type")):
        return None  # transformers may patch Mistral's regex
    if kind == "qwen2" and not _apply_qwen2_pipeline(tokenizer, bool(config.get("add_prefix_space"))):
        return None
    return FastTokenizer(tokenizer, template, special)
