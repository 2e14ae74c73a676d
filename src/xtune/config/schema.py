"""The typed run spec: one frozen dataclass per section.

These classes are registered as Hydra structured configs (see `compose.py`), so a wrong
type or an unknown key fails at compose time. After composition the config is turned into
these objects with `OmegaConf.to_object`, and every later stage receives plain, immutable
dataclasses: no stage reads Hydra or OmegaConf again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from xtune.config.schema_grpo import GrpoSpec, RewardSpec  # noqa: F401 - part of the spec's public names

# Allowed values of the enumerated string fields. Kept as data so validation, error messages
# and the generated README table all read the same source.
CHOICES: dict[str, tuple] = {
    "model.family": ("auto", "qwen3", "qwen3_moe", "intern_s1"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "data.pack": ("soft", "bfd", "hard", "none"),
    "data.on_error": ("raise", "skip"),
    "data.template": ("auto", "qwen3", "intern_s1"),
    "optim.name": ("adamw", "sgd", "muon", "adamw_8bit"),
    "optim.impl": ("auto", "fused", "foreach", "for"),
    "sched.type": ("cosine", "linear", "constant"),
    "loss.mode": ("auto", "chunk", "liger", "eager"),
    "loss.reduction": ("token", "sample", "square"),
    "parallel.backend": ("auto", "nccl", "gloo"),
    "parallel.param_dtype": ("auto", "float32", "bfloat16", "float16"),
    "parallel.reduce_dtype": ("float32", "bfloat16"),
    "parallel.attn": ("auto", "flash", "sdpa", "eager"),
    "peft.method": ("none", "lora", "dora"),
    "peft.quantize": ("none", "nf4"),
    "logging.progress": ("auto", "rich", "plain"),
    "method": ("sft", "dpo", "grpo"),
    "pref.loss": ("dpo", "ipo", "simpo", "orpo"),
    "pref.reference": ("auto", "init", "none"),
    "grpo.advantage": ("group", "rloo"),
    "grpo.scale_rewards": ("group", "batch", "none"),
    "grpo.loss": ("grpo", "dr_grpo", "dapo"),
    "grpo.importance_sampling_level": ("token", "sequence"),
}

# Rewards a `grpo.rewards` item may name with `builtin` (methods/grpo_rewards.py): the eval scorers and two shapes.
REWARD_BUILTINS = ("exact", "regex", "math", "format", "length")


@dataclass(frozen=True)
class ModelSpec:
    """Which model to build and how to initialise and freeze it."""

    # Display name of the model (the model group sets it).
    name: str = "qwen3_tiny"
    # Architecture family: picks the transformers classes and the weight key maps. auto: any supported
    # causal LM through transformers' Auto classes; null: from the model_type of load_from's config.json
    # (or arch.model_type): its tuned family, else auto.
    family: str | None = None
    # A Hugging Face folder (config.json + safetensors) or null for random init from `arch`.
    load_from: str | None = None
    # A folder with tokenizer files; null means `load_from`. `builtin:NAME` picks one shipped with xtune.
    tokenizer: str | None = None
    # dtype of the master weights (the optimizer's copy); compute dtype is parallel.param_dtype.
    dtype: str = "float32"
    # transformers config values for random init, or overrides applied on top of `load_from`'s config.
    arch: dict[str, Any] = field(default_factory=dict)
    # Freeze the vision tower (no gradients, no optimizer state).
    freeze_vision: bool = False
    # Freeze the vision-to-text projector.
    freeze_projector: bool = False
    # Freeze the language model (embeddings, blocks, lm_head).
    freeze_language: bool = False
    # MoE router auxiliary loss coefficient; null keeps the model config's value.
    router_aux_loss_coef: float | None = None
    # Side of one square image tile in pixels (InternVL tiling).
    image_size: int = 448
    # Image tokens per tile after pixel shuffle ((image_size / patch)^2 x downsample^2).
    tokens_per_tile: int = 256
    # Most tiles per image (the grid closest to the aspect ratio within this budget).
    max_tiles: int = 12
    # Add a downscaled whole-image tile when an image has more than one tile.
    use_thumbnail: bool = True
    # Run Python code shipped in the model/tokenizer folder (`auto_map`, e.g. Intern-S1's tokenizer); read it first.
    trust_remote_code: bool = False


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset (files, a save_to_disk folder or a hub id) and its share of the mix."""

    # Name used in logs, metrics and `xtune data inspect`.
    name: str = MISSING
    # A .jsonl / .json / .parquet / .arrow file, a folder of them, a datasets.save_to_disk folder, or
    # hf://org/name[:split] (datasets.load_dataset; offline from the local HF cache).
    path: str = MISSING
    # auto (detected from the first record, shown in the log and data inspect), messages, alpaca
    # (instruction/input/output/system), sharegpt (conversations of from/value), text (every token trained).
    format: str = "auto"
    # Field renames, xtune's name: the dataset's, e.g. {messages: dialog}. (null, not {}, as the default: a
    # default_factory inside a list item fails to compose in a submitit job process, omegaconf 2.3.)
    columns: dict[str, str] | None = None
    # Integer part repeats the dataset, the fraction takes a seeded random subset.
    sample_ratio: float = 1.0
    # Folder that image paths are relative to; null means the dataset file's folder.
    media_root: str | None = None


@dataclass(frozen=True)
class DataSpec:
    # Training datasets, mixed by sample_ratio.
    datasets: list[DatasetSpec] = field(default_factory=list)
    # Evaluation datasets, never mixed into training.
    eval_datasets: list[DatasetSpec] = field(default_factory=list)
    # Longer samples are truncated (multimodal samples whose image tokens would be cut are dropped). At most
    # data.pack_max_length, except with data.pack=hard, which cuts longer samples into rows.
    sample_max_length: int = 2048
    # Tokens per packed row.
    pack_max_length: int = 4096
    # Packing strategy: soft (greedy + look-ahead gap filling), bfd (best-fit-decreasing),
    # hard (concatenate and cut), none (one sample per row, padded).
    pack: str = "soft"
    # How many samples the soft packer looks ahead to fill a row's remaining gap.
    pack_lookahead: int = 256
    # null means ~/.cache/xtune/data (or $XTUNE_CACHE).
    cache_dir: str | None = None
    # Processes used for tokenisation.
    num_workers: int = 2
    # What a malformed record does: stop with its file and line, or skip it and count it.
    on_error: str = "raise"
    # Chat template used when the tokenizer has none of its own.
    template: str = "auto"
    # Do not train the empty `<think>...</think>` block the template puts before an answer (XTuner's labels).
    strip_empty_think: bool = False


@dataclass(frozen=True)
class OptimSpec:
    # adamw (decoupled weight decay); sgd (momentum, nesterov); muon: torch.optim.Muon on the hidden 2-D matrices,
    # AdamW on embeddings, lm_head, norms, biases; adamw_8bit: bitsandbytes' 8-bit AdamW (one process, unsharded).
    name: str = "adamw"
    # Peak learning rate.
    lr: float = 2e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    # Applied to matrices only; norms and biases are not decayed.
    weight_decay: float = 0.0
    eps: float = 1e-8
    # Clip the global gradient norm (across all shards) to this; 0 disables clipping.
    max_grad_norm: float = 1.0
    # AdamW kernel: auto picks fused where the parameters allow it, else foreach.
    impl: str = "auto"
    # Momentum of sgd and muon (0 for plain SGD).
    momentum: float = 0.9
    # Nesterov momentum (sgd with momentum > 0, muon).
    nesterov: bool = False


@dataclass(frozen=True)
class SchedSpec:
    # Shape of the decay after warmup, down to min_lr_ratio x lr.
    type: str = "cosine"
    # Fraction of all steps spent warming up linearly from 0.
    warmup_ratio: float = 0.03
    # LR floor as a fraction of optim.lr.
    min_lr_ratio: float = 0.0


@dataclass(frozen=True)
class LossSpec:
    # auto: chunk (measured faster than liger on an H200; liger must be asked for).
    mode: str = "auto"
    # Tokens per chunk of the chunked cross-entropy (memory grows with chunk_size x vocab).
    chunk_size: int = 1024
    # token: every trained token of the global batch weighs the same; sample: every sample does;
    # square: a sample of n trained tokens weighs 1/sqrt(n) per token.
    reduction: str = "token"


@dataclass(frozen=True)
class ParallelSpec:
    # >1 makes `xtune sft` start that many workers itself via torch.distributed.run.
    nproc_per_node: int = 1
    # Process group backend; auto: nccl on CUDA, gloo on CPU.
    backend: str = "auto"
    # auto: bfloat16 on CUDA, float32 on CPU.
    param_dtype: str = "auto"
    # dtype of the gradient reduce-scatter.
    reduce_dtype: str = "float32"
    # Free each block's gathered parameters after its forward (less memory, one more all-gather).
    reshard_after_forward: bool = True
    # Keep sharded parameters, gradients and optimizer state in CPU memory.
    cpu_offload: bool = False
    # Recompute block activations in backward instead of storing them.
    activation_checkpointing: bool = False
    # Fraction of transformer blocks that are checkpointed when activation_checkpointing is on.
    ac_ratio: float = 1.0
    # HSDP: replicate groups x shard groups; 1 means plain FSDP over all ranks.
    replicate_degree: int = 1
    # Attention kernel for packed rows; auto: flash-attn varlen on CUDA when installed, else sdpa.
    attn: str = "auto"
    # Ulysses sequence parallelism: each packed row is cut over this many ranks (divides the world and the heads).
    sp_size: int = 1
    # torch.compile each transformer block (dynamic sequence length; attention itself stays eager). Off until measured.
    compile: bool = False


@dataclass(frozen=True)
class TrainSpec:
    # Packed rows per optimizer step, across all ranks and micro-steps.
    global_batch_size: int = 8
    # Packed rows per rank per micro-step.
    micro_batch_size: int = 1
    # Passes over the mixed data (fractional allowed); give exactly one of epochs and max_steps.
    epochs: float | None = None
    # Optimizer steps to run.
    max_steps: int | None = None
    # Seeds the mix, the shuffling, model init and dropout.
    seed: int = 42
    # The run directory; conf/sft.yaml sets work_dirs/<recipe>/<timestamp>.
    work_dir: str = ""
    # 0 saves only at the end.
    save_every: int = 0
    # Checkpoints (and hf/step-N exports) kept on disk; older ones are deleted after a newer one is complete.
    keep_last: int = 2
    # null: start fresh; auto: latest complete checkpoint in work_dir; or a checkpoint path.
    resume: str | None = None
    # Write checkpoints in the background (staged to host memory, training goes on); null: true on CUDA only.
    async_save: bool | None = None
    # Eval loss every N steps (0: only at the end); needs data.eval_datasets.
    eval_every: int = 0
    # Metrics every N steps (metrics.jsonl, TensorBoard, progress).
    log_every: int = 1
    # Also write a Hugging Face export to hf/step-N every N steps (0: only the final hf/).
    hf_every: int = 0
    # Stop after this many consecutive steps with a non-finite gradient norm (each is skipped).
    max_bad_steps: int = 5
    # Prompts generated from the exported model at the end of a run (printed and logged).
    sample_prompts: list[str] = field(default_factory=list)
    # Also generate the sample prompts from the live model every N steps (0: only at the end); samples.jsonl
    # (with step), the log and TensorBoard text.
    sample_every: int = 0
    # Greedy tokens generated per sample prompt.
    sample_max_new_tokens: int = 32
    # Eval tasks (conf/eval/NAME.yaml options, or YAML files) run on the live model every eval_tasks_every steps and
    # at the end; eval/<task>/<metric> in metrics.jsonl, TensorBoard and W&B.
    eval_tasks: list[str] = field(default_factory=list)
    # Run train.eval_tasks every N steps (0: only at the end).
    eval_tasks_every: int = 0
    # <task>/<metric> (e.g. demo/accuracy): keep the checkpoint where it was highest as checkpoints/best and export
    # it to <work_dir>/hf_best.
    keep_best: str | None = None


@dataclass(frozen=True)
class PeftSpec:
    """Parameter-efficient tuning: low-rank adapters on a frozen (optionally 4-bit) base, built with `peft`."""

    # none: full-parameter tuning; lora: low-rank adapters; dora: weight-decomposed LoRA (magnitude + direction).
    method: str = "none"
    # Adapter rank.
    r: int = 16
    # Scaling numerator: the adapter update is multiplied by alpha / r.
    alpha: float = 32.0
    # Dropout on the adapter input (0 keeps training deterministic).
    dropout: float = 0.0
    # Linear layers that get adapters: module-name suffixes (q_proj) or regexes over full names; [all-linear] means
    # every linear layer of the language model's blocks (not lm_head, not MoE routers, not the vision tower).
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    # Modules trained in full and saved beside the adapters, e.g. [embed_tokens, lm_head] after adding tokens.
    modules_to_save: list[str] = field(default_factory=list)
    # nf4: keep the frozen base of the adapted layers in 4-bit NormalFloat with double-quantised scales (QLoRA).
    quantize: str = "none"
    # Also write the merged full model to <work_dir>/hf (the adapter alone always goes to <work_dir>/hf_adapter).
    merge_on_export: bool = True


@dataclass(frozen=True)
class PrefSpec:
    """Preference tuning (`xtune dpo`): the loss over (chosen, rejected) pairs and its reference."""

    # dpo: Rafailov et al. 2023 (arXiv:2305.18290); ipo: Azar et al. 2023 (arXiv:2310.12036), squared loss on the
    # log-ratio margin; simpo: Meng et al. 2024 (arXiv:2405.14734), length-normalised, no reference;
    # orpo: Hong et al. 2024 (arXiv:2403.07691), SFT loss + odds-ratio term, no reference.
    loss: str = "dpo"
    # Inverse temperature; null: the paper's value (dpo 0.1, ipo tau 0.1, simpo 2.0; orpo uses orpo_lambda).
    beta: float | None = None
    # Conservative DPO (Mitchell 2023): the probability that a pair's labels are flipped; dpo and simpo only.
    label_smoothing: float = 0.0
    # SimPO's target reward margin gamma (the paper's gamma / beta = 0.5 at beta 2.0).
    simpo_gamma: float = 1.0
    # ORPO's weight lambda of the odds-ratio term (the paper's 0.1).
    orpo_lambda: float = 0.1
    # Reference model: init (the starting weights; with adapters, the base with adapters disabled), none, or
    # auto (init for dpo and ipo, none for simpo and orpo).
    reference: str = "auto"


@dataclass(frozen=True)
class GenSpec:
    """Generation settings (the `gen` group): `xtune chat`, `xtune eval` and the samples of a run."""

    # Most tokens generated per completion (a completion cut here has finish_reason "length").
    max_new_tokens: int = 256
    # Sampling temperature; 0 means greedy decoding (top_p, top_k and seed are then unused).
    temperature: float = 0.0
    # Nucleus sampling: keep the smallest set of tokens whose probabilities sum to top_p (1.0: off).
    top_p: float = 1.0
    # Keep only the k most likely tokens when sampling (0: off).
    top_k: int = 0
    # Divide the logits of tokens already in the prompt or the completion by this (> 1 discourages repeats; 1.0: off).
    repetition_penalty: float = 1.0
    # Completions per prompt (needs temperature > 0: greedy completions would all be the same).
    n: int = 1
    # Strings that end a completion; the completion's text stops before the first one.
    stop: list[str] = field(default_factory=list)
    # Seeds sampling: the same seed, prompts and batch_size give the same completions.
    seed: int = 0
    # Prompts per generate call (one padded batch with a KV cache).
    batch_size: int = 16
    # Passed to the chat template as enable_thinking; null passes nothing (the template's default, as in training).
    enable_thinking: bool | None = None


@dataclass(frozen=True)
class LoggingSpec:
    # TensorBoard scalars in <work_dir>/tb.
    tensorboard: bool = True
    # Also log to Weights & Biases (needs `pip install wandb`).
    wandb: bool = False
    wandb_project: str = "xtune"
    # auto: a rich progress bar on an interactive terminal, plain log lines otherwise; rich or plain force one.
    progress: str = "auto"


@dataclass(frozen=True)
class RunSpec:
    # The recipe this run was composed from (set automatically).
    recipe: str = "demo"
    # One line about the recipe, shown by `xtune recipes`.
    description: str = ""
    # Training method: sft (`xtune sft`), dpo (`xtune dpo`, preference pairs; see pref) or grpo (`xtune grpo`, online RL).
    method: str = "sft"
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    sched: SchedSpec = field(default_factory=SchedSpec)
    loss: LossSpec = field(default_factory=LossSpec)
    parallel: ParallelSpec = field(default_factory=ParallelSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    peft: PeftSpec = field(default_factory=PeftSpec)
    pref: PrefSpec = field(default_factory=PrefSpec)
    grpo: GrpoSpec = field(default_factory=GrpoSpec)
    logging: LoggingSpec = field(default_factory=LoggingSpec)
    gen: GenSpec = field(default_factory=GenSpec)


def needs_reference(loss: str) -> bool:
    """Whether a preference loss compares the policy with a reference model (`pref.reference: auto` -> init)."""
    return loss in ("dpo", "ipo")
