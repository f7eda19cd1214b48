"""vLLM vs the transformers engine: sampling throughput and weight-update latency.

    python bench/bench_engines.py [--models tiny,qwen0.5b] [--layers 24] [--new-tokens 64]

For each model (random init, fp32, saved to a temp dir) and each concurrency
``B``, both engines sample the same ``B`` prompts for exactly ``N`` new tokens
(no stop ids) and the script prints tokens/s of each and vLLM/HF. Then it checks
vLLM's sampled-token log-probs against a transformers forward of the same
weights and times ``load_weights`` of a full HF state dict on both. One engine runs at a time.

The transformers side is ``actors.engines.hf_engine.HFEngine`` when it exists,
else a ``model.generate`` baseline defined here. Figures are wall-clock on
whatever machine runs this; start-up time of each engine is printed but not
counted in tokens/s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from actors.engines.base import Engine, Generation, SamplingSettings  # noqa: E402

TINY = dict(
    vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=2048,
)
QWEN2_0_5B = dict(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
    num_attention_heads=14, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048,
)


class GenerateBaseline(Engine):
    """``model.generate`` one batch per call group: the fallback transformers engine."""

    def __init__(self, model_path: str, device: str = "cpu") -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device).eval()

    async def generate(self, prompt_ids: list[int], settings: SamplingSettings) -> Generation:
        ids = torch.tensor([prompt_ids])
        with torch.no_grad():
            out = self.model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=settings.temperature,
                top_k=0, max_new_tokens=settings.max_tokens, min_new_tokens=settings.max_tokens,
                pad_token_id=0,
            )
        tokens = out[0, len(prompt_ids):].tolist()
        return Generation(tokens, [0.0] * len(tokens), "length", self.version)

    def load_weights(self, named_tensors, version: int) -> None:
        self.model.load_state_dict(dict(named_tensors), strict=False)
        self.version = version


def transformers_engine(model_path: str) -> tuple[str, Engine]:
    try:
        from actors.engines.hf_engine import HFEngine
    except ImportError:
        return "generate-baseline", GenerateBaseline(model_path)
    return "HFEngine", HFEngine(model_path, device="cpu")


def build_model(shape: dict, path: str, seed: int):
    import transformers

    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(tie_word_embeddings=True, **shape))
    model.save_pretrained(path)
    return model


def prompts(batch: int, vocab: int, length: int = 16) -> list[list[int]]:
    gen = torch.Generator().manual_seed(batch)
    return [torch.randint(1, vocab, (length,), generator=gen).tolist() for _ in range(batch)]


def tokens_per_s(engine: Engine, batch: int, new_tokens: int, vocab: int) -> float:
    settings = [SamplingSettings(max_tokens=new_tokens, temperature=1.0, seed=i) for i in range(batch)]

    async def run() -> list[Generation]:
        return await asyncio.gather(*(engine.generate(p, s) for p, s in zip(prompts(batch, vocab), settings)))

    start = time.perf_counter()
    generations = asyncio.run(run())
    elapsed = time.perf_counter() - start
    produced = sum(len(g.token_ids) for g in generations)
    assert produced == batch * new_tokens, f"expected {batch * new_tokens} tokens, got {produced}"
    return produced / elapsed


def update_latency_s(engine: Engine, state: dict[str, torch.Tensor], repeats: int) -> float:
    times = []
    for version in range(1, repeats + 1):
        start = time.perf_counter()
        engine.load_weights(state.items(), version=version)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def logprob_mean_abs_diff(engine: Engine, model_path: str, vocab: int) -> dict[str, float]:
    """Mean |engine - transformers| of sampled-token log-probs (log_softmax(logits / T), full vocab)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    cases = {"T=1": SamplingSettings(32, 1.0, seed=1), "T=0.7,top_k=20,top_p=0.9": SamplingSettings(32, 0.7, 0.9, 20, seed=2)}
    diffs = {}
    for name, settings in cases.items():
        async def run() -> list[Generation]:
            return await asyncio.gather(*(engine.generate(p, settings) for p in prompts(4, vocab)))

        per_token = []
        for prompt, generation in zip(prompts(4, vocab), asyncio.run(run())):
            ids = torch.tensor([prompt + generation.token_ids])
            with torch.no_grad():
                logits = model(ids).logits[0, len(prompt) - 1 : -1].float() / settings.temperature
            ref = logits.log_softmax(-1).gather(1, torch.tensor(generation.token_ids)[:, None])[:, 0]
            per_token.append((ref - torch.tensor(generation.logprobs)).abs())
        diffs[name] = torch.cat(per_token).mean().item()
    return diffs


def bench_engine(name: str, make, batches, new_tokens, vocab, new_state, repeats, check=None) -> dict:
    start = time.perf_counter()
    label, engine = make()
    startup = time.perf_counter() - start
    tokens_per_s(engine, 1, 4, vocab)  # warm-up
    result = {"label": label, "startup_s": startup}
    for batch in batches:
        result[batch] = tokens_per_s(engine, batch, new_tokens, vocab)
        print(f"  {label:18s} B={batch:3d} N={new_tokens}: {result[batch]:9.1f} tok/s", flush=True)
        print(f"RESULT engines engine={name} batch={batch} new_tokens={new_tokens} tok_s={result[batch]:.1f}", flush=True)
    if check is not None:
        result["check"] = check(engine)
        print(f"  {label:18s} log-prob mean |diff| vs transformers: {result['check']}", flush=True)
    result["update_s"] = update_latency_s(engine, new_state, repeats)
    print(f"  {label:18s} start-up {startup:.1f} s, load_weights {result['update_s']:.3f} s (median of {repeats})",
          flush=True)
    print(f"RESULT engines engine={name} startup_s={startup:.1f} load_weights_s={result['update_s']:.3f}", flush=True)
    closer = getattr(engine, "shutdown", None)
    if closer is not None:
        closer()
    else:
        asyncio.run(engine.close())
    del engine
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,qwen0.5b")
    parser.add_argument("--layers", type=int, default=24, help="layers of the Qwen2-0.5B-shaped model (real: 24)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--repeats", type=int, default=3, help="load_weights repetitions (median reported)")
    parser.add_argument("--enforce-eager", type=int, default=1, help="vLLM without torch.compile (1) or with (0)")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from actors.engines.vllm_engine import VLLMEngine

    batches = [int(b) for b in args.batches.split(",")]
    shapes = {"tiny": TINY, "qwen0.5b": dict(QWEN2_0_5B, num_hidden_layers=args.layers)}
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    lines = []
    for model_name in args.models.split(","):
        shape = shapes[model_name]
        with tempfile.TemporaryDirectory(prefix=f"bench-{model_name}-") as path:
            model = build_model(shape, path, seed=0)
            n_params = sum(p.numel() for p in model.parameters())
            new_state = {k: v + 0.01 for k, v in model.state_dict().items()}
            del model
            layers = shape["num_hidden_layers"]
            note = "" if model_name != "qwen0.5b" or layers == 24 else f" (only {layers} of 24 layers)"
            title = f"{model_name}{note}: {n_params / 1e6:.1f}M params fp32"
            print(title, flush=True)
            hf = bench_engine("hf", lambda: transformers_engine(path), batches, args.new_tokens,
                              shape["vocab_size"], new_state, args.repeats)
            vllm = bench_engine(
                "vllm",
                lambda: ("VLLMEngine", VLLMEngine(path, seed=0, max_model_len=2048, cpu_kvcache_space_gb=1,
                                                   enforce_eager=bool(args.enforce_eager), dtype="float32")),
                batches, args.new_tokens, shape["vocab_size"], new_state, args.repeats,
                check=lambda engine: logprob_mean_abs_diff(engine, path, shape["vocab_size"]),
            )
            del new_state
        for batch in batches:
            lines.append(
                f"{title} B={batch} N={args.new_tokens}: vllm {vllm[batch]:.1f} tok/s, "
                f"{hf['label']} {hf[batch]:.1f} tok/s, vllm/hf {vllm[batch] / hf[batch]:.2f}"
            )
        lines.append(
            f"{title} load_weights: vllm {vllm['update_s']:.3f} s, {hf['label']} {hf['update_s']:.3f} s; "
            f"start-up: vllm {vllm['startup_s']:.1f} s, {hf['label']} {hf['startup_s']:.1f} s"
        )
        lines.append(f"{title} vllm log-prob mean |diff| vs transformers forward: "
                     + ", ".join(f"{k}: {v:.2e}" for k, v in vllm["check"].items()))
    print("\n".join(["", "== summary =="] + lines))


if __name__ == "__main__":
    main()
