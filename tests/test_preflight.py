"""The launcher's checks before any process starts (``launcher/preflight.py``, ``relay train --check``):
each user mistake is one line naming the problem and the key to change; all of them at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from configs.loader import dump_config, load_config
from envs.rewards import TrajectoryInfo, get_reward
from envs.tools import get_tool
from launcher.preflight import PreflightError, preflight, resolve_model_path, resume_diff

REPO = Path(__file__).resolve().parents[1]
RELAY = [sys.executable, "-P", "-m", "launcher.cli"]  # -P: the working directory is not on sys.path


def agentfly_data(tmp_path: Path, n: int = 4, words: int = 3) -> str:
    """AgentFly-format JSON: a list of {question, answer}."""
    rows = [{"question": f"What is {i} + {i}?" + " please" * words, "answer": str(2 * i)} for i in range(n)]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(rows, indent=1))
    return str(path)


def config(tmp_path: Path, model: str, *overrides: str):
    return load_config(["demo"], [
        f"actor_rollout_ref.model.path={model}",
        f"data.train_files=[{agentfly_data(tmp_path)}]",
        "data.val_files=[]",
        f"trainer.default_local_dir={tmp_path / 'run'}",
        *overrides,
    ])


def problems(cfg, **kwargs) -> list[str]:
    with pytest.raises(PreflightError) as e:
        preflight(cfg, **kwargs)
    for line in e.value.problems:
        assert "Traceback" not in line
    return e.value.problems


def test_a_good_config_passes_and_keeps_resolved_paths(tmp_path, tiny_model_dir):
    cfg, notes = preflight(config(tmp_path, tiny_model_dir))
    assert cfg.actor_rollout_ref.model.path == tiny_model_dir and notes == []
    assert not (tmp_path / "run").exists()  # nothing written, nothing started


# --------------------------------------------------------------------------- prompt length


def test_every_prompt_overlong_names_lengths_and_key(tmp_path, tiny_model_dir):
    [line] = problems(config(tmp_path, tiny_model_dir, "data.max_prompt_length=40"))
    assert line.startswith("every train prompt is longer than data.max_prompt_length=40: rendered train prompts")
    assert "tokens; raise data.max_prompt_length (e.g. data.max_prompt_length=512)" in line


def test_some_overlong_prompts_are_a_note(tmp_path, tiny_model_dir):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"question": "1+1", "answer": "2"}\n{"question": "%s", "answer": "9"}\n' % ("9" * 300))
    _, notes = preflight(config(tmp_path, tiny_model_dir, f"data.train_files=[{path}]", "data.max_prompt_length=200"))
    assert len(notes) == 1 and notes[0].startswith("data.max_prompt_length=200: 1 of 2 train prompts are longer")
    [line] = problems(config(tmp_path, tiny_model_dir, f"data.train_files=[{path}]", "data.max_prompt_length=200",
                             "data.filter_overlong_prompts=false"))
    assert line.startswith("1 of 2 train prompts are longer than data.max_prompt_length=200 (first: prompt 2,")
    assert line.endswith("and data.truncation=error; raise data.max_prompt_length, or set "
                         "data.filter_overlong_prompts=true or data.truncation=left|right")
    _, notes = preflight(config(tmp_path, tiny_model_dir, f"data.train_files=[{path}]", "data.max_prompt_length=200",
                                "data.filter_overlong_prompts=false", "data.truncation=left"))
    assert notes[0].startswith("data.truncation=left: 1 of 2 train prompts are cut to data.max_prompt_length=200")


# --------------------------------------------------------------------------- tools, reward, template, data


def test_tool_problems(tmp_path, tiny_model_dir):
    lines = problems(config(tmp_path, tiny_model_dir, "agent.tools=[google_search,answer,calculater]",
                            "agent.tool_configs.code_interpreter.wall_s=3"))
    assert lines == [
        "agent.tool_configs.code_interpreter: 'code_interpreter' is not in agent.tools ['google_search', 'answer', 'calculater']",
        "agent.tools: google_search: search needs exactly one of corpus= (a JSONL path) or endpoint= (a web search API); "
        "set agent.tool_configs.google_search.corpus=FILE.jsonl or agent.tool_configs.google_search.endpoint=URL",
        lines[2],
    ]
    assert lines[2].startswith("agent.tools: calculater: unknown tool 'calculater'; registered: [")
    assert lines[2].endswith("; did you mean 'calculator'?")


def test_tool_options_from_the_command_line(tmp_path, tiny_model_dir):
    corpus = REPO / "examples" / "data" / "qa_corpus.jsonl"
    cfg = config(tmp_path, tiny_model_dir, "agent.tools=[google_search,answer]",
                 f"agent.tool_configs.search.corpus={corpus}", "agent.tool_configs.search.top_k=1",
                 "data.max_prompt_length=1024")
    preflight(cfg)
    from envs.agents import agent_for_config
    from launcher.tiny_model import build_tokenizer

    search = agent_for_config(cfg, build_tokenizer()).tools["search"]
    import asyncio

    out = asyncio.run(search.call({"query": "Harbor Town founded"}, timeout_s=10, max_output_tokens=200))
    assert "Harbor Town" in out.text and out.text.count("Title") <= 1
    [line] = problems(config(tmp_path, tiny_model_dir, "agent.tools=[search]", "agent.tool_configs.search.corpus=/no/such.jsonl"))
    assert line.startswith("agent.tools: search: ") and "/no/such.jsonl" in line


def test_reward_template_and_agent_problems(tmp_path, tiny_model_dir):
    no_answer = tmp_path / "q.jsonl"
    no_answer.write_text('{"question": "1+1"}\n')
    lines = problems(config(tmp_path, tiny_model_dir, "agent.template=qwen3", f"data.train_files=[{no_answer}]"))
    assert lines == [
        "agent.template=qwen3: unknown chat template; known: chatml, llama3, qwen-chat, qwen2.5",
        f"agent.reward_name=math_reward_string_equal needs dataset field(s) ['answer'], but the rows of {no_answer} have ['question']",
    ]
    [line] = problems(config(tmp_path, tiny_model_dir, "agent.reward_name=gsm8k_rewrd"))
    assert line.startswith("agent.reward_name=gsm8k_rewrd: unknown reward 'gsm8k_rewrd'; registered: [")


def test_data_problems_name_file_and_row(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"question": "ok", "answer": "1"}\n{"question": "\xff"}\n')
    lines = problems(config(tmp_path, tiny_model_dir, f"data.train_files=[{bad}]", f"data.val_files=[{tmp_path / 'none.parquet'}]"))
    assert lines == [
        f"data.train_files: {bad}:2: not UTF-8 text: byte 0xff at column 15 (expected a JSON, JSONL or parquet file)",
        f"data.val_files: {tmp_path / 'none.parquet'}: no such file",
    ]


# --------------------------------------------------------------------------- models


def test_model_paths(tmp_path):
    with pytest.raises(PreflightError, match=r"^actor_rollout_ref.model.path=/no/model: no such model directory"):
        resolve_model_path("/no/model", "actor_rollout_ref.model.path")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PreflightError, match=r"the directory has no config.json"):
        resolve_model_path(str(tmp_path / "empty"), "actor_rollout_ref.model.path")


def fake_hub_cache(root: Path, repo_id: str, model_dir: str) -> Path:
    """A Hugging Face hub cache holding ``repo_id`` (its files copied from ``model_dir``), as `hf download` leaves it."""
    import shutil

    repo = root / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(model_dir, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def run_relay(args: list[str], cwd: Path = REPO, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), **env}
    return subprocess.run([*RELAY, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300)


def test_hub_ids_resolve_from_the_local_cache_in_train_and_eval(tmp_path, tiny_model_dir):
    cache = tmp_path / "hub"
    snapshot = fake_hub_cache(cache, "relay-test/tiny-chat", tiny_model_dir)
    data = agentfly_data(tmp_path)
    common = [f"data.train_files=[{data}]", f"trainer.default_local_dir={tmp_path / 'run'}"]
    ok = run_relay(["train", "--check", "actor_rollout_ref.model.path=relay-test/tiny-chat", *common], HF_HUB_CACHE=str(cache))
    assert ok.returncode == 0, ok.stderr
    assert "checks passed" in ok.stderr

    for args in (["train", "actor_rollout_ref.model.path=relay-test/not-fetched", *common],
                 ["eval", "--model", "relay-test/not-fetched", "--data", data, *common]):
        bad = run_relay(args, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="0")
        assert bad.returncode == 2
        err = bad.stderr.strip().splitlines()
        assert len(err) == 1 and "Traceback" not in bad.stderr
        assert err[0].startswith("error: actor_rollout_ref.model.path=relay-test/not-fetched: not a local directory "
                                 f"and not in the Hugging Face cache ({cache})")
        assert "`hf download relay-test/not-fetched`" in err[0]
    assert not (tmp_path / "run").exists()
    assert snapshot.is_dir()


def test_cli_reports_every_problem_before_starting_anything(tmp_path):
    run_dir = tmp_path / "run"
    bad = run_relay(["train", f"trainer.default_local_dir={run_dir}", "actor_rollout_ref.model.path=/no/model",
                     "agent.tools=[search]", "agent.reward_name=nope", f"data.train_files=[{tmp_path / 'x.jsonl'}]"])
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    lines = bad.stderr.strip().splitlines()
    assert lines[0] == "errors (4):"
    assert [line.split(":")[0].strip() for line in lines[1:]] == [
        "actor_rollout_ref.model.path=/no/model", "data.train_files", "agent.tools", "agent.reward_name=nope"]
    assert not run_dir.exists()  # no run directory, so no process was started

    typos = run_relay(["train", "actor_rollout_ref.rollout.max_model_lenn=4096", "data.trunction=left", "algorithm.gamma=x"])
    assert typos.returncode == 2
    assert typos.stderr.splitlines() == [
        "config errors (3):",
        "  unknown config key 'actor_rollout_ref.rollout.max_model_lenn'; did you mean 'actor_rollout_ref.rollout.max_model_len'?",
        "  unknown config key 'data.trunction'; did you mean 'data.truncation'?",
        "  algorithm.gamma: expected a number, got 'x'",
    ]


def test_multirun_is_a_sweep(tmp_path, tiny_model_dir):
    out = run_relay(["train", "--check", "--multirun", f"actor_rollout_ref.model.path={tiny_model_dir}",
                     f"data.train_files=[{agentfly_data(tmp_path)}]", f"trainer.default_local_dir={tmp_path / 'run'}",
                     "actor_rollout_ref.actor.optim.lr=1e-4,2e-4"])
    assert out.returncode == 0, out.stderr
    assert "checks passed (2 runs)" in out.stderr


# --------------------------------------------------------------------------- user tools and rewards


USER_CODE = textwrap.dedent('''
    def shout(text: str) -> str:
        """Upper-case the text.

        Args:
            text: what to shout.
        """
        return text.upper()

    def compute_score(data_source, solution_str, ground_truth, extra_info=None):
        return {"score": float(ground_truth in solution_str), "acc": ground_truth in solution_str, "pred": solution_str[-5:]}
''')


def test_user_tool_and_verl_reward_from_files(tmp_path, tiny_model_dir):
    (tmp_path / "my_code.py").write_text(USER_CODE)
    cfg = config(tmp_path, tiny_model_dir, f"agent.tools=[{tmp_path}/my_code.py:shout]",
                 f"custom_reward_function.path={tmp_path}/my_code.py", "data.max_prompt_length=1024")
    preflight(cfg)
    tool = get_tool(f"{tmp_path}/my_code.py:shout")
    assert tool.name == "shout"
    score = get_reward(cfg.agent.reward_name)
    traj = TrajectoryInfo(messages=[], num_turns=1, response_text="so it is 42")
    assert score(None, traj, answer="42", ground_truth="42", data_source="x") == {"reward": 1.0, "acc": 1.0}
    assert score(None, traj, answer="7")["reward"] == 0.0
    [line] = problems(config(tmp_path, tiny_model_dir, f"agent.reward_name={tmp_path}/my_code.py:scor"))
    assert line.startswith(f"agent.reward_name={tmp_path}/my_code.py:scor: '{tmp_path}/my_code.py:scor': ")
    assert "has no 'scor'" in line


def test_module_specs_load_from_the_working_directory_without_pythonpath(tmp_path, tiny_model_dir):
    pkg = tmp_path / "team_tools"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "qa.py").write_text(USER_CODE)
    (tmp_path / "train.jsonl").write_text('{"question": "say hi", "answer": "HI"}\n')
    out = run_relay(["train", "--check", f"actor_rollout_ref.model.path={tiny_model_dir}", "data.train_files=train.jsonl",
                     "agent.tools=[team_tools.qa:shout]", "agent.reward_name=team_tools.qa:compute_score",
                     "trainer.default_local_dir=run"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    missing = run_relay(["train", "--check", f"actor_rollout_ref.model.path={tiny_model_dir}", "data.train_files=train.jsonl",
                         "agent.tools=[team_tool.qa:shout]"], cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.startswith("error: agent.tools: team_tool.qa:shout: 'team_tool.qa:shout': no module named team_tool.qa")


# --------------------------------------------------------------------------- resume


def saved_run(tmp_path: Path, cfg) -> Path:
    run = Path(cfg.trainer.default_local_dir)
    (run / "checkpoints" / "global_step_2").mkdir(parents=True)
    (run / "checkpoints" / "global_step_2" / "COMPLETE").write_text("")
    (run / "config.yaml").write_text(dump_config(cfg))
    return run


def test_resume_refuses_a_changed_config_with_the_diff(tmp_path, tiny_model_dir):
    old, _ = preflight(config(tmp_path, tiny_model_dir, "trainer.total_training_steps=2"))
    run = saved_run(tmp_path, old)
    _, notes = preflight(config(tmp_path, tiny_model_dir, "trainer.total_training_steps=2", "trainer.save_freq=5"))
    assert notes == [f"trainer.resume_mode=auto: {run}/checkpoints/global_step_2 already reached "
                     "trainer.total_training_steps=2; nothing is left to train (raise trainer.total_training_steps to train longer)"]
    [line] = problems(config(tmp_path, tiny_model_dir, "actor_rollout_ref.actor.optim.lr=1e-4", "agent.max_turns=2"))
    assert line.splitlines() == [
        f"trainer.resume_mode=auto would resume {run}/checkpoints/global_step_2, trained with a different config:",
        "    actor_rollout_ref.actor.optim.lr: 0.0002 -> 0.0001",
        "    agent.max_turns: 4 -> 2",
        "  to start a new run, set a new trainer.experiment_name (now 'demo'); "
        "to start over in this directory, set trainer.resume_mode=disable",
    ]
    preflight(config(tmp_path, tiny_model_dir, "actor_rollout_ref.actor.optim.lr=1e-4", "trainer.resume_mode=disable"))


def test_resume_diff_ignores_what_does_not_change_training():
    a = load_config().model_dump(mode="json")
    b = load_config([], ["trainer.total_training_steps=9", "trainer.logger=[jsonl]", "transport.port=2000",
                         "actor_rollout_ref.rollout.num_actors=4", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
                         "data.val_files=[x.jsonl]"]).model_dump(mode="json")
    assert resume_diff(a, b) == []
    c = load_config([], ["data.train_files=[other.jsonl]", "algorithm.adv_estimator=rloo"]).model_dump(mode="json")
    assert resume_diff(a, c) == ["algorithm.adv_estimator: 'grpo' -> 'rloo'",
                                 "data.train_files: ['runs/demo/data/train.jsonl'] -> ['other.jsonl']"]


def test_help_shows_list_values_and_keys_lists_aliases():
    help_text = run_relay(["train", "--help"], COLUMNS="200").stdout
    assert "agent.tools=[calculator]" in help_text and "--multirun" in help_text and "--check" in help_text
    keys = run_relay(["keys", "max_prompt_length", "--aliases"])
    assert keys.returncode == 0
    assert "data.max_prompt_length = 512" in keys.stdout
    assert "generation.max_prompt_length -> data.max_prompt_length" in keys.stdout


# --------------------------------------------------------------------------- the fast tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "What is 17 * 23?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Déjà vu: ünïcode, emoji 🙂, tabs\tand\nnewlines"}],
    [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "<tool_call>{\"name\": \"calculator\"}</tool_call>"},
     {"role": "tool", "content": "4"}, {"role": "user", "content": "<|im_start|> inside text <|im_end|>"}],
    [{"role": "user", "content": "Hello\n\n\n   world\t\t! DON'T you'LL 12345 ¾ cafe\u0301 caf\u00e9 ﬁ"}],
]
TOOLS = [{"type": "function", "function": {"name": "calculator", "description": "Evaluate <arithmetic> & more",
                                             "parameters": {"type": "object", "properties": {"expr": {"type": "string"}}}}}]


def test_fast_tokenizer_renders_and_counts_as_transformers(tiny_model_dir):
    """The tiny model's own template and every named template of envs.templates, with and without
    tools and the generation prompt: the same text and the same ids as transformers'
    apply_chat_template, and the same ids for plain text."""
    from transformers import AutoTokenizer

    from envs.templates import CHAT_TEMPLATES
    from envs.fast_tokenizer import load_fast_tokenizer

    slow, fast = AutoTokenizer.from_pretrained(tiny_model_dir), load_fast_tokenizer(tiny_model_dir)
    assert fast is not None and fast.chat_template == slow.chat_template and fast.eos_token == slow.eos_token
    checked = 0
    for template in [None, *CHAT_TEMPLATES.values()]:
        for messages in CONVERSATIONS:
            for tools in (None, TOOLS):
                for gen in (True, False):
                    kw = dict(tools=tools, chat_template=template, add_generation_prompt=gen)
                    text = slow.apply_chat_template(messages, tokenize=False, **kw)
                    assert fast.apply_chat_template(messages, tokenize=False, **kw) == text
                    want = slow(text, add_special_tokens=False)["input_ids"]
                    assert fast.apply_chat_template(messages, tokenize=True, **kw) == want
                    assert fast([text, text[::-1]], add_special_tokens=False)["input_ids"] == \
                        slow([text, text[::-1]], add_special_tokens=False)["input_ids"]
                    checked += 1
    assert checked == (1 + len(CHAT_TEMPLATES)) * len(CONVERSATIONS) * 4


@pytest.mark.parametrize("agent", ["hf", "react", "code"])
def test_launcher_prompt_lengths_equal_the_learners(tmp_path, tiny_model_dir, agent):
    """The launcher's count (fast tokenizer) equals the learner's (transformers) for every agent
    type on AgentFly rows and verl chat-list rows with a system message."""
    from launcher.preflight import _length_counter
    from learner.prompts import prompt_lengths

    tools = {"hf": "[calculator]", "react": "[calculator,answer]", "code": "[code_interpreter]"}[agent]
    cfg = config(tmp_path, tiny_model_dir, f"agent.agent_type={agent}", f"agent.tools={tools}")
    rows = [{"question": f"What is {i} * {i + 7}? Explain <step> by step." * (i + 1), "answer": "1"} for i in range(5)]
    rows += [{"question": [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Combien font 2 + 2 ?"}],
              "answer": "4"}]
    fast = _length_counter(cfg)(rows)
    assert fast == prompt_lengths(cfg, rows)
    assert len(set(fast)) > 1


def test_fast_tokenizer_gives_way_to_transformers_when_it_would_differ(tmp_path, tiny_model_dir):
    """A tokenizer class with its own definition, a special token transformers would add, or
    legacy files: no fast tokenizer, and the check falls back to transformers' count."""
    import shutil

    from envs.fast_tokenizer import load_fast_tokenizer
    from launcher.preflight import _length_counter
    from learner.prompts import prompt_lengths

    def variant(name: str, edit=None, extra_file: str | None = None) -> Path:
        d = tmp_path / name
        shutil.copytree(tiny_model_dir, d)
        cfg_file = d / "tokenizer_config.json"
        tc = json.loads(cfg_file.read_text())
        if edit:
            edit(tc)
        cfg_file.write_text(json.dumps(tc))
        if extra_file:
            (d / extra_file).write_text("{}")
        return d

    def llama(d: Path) -> Path:
        model = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**model, "model_type": "llama"}))
        return d

    cases = [
        llama(variant("llama", lambda tc: tc.update(tokenizer_class="LlamaTokenizerFast"))),
        variant("new_special", lambda tc: tc.update(bos_token="<|not-in-the-vocab|>")),
        variant("legacy", extra_file="special_tokens_map.json"),
        variant("remote", lambda tc: tc.update(auto_map={"AutoTokenizer": ["x.Tok", None]})),
    ]
    for d in cases:
        assert load_fast_tokenizer(d) is None, d.name
    rows = [{"question": "What is 3 + 4?", "answer": "7"}]
    cfg = config(tmp_path, str(cases[0]))
    assert _length_counter(cfg)(rows) == prompt_lengths(cfg, rows)


TRICKY = ["Hello\n\n\n   world\t\t!", "DON'T you'LL 12345 ¾ ⅔", "cafe\u0301 caf\u00e9 ﬁ", "<|im_start|>x<|im_end|>\n\n"]


def test_fast_tokenizer_applies_qwen2s_pipeline_as_transformers_does(tmp_path, tiny_model_dir):
    """The tiny model's type is qwen2, so transformers builds ``Qwen2Tokenizer`` (NFC, Qwen's
    split regex) on its tokenizer.json's vocabulary rather than using that file's own
    pre-tokenizer, which tokenizes some texts differently: the fast tokenizer gives transformers'
    ids, also for a directory saved by ``Qwen2Tokenizer`` itself under a non-qwen2 model type."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from envs.fast_tokenizer import load_fast_tokenizer

    slow = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert type(slow).__name__ == "Qwen2Tokenizer"
    raw = Tokenizer.from_file(str(Path(tiny_model_dir) / "tokenizer.json"))
    want = slow(TRICKY, add_special_tokens=False)["input_ids"]
    assert [e.ids for e in raw.encode_batch(TRICKY, add_special_tokens=False)] != want  # the file alone differs
    assert load_fast_tokenizer(tiny_model_dir)(TRICKY, add_special_tokens=False)["input_ids"] == want

    saved = tmp_path / "saved"
    slow.save_pretrained(saved)
    model = json.loads((Path(tiny_model_dir) / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**model, "model_type": "llama"}))
    assert json.loads((saved / "tokenizer_config.json").read_text())["tokenizer_class"] == "Qwen2Tokenizer"
    slow2, fast2 = AutoTokenizer.from_pretrained(saved), load_fast_tokenizer(saved)
    assert fast2 is not None and fast2(TRICKY, add_special_tokens=False)["input_ids"] == slow2(TRICKY, add_special_tokens=False)["input_ids"]
    messages = CONVERSATIONS[2]
    assert fast2.apply_chat_template(messages, tools=TOOLS, add_generation_prompt=True) == \
        slow2.apply_chat_template(messages, tools=TOOLS, add_generation_prompt=True, tokenize=True, return_dict=False)


def test_fast_tokenizer_constants_match_transformers():
    """What envs/fast_tokenizer.py copies from transformers is what this transformers has."""
    import inspect

    import transformers.models.auto.tokenization_auto as auto
    from transformers.models.qwen2 import tokenization_qwen2

    from envs import fast_tokenizer as ft

    assert ft.QWEN2_PRETOKENIZE_REGEX == tokenization_qwen2.PRETOKENIZE_REGEX
    defaults = inspect.signature(tokenization_qwen2.Qwen2Tokenizer.__init__).parameters
    assert ft.QWEN2_DEFAULT_TOKENS == {k: defaults[k].default for k in ("unk_token", "eos_token", "pad_token")}
    assert defaults["bos_token"].default is None
    assert ft.QWEN2_MODEL_TYPES == {k for k, v in auto.TOKENIZER_MAPPING_NAMES.items() if v in ft.QWEN2_CLASSES}
    assert ft.MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS == set(auto.MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS)
    assert list(ft.MODEL_IDS_TO_TOKENIZERS_BACKEND) == auto.MODEL_IDS_TO_TOKENIZERS_BACKEND


def test_the_check_does_not_import_transformers_or_torch(tmp_path, tiny_model_dir):
    """``relay train --check``'s checks, prompt lengths included, run without importing
    transformers or torch (their import is what took 5-10 s)."""
    data = agentfly_data(tmp_path)
    code = textwrap.dedent(f"""
        import sys
        from configs.loader import load_config
        from launcher.preflight import preflight
        cfg = load_config(["demo"], ["actor_rollout_ref.model.path={tiny_model_dir}", "data.train_files=[{data}]",
                                     "data.val_files=[{data}]", "trainer.default_local_dir={tmp_path / 'run'}",
                                     "data.max_prompt_length=20"])
        try:
            preflight(cfg)
        except Exception as e:
            print(e)
        print(sorted(m for m in ("transformers", "torch") if m in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("every train prompt is longer than data.max_prompt_length=20")  # lengths were counted
    assert lines[-1] == "[]"


def test_fast_tokenizer_has_transformers_template_environment(tiny_model_dir):
    """The template globals and tags transformers gives: {% generation %}, loop controls, tojson
    without HTML escaping, strftime_now, a special token variable, and raise_exception."""
    import jinja2
    from transformers import AutoTokenizer

    from envs.fast_tokenizer import load_fast_tokenizer

    slow, fast = AutoTokenizer.from_pretrained(tiny_model_dir), load_fast_tokenizer(tiny_model_dir)
    template = (
        "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{% generation %}{{ m['role'] }}: {{ m['content'] }}{% endgeneration %}\n{% endfor %}"
        "{{ tools | tojson }} {{ pad_token }} {{ strftime_now('%Y') }}"
        "{% if add_generation_prompt %}{{ eos_token }}{% endif %}"
    )
    messages = CONVERSATIONS[2]
    for gen in (True, False):
        kw = dict(tools=TOOLS, chat_template=template, add_generation_prompt=gen, tokenize=False)
        assert fast.apply_chat_template(messages, **kw) == slow.apply_chat_template(messages, **kw)
    failing = "{{ raise_exception('no system role here') }}"
    for tok in (slow, fast):
        with pytest.raises(jinja2.exceptions.TemplateError, match="no system role"):
            tok.apply_chat_template(messages, chat_template=failing, tokenize=False)
