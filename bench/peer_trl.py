"""TRL's GRPOTrainer on the job bench_peer.py prepares; runs in its own virtual environment
(``make bench-peer``: TRL is never a dependency of Relay). Prints one JSON line with what it measured.

Usage: .venv-peer/bin/python bench/peer_trl.py JOB.json
"""

import json
import sys
import time

T_START = time.monotonic()


def main() -> int:
    job = json.loads(open(sys.argv[1]).read())
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
    data = Dataset.from_list([{"prompt": p, "answer": a} for p, a in zip(job["prompts"], job["answers"])])

    def reward(completions, answer, **_):
        return [1.0 if c.strip() == a.strip() else 0.0 for c, a in zip(completions, answer)]

    steps: list[dict] = []

    class Clock(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                steps.append({"step": state.global_step, "time": time.monotonic(),
                              "tokens": logs["completions/mean_length"] * job["prompts_per_step"] * job["group_size"]})

    cfg = GRPOConfig(
        output_dir=job["out"], use_cpu=True, report_to="none", save_strategy="no", logging_steps=1,
        max_steps=job["steps"], per_device_train_batch_size=job["prompts_per_step"] * job["group_size"],
        num_generations=job["group_size"], max_completion_length=job["max_tokens"], temperature=1.0,
        learning_rate=job["lr"], lr_scheduler_type="constant", warmup_steps=0, beta=0.0, epsilon=job["clip"],
        loss_type="dapo", num_iterations=1, gradient_accumulation_steps=1, seed=0, dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=data, processing_class=tokenizer,
                          callbacks=[Clock()])
    t_train = time.monotonic()
    trainer.train()
    print(json.dumps({
        "steps": steps, "startup_s": t_train - T_START, "torch_threads": torch.get_num_threads(),
        "trl": __import__("trl").__version__,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
