"""The typed Relay configuration: one pydantic model per section.

Key names follow verl (``actor_rollout_ref.actor.optim.lr``,
``algorithm.adv_estimator``...); AgentFly spellings (``agent.max_steps``,
``agent.init_args.*``, ``agent.backend``) are accepted by the loader through
its alias table (``configs/loader.py``) and land on these canonical fields.

Rules kept here:

- every field has a docstring (it becomes the field's description) and a
  default that runs the embedded tiny arithmetic demo on CPU;
- validators only *check*; values that follow from other values (run
  directory, clip bounds, critic model path...) are left as ``None`` or as a
  template here and filled in by ``configs.loader.derive``, the one place
  derived values are computed;
- no torch import: the CLI imports this module before torch so ``--help`` is
  instant.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from learner.algos import registry as algo_registry  # torch-free: names and rules of the algorithm choices


def _one_or_many(value: object) -> object:
    """Accept a single string where a list of strings is expected."""
    return [value] if isinstance(value, str) else value


StrList = Annotated[list[str], BeforeValidator(_one_or_many)]
"""A list of strings; a single string is read as a one-element list."""

KlEstimator = algo_registry.KL_ESTIMATORS.literal()
"""verl's KL estimators: ``kl``/``k1`` log-ratio, ``abs``, ``mse``/``k2`` half squared
log-ratio, ``low_var_kl``/``k3`` Schulman's unbiased low-variance estimator, ``full``
(``learner.algos.registry.KL_ESTIMATORS``)."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, docstrings are descriptions,
    values are not coerced across types (``true`` is not a number, ``2.5`` not an
    integer). The loader passes numbers typed for a text field as text."""

    model_config = ConfigDict(
        extra="forbid",
        use_attribute_docstrings=True,
        strict=True,
        validate_assignment=True,
    )


# --------------------------------------------------------------------------- agent


class McpServerConfig(Section):
    """One MCP server whose tools the agent may call (``agent.tools=[mcp:NAME]``)."""

    command: str | list[str] | None = None
    """Start a stdio server: an argv list, or one string split like a shell does."""
    url: str | None = None
    """Or connect to a streamable-HTTP server at this URL."""
    env: dict[str, str] = {}
    """Extra environment variables of a stdio server."""
    cwd: str | None = None
    """Working directory of a stdio server (default: the actor's)."""
    startup_timeout_s: float = Field(30.0, gt=0)
    """Longest wait for the server to start and answer ``initialize``."""

    @model_validator(mode="after")
    def _one_transport(self):
        if bool(self.command) == bool(self.url):
            raise ValueError("an MCP server needs exactly one of command (stdio) or url (streamable HTTP)")
        return self


class AgentConfig(Section):
    """The tool-using agent that plays each episode (AgentFly's ``agent`` section)."""

    use_agent: bool = True
    """Run multi-turn agent episodes with tools; false = one plain completion per prompt."""
    agent_type: Literal["hf", "react", "code", "external"] = "hf"
    """Turn logic: ``hf`` (chat template tool calls), ``react`` (Thought/Action text), ``code`` (code blocks),
    ``external`` (``agent.entrypoint`` plays the episode through the actor's OpenAI-compatible endpoint)."""
    entrypoint: str | None = None
    """``agent_type=external``: the harness, ``path/to/agent.py:run`` or ``package.module:run``, an
    ``async def run(row, client)`` given an ``openai.AsyncOpenAI`` bound to the episode; it returns
    the final answer (scored by ``reward_name``), a reward, or a dict with ``reward``."""
    episode_timeout_s: float = Field(600.0, gt=0)
    """``agent_type=external``: the longest an entrypoint may run for one episode (then truncated)."""
    mcp_servers: dict[str, McpServerConfig] = {}
    """MCP servers by name; ``agent.tools=[mcp:NAME]`` offers all of NAME's tools, e.g.
    ``agent.mcp_servers.calc.command='python calc_server.py'`` or ``.url=http://host:8000/mcp``."""
    tools: StrList = ["calculator"]
    """Tools the agent may call: registered names (``calculator``, ``answer``, ``search``,
    ``code_interpreter`` and their aliases), or a user tool as ``path/to/file.py:name`` or
    ``package.module:name`` (no ``PYTHONPATH`` needed)."""
    tool_configs: dict[str, dict[str, Any]] = {}
    """Options of a tool, by its name in ``tools``, passed to its factory:
    ``agent.tool_configs.search.corpus=docs.jsonl`` (or ``.endpoint=URL``, ``.top_k=5``),
    ``agent.tool_configs.code_interpreter.wall_s=5``."""
    template: str | None = None
    """Named chat template from ``envs``; None uses the tokenizer's own chat template."""
    reward_name: str = "math_reward_string_equal"
    """Reward function: a registered name (``envs/rewards``), or ``path/to/file.py:name`` /
    ``package.module:name``; verl's ``compute_score(data_source, solution_str, ground_truth,
    extra_info)`` signature is accepted too."""
    max_turns: int = Field(4, ge=1)
    """Most assistant turns per episode (AgentFly: ``max_steps``)."""
    num_chains: int = Field(8, ge=1)
    """Episodes sampled per prompt, the GRPO/RLOO group size (verl: ``actor_rollout_ref.rollout.n``)."""
    max_tokens_per_turn: int = Field(48, ge=1)
    """Most tokens sampled in one assistant turn."""
    tool_timeout_s: float = Field(10.0, gt=0)
    """A tool call running longer than this returns a timeout error to the model."""
    tool_max_output_tokens: int = Field(256, ge=1)
    """Tool output is truncated to this many tokens before it is shown to the model."""
    system_prompt: str | None = None
    """System prompt text; None uses the agent type's built-in prompt (which lists the tools)."""


class EnvConfig(Section):
    """Where episodes come from: Relay's own agents (``relay``) or an external environment package."""

    type: Literal["relay", "verifiers"] = "relay"
    """``relay``: ``agent.*`` plays ``data.*`` rows. ``verifiers``: the verifiers 0.4 environment
    ``env.id`` supplies the training rows (its taskset), plays each episode with its harness
    against the actor's OpenAI-compatible endpoint and scores it with its rubric
    (``agent.reward_name`` and ``data.train_files`` are not used; ``envs/verifiers_env.py``)."""
    id: str | None = None
    """``type=verifiers``: the environment's taskset, an importable module (``my_env``) that
    exports one ``vf.Taskset`` subclass."""
    args: dict[str, Any] = {}
    """``type=verifiers``: options of the taskset's config (``env.args.difficulty=hard``)."""
    size: int | None = Field(None, ge=1)
    """``type=verifiers``: train on the taskset's first N tasks; None = all (an endless taskset needs N)."""
    max_concurrent_episodes: int | None = Field(None, ge=1)
    """``type=verifiers``: episodes one actor plays at once (verifiers runs each episode's harness,
    and a task's own toolsets, as processes of their own); None = 2 per CPU core of the machine,
    at most ``actor_rollout_ref.rollout.max_concurrent_episodes``."""


# --------------------------------------------------------------------------- algorithm


class KlControlConfig(Section):
    """Controller of the KL-in-reward coefficient (verl ``algorithm.kl_ctrl``).

    Kept as one flat model rather than a union on ``type`` because verl configs
    set ``target_kl``/``horizon`` even with the fixed controller.
    """

    type: Literal["fixed", "adaptive"] = "fixed"
    """``fixed`` keeps ``kl_coef``; ``adaptive`` steers it towards ``target_kl`` (Ziegler et al.)."""
    kl_coef: float = Field(0.001, ge=0)
    """Initial (fixed: constant) coefficient of the KL penalty subtracted from the reward."""
    target_kl: float = Field(0.1, gt=0)
    """Adaptive controller only: the KL per step it aims for."""
    horizon: int = Field(10000, ge=1)
    """Adaptive controller only: steps over which the coefficient adapts."""


class FilterGroupsConfig(Section):
    """DAPO dynamic sampling: the coordinator drops every completed group whose episodes all scored
    the same (no learning signal) and grants more prompts until the batch is full."""

    enable: bool = False
    """Drop zero-variance groups before they count for the batch."""
    metric: str = "reward"
    """What must vary within a group: ``reward`` (the episode reward) or the name of one of the
    reward's components (verl's ``acc``, ``score``, ...)."""
    max_num_gen_batches: int = Field(10, ge=0)
    """Most zero-variance groups dropped per learner step, in batches of ``data.train_batch_size``;
    past it the step trains on what arrives (logged). 0 = no cap."""


class AlgorithmConfig(Section):
    """Advantage estimation, KL-in-reward and off-policy handling (verl ``algorithm``)."""

    adv_estimator: algo_registry.ESTIMATORS.literal() = "grpo"
    """Advantage estimator; ``gae`` trains the critic, the others are critic-free."""
    gamma: float = Field(1.0, ge=0, le=1)
    """Discount factor over tokens (GAE, REINFORCE++)."""
    lam: float = Field(1.0, ge=0, le=1)
    """GAE lambda."""
    norm_adv_by_std_in_grpo: bool = True
    """GRPO: divide group-centred rewards by the group's std (false = Dr. GRPO)."""
    use_kl_in_reward: bool = False
    """Subtract ``kl_ctrl.kl_coef * KL(policy || ref)`` from the token rewards."""
    kl_penalty: KlEstimator = "kl"
    """KL estimator used for the in-reward penalty."""
    kl_ctrl: KlControlConfig = Field(default_factory=KlControlConfig)
    """KL-in-reward coefficient controller."""
    max_staleness: int = Field(1, ge=0)
    """Most policy versions a trajectory may lag the learner before it is dropped; 0 = synchronous on-policy."""
    filter_groups: FilterGroupsConfig = Field(default_factory=FilterGroupsConfig)
    """DAPO's dynamic sampling (verl ``algorithm.filter_groups``)."""
    off_policy_correction: algo_registry.OFF_POLICY_CORRECTIONS.literal() = "decoupled"
    """Stale-sample / train-inference mismatch correction, with rho = pi_prox / pi_behav (the
    learner's recomputed log-probs before the update over the actor's sampling log-probs):
    ``none`` clips the ratio against the actor's log-probs, weight 1; every other one clips
    against the proximal log-probs and weights each token's loss: ``decoupled`` PPO (AReaL) by
    rho, tokens with rho above ``behav_imp_weight_cap`` masked; ``tis`` by min(rho, ``tis_cap``);
    ``seq_tis`` by min(prod rho over the episode, ``tis_cap``); ``seq_mis`` by prod rho, episodes
    above ``seq_mis_cap`` masked; ``geo_mis`` by rho, episodes whose geometric-mean rho is outside
    [1/``geo_mis_bound``, ``geo_mis_bound``] masked; ``icepop`` by rho, tokens outside
    [1/``icepop_beta``, ``icepop_beta``] masked. See docs/algorithms.md."""
    tis_cap: float = Field(2.0, ge=1)
    """Upper bound of the truncated importance weight of ``tis`` (per token) and ``seq_tis`` (per
    episode); must be >= 1 (a cap below 1 would shrink every on-policy token)."""
    behav_imp_weight_cap: float | None = Field(5.0, gt=1)
    """``decoupled``: tokens whose importance weight pi_prox / pi_behav exceeds this are masked
    out of the loss (AReaL's ``behav_imp_weight_cap``; the masked fraction is logged as
    ``actor/is_masked_frac``); null = no cap."""
    seq_mis_cap: float = Field(2.0, gt=1)
    """``seq_mis``: an episode whose importance weight prod_t pi_prox / pi_behav exceeds this is masked."""
    geo_mis_bound: float = Field(1.05, gt=1)
    """``geo_mis``: an episode whose geometric-mean ratio exp(mean_t log pi_prox / pi_behav) is
    outside [1/bound, bound] is masked."""
    icepop_beta: float = Field(2.0, gt=1)
    """``icepop``: a token whose ratio pi_prox / pi_behav is outside [1/beta, beta] is masked."""
    log_ratio_clamp: float = Field(20.0, gt=0)
    """Log-ratios are clamped to +-this before ``exp`` to keep ratios finite."""
    overlong_buffer_len: int = Field(0, ge=0)
    """DAPO overlong reward shaping: an episode whose response (every token after the prompt) is
    longer than ``rollout.response_length`` minus this many tokens loses reward linearly, up to
    ``overlong_penalty_factor`` at the budget; 0 = off."""
    overlong_penalty_factor: float = Field(1.0, ge=0)
    """DAPO overlong reward shaping: the penalty at the full response budget."""
    loss_filters: list[algo_registry.SAMPLE_FILTERS.literal()] = []
    """Episodes taken out of the policy loss (and its normaliser): ``overlong`` = truncated by the
    token budget or a turn's token limit (DAPO overlong filtering); ``zero_variance`` = groups whose
    rewards are all equal (DAPO dynamic sampling without refilling the batch). Logged as
    ``actor/filtered_frac/<name>``."""


# --------------------------------------------------------------------------- data


class DataConfig(Section):
    """Prompt datasets (verl ``data``)."""

    train_files: StrList = ["runs/demo/data/train.jsonl"]
    """Training prompt files (JSON list, JSONL or parquet; AgentFly rows ``{question, answer}``
    or verl rows ``{prompt: [chat messages], reward_model: {ground_truth}, extra_info}``),
    paths relative to the working directory."""
    val_files: StrList = []
    """Validation prompt files, same formats; empty = no validation."""
    source: str | None = None
    """Generated training prompts instead of ``train_files``: ``reasoning_gym:NAME`` (a reasoning-gym
    task, e.g. ``reasoning_gym:basic_arithmetic``; score with ``agent.reward_name=reasoning_gym``)."""
    source_options: dict[str, Any] = {}
    """Options of ``source``: ``size`` (rows, default 1000), ``seed`` (default ``data.seed``), and the
    generator's own options (``data.source_options.max_terms=4``)."""
    train_batch_size: int = Field(8, ge=1)
    """Prompts per learner step (each expands to ``agent.num_chains`` episodes)."""
    val_batch_size: int = Field(32, ge=1)
    """Prompts per validation batch."""
    prompt_key: str = "question"
    """Column holding the prompt: text, or a chat list of ``{role, content}`` messages. With
    ``question`` and rows that lack it but have verl's ``prompt``, ``prompt`` is used."""
    shuffle: bool = True
    """Shuffle the training prompts every epoch."""
    seed: int = 0
    """Seed of the training-prompt shuffle."""
    max_prompt_length: int = Field(512, ge=1)
    """Longest prompt in tokens, rendered by the agent (template, system prompt, tool descriptions)."""
    filter_overlong_prompts: bool = True
    """Drop training and validation prompts longer than ``max_prompt_length`` when the learner
    loads them (logged once). False hands every prompt to ``truncation``."""
    truncation: Literal["error", "left", "right"] = "error"
    """Prompts still longer than ``max_prompt_length`` (``filter_overlong_prompts=false``):
    ``error`` stops before start-up naming the row; ``left``/``right`` cut the row's prompt
    text from the start/end until the rendered prompt fits."""


# --------------------------------------------------------------------------- trainer


class TrainerConfig(Section):
    """Run bookkeeping: length, logging, checkpoints, hardware (verl ``trainer``)."""

    max_actor_restarts: int = Field(3, ge=0)
    """Times ``relay train`` / ``relay actor`` start a dead actor process again (backoff 1 s,
    doubling to 30 s) before its death fails the run; the learner requeues what it held."""
    stall_timeout_s: float = Field(300.0, ge=0)
    """When no step or validation round finishes for this long (start-up included), the launcher
    dumps every process's stacks and the learner's state, names the stuck process, and applies
    ``stall_action``; 0 disables the watchdog."""
    stall_action: Literal["stop", "wait"] = "stop"
    """After a stall report: ``stop`` the run (exit 1) or ``wait`` and report again."""

    project_name: str = "relay"
    """Project name for loggers and the run directory."""
    experiment_name: str = "demo"
    """Experiment name for loggers and the run directory."""
    logger: list[Literal["console", "jsonl", "wandb", "tensorboard"]] = ["console", "jsonl"]
    """Metric sinks; ``jsonl`` writes ``metrics.jsonl`` in the run directory."""
    total_training_steps: int | None = Field(None, ge=1)
    """Learner steps to run; None = ``total_epochs`` passes over the training prompts."""
    total_epochs: int = Field(1, ge=1)
    """Passes over the training prompts when ``total_training_steps`` is None."""
    nnodes: int = Field(1, ge=1)
    """Nodes running learner processes."""
    n_gpus_per_node: int | None = Field(None, ge=1)
    """Learner processes per node (one per GPU; on CPU, CPU ranks). None = chosen for this machine
    when the run starts (``launcher.shape.fit_shape``): every GPU, or on CPU one rank per 8 cores,
    at least 1; the choice is printed."""
    save_freq: int = -1
    """Save a checkpoint every this many learner steps; -1 disables periodic saves."""
    test_freq: int = -1
    """Validate every this many learner steps; -1 disables periodic validation."""
    val_before_train: bool = True
    """Run one validation pass before the first learner step."""
    critic_warmup: int = Field(0, ge=0)
    """Learner steps that train only the critic before the actor starts updating (``gae``)."""
    resume_mode: Literal["auto", "disable", "resume_path"] = "auto"
    """``auto`` resumes from the newest checkpoint in the run directory if any; ``disable``
    starts fresh; ``resume_path`` resumes from ``resume_from_path``."""
    resume_from_path: str | None = None
    """Checkpoint directory to resume from when ``resume_mode`` is ``resume_path``."""
    default_local_dir: str = "runs/{project_name}/{experiment_name}"
    """Run directory (checkpoints, metrics, logs); ``{project_name}`` and
    ``{experiment_name}`` are filled in by ``derive``."""
    max_ckpt_to_keep: int = Field(2, ge=1)
    """Newest checkpoints kept in the run directory; older ones are deleted."""
    dump_batches: bool = False
    """Write every trained batch (the broadcast trajectories, msgpack) to
    ``<run dir>/batches/step_NNNNNN.msgpack`` so it can be replayed (``learner.replay``)."""
    seed: int = 0
    """Global seed of model init, sampling and the learner."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where learner and actors run; ``auto`` = cuda when a GPU is visible, else cpu."""


# --------------------------------------------------------------------------- actor_rollout_ref


class OptimConfig(Section):
    """AdamW optimizer with an optional warmup and cosine schedule (verl ``optim``)."""

    lr: float = Field(1e-4, gt=0)
    """Peak learning rate."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW decoupled weight decay."""
    betas: tuple[float, float] = Field((0.9, 0.999), strict=False)
    """AdamW (beta1, beta2)."""
    lr_warmup_steps_ratio: float = Field(0.0, ge=0, le=1)
    """Fraction of the total learner steps spent warming the learning rate up linearly from 0."""
    warmup_style: Literal["constant", "cosine"] = "constant"
    """Schedule after warmup: ``constant`` or ``cosine`` decay to ``min_lr_ratio * lr``."""
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    """Cosine schedule floor as a fraction of ``lr``."""


class FsdpConfig(Section):
    """FSDP memory options of one model (verl ``fsdp_config``)."""

    param_offload: bool = False
    """Keep parameters on CPU between uses (GPU only)."""
    optimizer_offload: bool = False
    """Keep optimizer state on CPU between steps (GPU only)."""
    mixed_precision: Literal["auto", "bf16", "fp32"] = "auto"
    """Compute dtype of the FSDP2 forward/backward (``MixedPrecisionPolicy``): ``bf16`` casts
    parameters to bf16 for compute and reduces gradients in fp32 (master weights and optimizer
    state stay fp32), on GPU or CPU; ``fp32`` never casts; ``auto`` = bf16 on GPU, fp32 on CPU."""


class ActorConfig(Section):
    """The policy's PPO-style update (verl ``actor_rollout_ref.actor``)."""

    optim: OptimConfig = Field(default_factory=OptimConfig)
    """Policy optimizer."""
    ppo_mini_batch_size: int = Field(4, ge=1)
    """Prompts per optimizer step (all ``agent.num_chains`` episodes of each); must divide
    ``data.train_batch_size``."""
    ppo_micro_batch_size_per_gpu: int = Field(8, ge=1)
    """Trajectories per forward/backward pass on one learner process (gradient accumulation)."""
    use_dynamic_bsz: bool = False
    """Form each forward/backward pass by a token budget (``ppo_max_token_len_per_gpu``) instead
    of ``ppo_micro_batch_size_per_gpu`` trajectories (verl's dynamic batch size): many short
    episodes share a pass, a long one gets a pass alone. The gradient is the same either way."""
    ppo_max_token_len_per_gpu: int = Field(16384, ge=1)
    """``use_dynamic_bsz``: most tokens in one pass on one learner process, counted as the pass
    runs them (its trajectories, longest first, times the longest one's prompt plus response
    tokens); a trajectory longer than this is a pass alone."""
    ppo_epochs: int = Field(1, ge=1)
    """Passes over each learner batch."""
    grad_clip: float = Field(1.0, gt=0)
    """Global gradient-norm clip."""
    clip_ratio: float = Field(0.2, gt=0)
    """PPO clip epsilon; default for ``clip_ratio_low`` and ``clip_ratio_high``."""
    clip_ratio_low: float | None = Field(None, gt=0)
    """Lower clip epsilon (ratio >= 1 - low); None = ``clip_ratio`` (filled by ``derive``)."""
    clip_ratio_high: float | None = Field(None, gt=0)
    """Upper clip epsilon (ratio <= 1 + high, DAPO clip-higher); None = ``clip_ratio``."""
    clip_ratio_c: float = Field(3.0, gt=1)
    """Dual-clip bound for negative advantages (Ye et al. 2020); must exceed 1."""
    loss_mode: algo_registry.POLICY_LOSSES.literal() = "vanilla"
    """Policy loss (verl ``policy_loss.loss_mode``): ``vanilla`` clipped PPO with dual clip;
    ``gspo`` the same clip on the episode's geometric-mean ratio (GSPO; use
    ``loss_agg_mode=seq-mean-token-mean`` and small clip ratios, e.g. 3e-4 / 4e-4); ``cispo``
    REINFORCE weighted by the detached ratio clipped to [1 - clip_ratio_low, 1 + clip_ratio_high]
    (CISPO); ``clip_cov`` / ``kl_cov`` (Cui et al. 2025) cut the gradient of, or add a KL term
    to, the tokens whose advantage/log-prob covariance is high. See docs/algorithms.md."""
    clip_cov_ratio: float = Field(0.0002, gt=0, le=1)
    """``loss_mode=clip_cov``: fraction of a micro-batch's tokens whose gradient is cut (verl
    ``policy_loss.clip_cov_ratio``)."""
    clip_cov_lb: float = 1.0
    """``loss_mode=clip_cov``: only tokens whose covariance is above this are cut."""
    clip_cov_ub: float = 5.0
    """``loss_mode=clip_cov``: only tokens whose covariance is below this are cut."""
    kl_cov_ratio: float = Field(0.0002, gt=0, le=1)
    """``loss_mode=kl_cov``: fraction of a micro-batch's tokens (largest covariance) that get the
    KL term (verl ``policy_loss.kl_cov_ratio``)."""
    kl_cov_coef: float = Field(1.0, ge=0)
    """``loss_mode=kl_cov``: weight of abs(log pi - log pi_old) on those tokens (verl
    ``policy_loss.ppo_kl_coef``)."""
    loss_agg_mode: algo_registry.LOSS_AGG_MODES.literal() = "token-mean"
    """How token losses are reduced to one number (verl names): ``token-mean`` (every token of
    the mini-batch weighs the same), ``seq-mean-token-sum``, ``seq-mean-token-mean`` (GRPO: every
    episode weighs the same), ``seq-mean-token-sum-norm`` (Dr. GRPO: token sums over the constant
    ``loss_agg_horizon``). Exact across micro-batches, mini-batches and ranks."""
    loss_agg_horizon: int | None = Field(None, ge=1)
    """The constant divisor of ``seq-mean-token-sum-norm`` (Dr. GRPO's horizon); None = the
    response budget ``actor_rollout_ref.rollout.response_length`` (filled in by ``derive``)."""
    entropy_coeff: float = 0.0
    """Weight of the entropy bonus (subtracted from the loss)."""
    use_kl_loss: bool = False
    """Add ``kl_loss_coef * KL(policy || ref)`` to the loss (GRPO-style); needs the ref model."""
    kl_loss_coef: float = Field(0.001, ge=0)
    """Weight of the KL loss."""
    kl_loss_type: KlEstimator = "low_var_kl"
    """KL estimator of the KL loss."""
    fsdp_config: FsdpConfig = Field(default_factory=FsdpConfig)
    """FSDP memory options of the policy."""


class ModelConfig(Section):
    """The policy model (verl ``actor_rollout_ref.model``)."""

    path: str = "tiny"
    """Hugging Face id or local directory; ``tiny`` = the embedded tiny demo model."""
    enable_gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    use_remove_padding: bool = False
    """Pack each learner forward's rows into one row without padding (policy, proximal and reference
    passes; positions restart per sequence and transformers builds the per-sequence causal mask:
    varlen flash-attention where the model runs with it, else SDPA with a block mask). Pays when
    padding is large and attention is cheap next to the MLP: forward+backward measured on CPU at 25%
    padding, 1.11x faster at Qwen2.5-0.5B width, 1.23x slower on the tiny demo model."""
    share_prefix: bool = True
    """The rows of a prompt group run the tokens they all start with (the prompt) through the policy
    and the reference once per learner forward, each row's remaining tokens attending to that
    prefix and to themselves (``learner.packing``): the same log-probs and gradients as the padded
    forward (tested to float rounding) on fewer tokens. Used per micro-batch where the model's
    attention is SDPA (not flash-attention) and the layout is smaller than the padded batch (a long
    response after a short prompt shares little); it then takes the place of
    ``use_remove_padding``. ``bench/bench_learner.py``'s shared-prompt case (groups of 4 rows, the
    prompt 72% of each): 6,755 tokens/s against 4,126 without; on the demo SFT model's 4 x 8 job the
    learner step took 0.036 s instead of 0.084 s."""
    lora_rank: int = Field(0, ge=0)
    """LoRA rank; 0 trains all weights."""
    lora_alpha: int = Field(16, ge=1)
    """LoRA scaling alpha."""
    target_modules: list[str] | str = "all-linear"
    """Modules LoRA wraps: ``all-linear`` or a list of module names."""


class RolloutConfig(Section):
    """Actor processes and their inference engine (verl ``actor_rollout_ref.rollout``)."""

    name: Literal["hf", "vllm"] = "hf"
    """Inference engine: ``hf`` (transformers, CPU or GPU) or ``vllm``."""
    hf_engine_process: bool = False
    """``hf`` engine: serve it from a process of its own beside the actor's (``actors.engines.hf_process``,
    as vLLM runs its engine core), so the episodes' Python runs on another core than the engine's steps.
    Off by default: measured on this 2-core CPU with the demo's tiny model it is slower than the engine on
    the actor's event loop (``bench/bench_actor.py`` multi-turn ``ratio_turns``, 8 interleaved runs each:
    median 0.74 against 0.97); there a finished turn's next one joins the child's steps one step later and
    every step's results cross a socket (which of these costs what is not traced). Not run on a GPU yet."""
    num_actors: int | None = Field(None, ge=1)
    """Actor processes generating episodes. None = chosen for this machine when the run starts
    (``launcher.shape.fit_shape``): on CPU one per 2 cores left beside the learner ranks, at least
    1 (2 cores: 1 learner rank + 1 actor); with GPUs, one."""
    temperature: float = Field(1.0, ge=0)
    """Sampling temperature for training episodes."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass; 1.0 disables it."""
    top_k: int = -1
    """Top-k sampling; -1 disables it."""
    response_length: int = Field(256, ge=1)
    """Total tokens the model may sample in one episode, summed over turns."""
    max_concurrent_episodes: int = Field(64, ge=1)
    """Episodes one actor runs at once."""
    tensor_model_parallel_size: int = Field(1, ge=1)
    """vLLM tensor-parallel GPUs per actor."""
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    """Fraction of GPU memory vLLM may take."""
    cpu_kvcache_space_gb: float = Field(1, gt=0)
    """KV-cache size of vLLM on CPU, in GiB."""
    log_prob_micro_batch_size_per_gpu: int = Field(16, ge=1)
    """Trajectories per forward pass when the learner recomputes old log-probs."""
    log_prob_use_dynamic_bsz: bool | None = None
    """Form those passes by a token budget (``log_prob_max_token_len_per_gpu``) instead of
    ``log_prob_micro_batch_size_per_gpu`` trajectories; None = ``actor.use_dynamic_bsz``."""
    log_prob_max_token_len_per_gpu: int | None = Field(None, ge=1)
    """Token budget of one such pass (counted as ``actor.ppo_max_token_len_per_gpu``); None =
    ``actor.ppo_max_token_len_per_gpu``."""
    weight_update_mode: Literal["between_episodes", "in_flight"] = "between_episodes"
    """``between_episodes``: new weights are loaded once running episodes finish;
    ``in_flight``: loaded between turns, so one episode may span policy versions."""
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Dtype the engines serve, and so the dtype the learner gathers and sends its weights in:
    ``auto`` = bf16 when the actors have a GPU, fp32 on CPU (the learner trains fp32 there, so
    learner and engine log-probs agree to ~1e-6)."""
    max_logprob_diff: float | None = Field(0.5, gt=0)
    """Guard: per actor and step, the mean |learner - engine| log-prob of the tokens it sampled with
    exactly the weights the learner holds (numerics alone: ~1e-6 fp32, ~1e-2 with a bf16 engine).
    Past it the run stops with an error naming the actor and version (an engine serving weights
    other than the published ones); None = only report it (``actor/logprob_abs_diff_same_version``
    over all actors, ``..._max`` for the worst one)."""
    val_temperature: float = Field(0.0, ge=0)
    """Sampling temperature for validation (0 = greedy); verl ``val_kwargs.temperature``."""
    val_do_sample: bool = True
    """verl ``val_kwargs.do_sample``: false validates greedily whatever ``val_temperature`` is."""
    val_n: int = Field(1, ge=1)
    """Samples per validation prompt (verl ``val_kwargs.n``); ``val/accuracy`` and
    ``val/reward_mean`` average over all of them (verl's mean@n)."""
    max_model_len: int | None = Field(None, ge=1)
    """Longest sequence (prompt plus response) an actor holds; None = the model's
    ``max_position_embeddings``. An episode stops when its context is full."""
    enforce_eager: bool | None = None
    """vLLM: skip CUDA graphs and compilation (faster start, slower decode); None = only on CPU."""
    max_num_batched_tokens: int | None = Field(None, ge=1)
    """vLLM: most tokens its scheduler batches in one step; None = vLLM's default."""


class RefConfig(Section):
    """The frozen reference policy used for KL terms (verl ``actor_rollout_ref.ref``)."""

    fsdp_config: FsdpConfig = Field(default_factory=FsdpConfig)
    """FSDP memory options of the reference model."""
    log_prob_micro_batch_size_per_gpu: int = Field(16, ge=1)
    """Trajectories per forward pass when computing reference log-probs."""
    log_prob_use_dynamic_bsz: bool | None = None
    """Form those passes by a token budget (``log_prob_max_token_len_per_gpu``) instead of
    ``log_prob_micro_batch_size_per_gpu`` trajectories; None = ``actor.use_dynamic_bsz``."""
    log_prob_max_token_len_per_gpu: int | None = Field(None, ge=1)
    """Token budget of one such pass (counted as ``actor.ppo_max_token_len_per_gpu``); None =
    ``actor.ppo_max_token_len_per_gpu``."""


class ActorRolloutRefConfig(Section):
    """Policy model, its update, its rollout engine and the reference model."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    """The policy model."""
    actor: ActorConfig = Field(default_factory=ActorConfig)
    """The policy update."""
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    """Actor processes and sampling."""
    ref: RefConfig = Field(default_factory=RefConfig)
    """Reference model for KL terms."""


# --------------------------------------------------------------------------- critic


class CriticModelConfig(Section):
    """The value model (verl ``critic.model``)."""

    path: str | None = None
    """Hugging Face id or local directory; None = the policy's ``actor_rollout_ref.model.path``."""
    fsdp_config: FsdpConfig = Field(default_factory=FsdpConfig)
    """FSDP memory options of the value model."""


class CriticConfig(Section):
    """The value model and its update, used only by ``algorithm.adv_estimator=gae``."""

    model: CriticModelConfig = Field(default_factory=CriticModelConfig)
    """The value model."""
    optim: OptimConfig = Field(default_factory=OptimConfig)
    """Critic optimizer."""
    ppo_mini_batch_size: int | None = Field(None, ge=1)
    """Prompts per critic optimizer step; None = the actor's ``ppo_mini_batch_size``."""
    ppo_micro_batch_size_per_gpu: int | None = Field(None, ge=1)
    """Trajectories per critic forward/backward pass; None = the actor's value."""
    cliprange_value: float = Field(0.5, gt=0)
    """Value-function clip range around the old values."""
    ppo_epochs: int = Field(1, ge=1)
    """Passes over each learner batch for the critic."""


# --------------------------------------------------------------------------- custom reward


class RewardConfig(Section):
    """Calling ``agent.reward_name`` on finished episodes (``envs.rewards.run_reward``)."""

    timeout_s: float = Field(120.0, gt=0)
    """Longest one reward call may take; past it the group fails with an error naming the reward and
    the sample (the call's thread cannot be stopped and is abandoned). ``code_reward`` needs up to
    ceil(tests / 4) x 10 s for its sandboxes."""


class CustomRewardConfig(Section):
    """verl's ``custom_reward_function``: a reward loaded from a Python file."""

    path: str | None = None
    """Python file (or ``package.module``) holding the reward; set, it replaces
    ``agent.reward_name`` with ``path:name`` (filled in by ``derive``)."""
    name: str = "compute_score"
    """Function in ``path``: verl's ``compute_score(data_source, solution_str, ground_truth,
    extra_info)`` or Relay's ``fn(final_answer, trajectory, **row_fields)``."""


# --------------------------------------------------------------------------- transport


class TransportConfig(Section):
    """How actors and learner talk: ZMQ trajectories/control and the weight channel."""

    host: str = "127.0.0.1"
    """Address actors connect to to reach the learner."""
    bind_host: str = "127.0.0.1"
    """Interface the learner binds (loopback by default; multi-node: an interface address or 0.0.0.0)."""
    port: int = Field(0, ge=0, le=65534)
    """Learner's first port (it uses ``port`` and ``port + 1``); 0 = pick free ports."""
    min_actors: int = Field(1, ge=1)
    """Training work is granted only once this many actors have registered (``relay train`` sets it to its
    number of local actors, so a slow-starting engine is not left without work)."""
    trajectory_hwm: int = Field(1024, ge=1)
    """ZMQ high-water mark of the trajectory socket: trajectories queued before senders block."""
    heartbeat_interval_s: float = Field(2.0, gt=0)
    """Seconds between heartbeats each peer sends."""
    peer_timeout_s: float = Field(60.0, gt=0)
    """A peer silent this long is declared dead."""
    recv_timeout_s: float = Field(600.0, gt=0)
    """Longest blocking receive before it gives up with an error naming what it waited for."""
    weights: Literal["zmq", "filesystem", "nccl"] = "zmq"
    """Weight channel learner -> actors: ``zmq`` (chunked over the socket), ``filesystem``
    (safetensors in ``weights_dir``), ``nccl`` (GPU broadcast)."""
    weights_dir: str | None = None
    """Directory for ``weights=filesystem``; None = ``<trainer.default_local_dir>/weights``."""
    weights_chunk_mb: int = Field(64, ge=1)
    """Unused: weights travel in buckets of ``weights_bucket_mb`` (kept so older configs load)."""
    weights_bucket_mb: int = Field(256, ge=1)
    """Weights are gathered from the FSDP shards, checksummed and sent (zmq message, filesystem
    shard, nccl broadcasts) in buckets of at most this many MiB; a larger tensor (an embedding) is gathered and
    sent as row pieces in successive buckets, so the filesystem transport holds about one bucket
    on learner rank 0 (plus the piece being gathered) whatever the model size."""
    weights_window: int = Field(2, ge=0)
    """Buckets learner rank 0 may hold while it streams a version (``weights=zmq`` and ``nccl``).
    Each bucket is sent to the actors as soon as it is gathered and freed once every actor behind
    it has received it, so rank 0 holds about ``weights_window`` buckets (or the largest tensor)
    whatever the model size. ``zmq`` announces the version when its stream opens; ``nccl``
    announces a round and streams it once every actor joined (within ``weights_subscribe_s``,
    else that version is gathered whole and broadcast by a thread when they join). 0 = gather the
    whole version first (one copy of the model in the serve dtype; zmq keeps it until the next
    publish, so actors may fetch at any time)."""
    weights_subscribe_s: float = Field(10.0, gt=0)
    """Streaming: ``weights=zmq``: how long a new version's stream waits for an actor that has not
    asked for it yet before streaming past it; that actor gets the version sent again when it
    asks (the learner re-publishes while it waits for data) or takes the next one.
    ``weights=nccl``: how long a round waits for every actor to join before it is handed, whole,
    to the broadcast thread (training goes on; the thread waits up to ``recv_timeout_s``)."""


# --------------------------------------------------------------------------- root


class RelayConfig(Section):
    """A whole Relay run. Build it with ``configs.loader.load_config``."""

    agent: AgentConfig = Field(default_factory=AgentConfig)
    """The tool-using agent."""
    env: EnvConfig = Field(default_factory=EnvConfig)
    """Relay's agents or an external environment (verifiers)."""
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    """Advantage estimator, KL-in-reward, staleness."""
    data: DataConfig = Field(default_factory=DataConfig)
    """Prompt datasets."""
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    """Run length, logging, checkpoints, hardware."""
    actor_rollout_ref: ActorRolloutRefConfig = Field(default_factory=ActorRolloutRefConfig)
    """Policy model, update, rollout and reference."""
    critic: CriticConfig = Field(default_factory=CriticConfig)
    """Value model (``gae`` only)."""
    transport: TransportConfig = Field(default_factory=TransportConfig)
    """Actor-learner messaging."""
    custom_reward_function: CustomRewardConfig = Field(default_factory=CustomRewardConfig)
    """verl's reward-from-a-file keys."""
    reward: RewardConfig = Field(default_factory=RewardConfig)
    """How reward calls are bounded."""

    @model_validator(mode="after")
    def _check(self) -> RelayConfig:
        """Cross-section checks; each message names the keys involved."""
        actor = self.actor_rollout_ref.actor
        if self.data.train_batch_size % actor.ppo_mini_batch_size:
            raise ValueError(
                f"data.train_batch_size ({self.data.train_batch_size}) must be a multiple of "
                f"actor_rollout_ref.actor.ppo_mini_batch_size ({actor.ppo_mini_batch_size})"
            )
        critic_mini = self.critic.ppo_mini_batch_size
        with_critic = algo_registry.ESTIMATORS[self.algorithm.adv_estimator].needs_critic  # trained only then
        if with_critic and critic_mini is not None and self.data.train_batch_size % critic_mini:
            raise ValueError(
                f"data.train_batch_size ({self.data.train_batch_size}) must be a multiple of "
                f"critic.ppo_mini_batch_size ({critic_mini})"
            )
        if actor.clip_cov_lb >= actor.clip_cov_ub:
            raise ValueError(
                f"actor_rollout_ref.actor.clip_cov_lb ({actor.clip_cov_lb}) must be below clip_cov_ub ({actor.clip_cov_ub})"
            )
        problems = algo_registry.config_problems(self)  # what the chosen algorithms need
        if problems:
            raise ValueError("\n".join(problems))
        if self.env.type == "verifiers" and not self.env.id:
            raise ValueError("env.type=verifiers needs env.id=NAME (the environment's taskset module)")
        if self.trainer.resume_mode == "resume_path" and not self.trainer.resume_from_path:
            raise ValueError("trainer.resume_mode=resume_path needs trainer.resume_from_path")
        if self.transport.heartbeat_interval_s >= self.transport.peer_timeout_s:
            raise ValueError(
                f"transport.heartbeat_interval_s ({self.transport.heartbeat_interval_s}) must be "
                f"below transport.peer_timeout_s ({self.transport.peer_timeout_s})"
            )
        return self
