"""Cross-field and filesystem checks on a RunSpec, run before anything heavy is built.

Every check appends a message naming the key, the value given and what is allowed; the
caller reports them all together.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import re
from collections.abc import Iterable

from xtune.config.families import family_problems, folder_config
from xtune.config.files import file_problems, model_file_problems
from xtune.config.schema import CHOICES, ModelSpec, RunSpec, needs_reference
from xtune.config.validate_eval import train_eval_problems
from xtune.config.validate_gen import gen_problems
from xtune.config.validate_grpo import grpo_problems
from xtune.launch.env import launch_env

VISION_FAMILIES = ("intern_s1",)


def check_value(key: str, value) -> str | None:
    """Enumerated string fields: the value must be one of the allowed ones (the one rule; the override
    diagnosis in compose.py asks it too, so a bad choice is reported beside the other override mistakes)."""
    allowed = CHOICES.get(key)
    if allowed is None or not isinstance(value, str) or value.startswith("${"):
        return None
    if value not in allowed:
        return f"{key}={value}: not allowed; choose one of {', '.join(allowed)}.{suggest(value, allowed)}"
    return None


def suggest(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def _walk_choices(spec: RunSpec, problems: list[str]) -> None:
    for key in CHOICES:
        value = spec
        for part in key.split("."):
            value = getattr(value, part)
        if value is None:  # null where allowed (model.family) is checked there
            continue
        msg = check_value(key, value)
        if msg:
            problems.append(msg)


def world_size_of(spec: RunSpec, world_size: int | None = None) -> int:
    if world_size:
        return world_size
    env = launch_env()
    return env.world_size if env.launched else spec.parallel.nproc_per_node


def _check_positive(problems: list[str], key: str, value, *, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        problems.append(f"{key}={value}: must be {'>= 0' if allow_zero else '> 0'}")


def validate(spec: RunSpec, *, check_files: bool = True, world_size: int | None = None) -> list[str]:
    problems: list[str] = []
    _walk_choices(spec, problems)
    problems.extend(range_problems(spec))
    problems.extend(length_problems(spec))
    t = spec.train
    if (t.epochs is None) == (t.max_steps is None):
        problems.append(
            f"give exactly one of train.epochs and train.max_steps (got epochs={t.epochs}, "
            f"max_steps={t.max_steps}); set the other to null"
        )
    _check_positive(problems, "train.epochs", t.epochs)
    _check_positive(problems, "train.max_steps", t.max_steps)
    world = world_size_of(spec, world_size)
    problems.extend(layout_problems(spec, world))
    problems.extend(optim_problems(spec, world))
    problems.extend(model_problems(spec.model, check_files=check_files))
    problems.extend(peft_problems(spec))
    problems.extend(pref_problems(spec))
    problems.extend(grpo_problems(spec, check_files=check_files))
    problems.extend(train_eval_problems(spec, check_files=check_files))
    problems.extend(gen_problems(spec.gen))
    problems.extend(train_eval_problems(spec, check_files=check_files))
    problems.extend(dataset_problems(spec))
    if check_files:
        problems.extend(file_problems(spec))
    return list(dict.fromkeys(problems))


def range_problems(spec: RunSpec) -> list[str]:
    """Counts and sizes that must be positive (or >= 0), and the ratios with a range."""
    problems: list[str] = []
    m, d, o, s, t, p = spec.model, spec.data, spec.optim, spec.sched, spec.train, spec.parallel
    for key, value in [
        ("data.sample_max_length", d.sample_max_length),
        ("data.pack_max_length", d.pack_max_length),
        ("data.pack_lookahead", d.pack_lookahead),
        ("train.global_batch_size", t.global_batch_size),
        ("train.micro_batch_size", t.micro_batch_size),
        ("train.keep_last", t.keep_last),
        ("train.log_every", t.log_every),
        ("train.max_bad_steps", t.max_bad_steps),
        ("parallel.nproc_per_node", p.nproc_per_node),
        ("parallel.replicate_degree", p.replicate_degree),
        ("parallel.sp_size", p.sp_size),
        ("loss.chunk_size", spec.loss.chunk_size),
        ("optim.lr", o.lr),
        ("model.image_size", m.image_size),
        ("model.tokens_per_tile", m.tokens_per_tile),
        ("model.max_tiles", m.max_tiles),
    ]:
        _check_positive(problems, key, value)
    for key, value in [
        ("train.save_every", t.save_every),
        ("train.eval_every", t.eval_every),
        ("train.hf_every", t.hf_every),
        ("train.sample_every", t.sample_every),
        ("data.num_workers", d.num_workers),
        ("optim.weight_decay", o.weight_decay),
        ("optim.max_grad_norm", o.max_grad_norm),
        ("train.sample_max_new_tokens", t.sample_max_new_tokens),
    ]:
        _check_positive(problems, key, value, allow_zero=True)
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        problems.append(f"optim.betas={list(o.betas)}: give two values in [0, 1)")
    if not 0.0 <= s.warmup_ratio < 1.0:
        problems.append(f"sched.warmup_ratio={s.warmup_ratio}: must be in [0, 1)")
    if not 0.0 <= s.min_lr_ratio <= 1.0:
        problems.append(f"sched.min_lr_ratio={s.min_lr_ratio}: must be in [0, 1]")
    if not 0.0 < p.ac_ratio <= 1.0:
        problems.append(f"parallel.ac_ratio={p.ac_ratio}: must be in (0, 1]")
    return problems


def max_image_tokens(m: ModelSpec) -> int:
    """The most tokens one image takes: model.max_tiles tiles (+ the thumbnail) x tokens_per_tile, + <img> </img>."""
    tiles = m.max_tiles + (1 if m.use_thumbnail and m.max_tiles > 1 else 0)
    return tiles * m.tokens_per_tile + 2


def length_problems(spec: RunSpec) -> list[str]:
    """data.sample_max_length against data.pack_max_length: the one place this rule lives.

    soft, bfd and none place whole samples, so a sample must fit in one row. hard concatenates the samples and
    cuts them every pack_max_length tokens, so a longer sample is cut into rows like any sample that crosses a
    row's end; only an image block is never cut, so the largest one must fit in a row."""
    d, m = spec.data, spec.model
    if d.sample_max_length <= d.pack_max_length or min(d.sample_max_length, d.pack_max_length) <= 0:
        return []
    if d.pack != "hard":
        return [f"data.sample_max_length={d.sample_max_length} is larger than data.pack_max_length="
                f"{d.pack_max_length}: a sample must fit in one packed row with data.pack={d.pack} (data.pack=hard "
                "cuts longer samples into rows)"]
    block = max_image_tokens(m)
    if m.family in VISION_FAMILIES and min(block, d.sample_max_length) > d.pack_max_length:
        return [f"data.pack=hard with data.sample_max_length={d.sample_max_length} > data.pack_max_length="
                f"{d.pack_max_length}: an image takes up to {block} tokens (model.max_tiles={m.max_tiles}, "
                f"model.tokens_per_tile={m.tokens_per_tile}) and is never cut, so it must fit in one row: raise "
                f"data.pack_max_length to {block}, or keep data.sample_max_length <= data.pack_max_length"]
    return []


def layout_problems(spec: RunSpec, world: int) -> list[str]:
    """How the world splits into replicas, sequence-parallel groups and data-parallel micro-batches."""
    p, t, problems = spec.parallel, spec.train, []
    if p.replicate_degree > 0 and world % p.replicate_degree:
        problems.append(
            f"parallel.replicate_degree={p.replicate_degree} does not divide the world size {world}"
        )
    problems.extend(sp_problems(spec, world))
    # Every rank is data-parallel (FSDP / HSDP shard the model, not the batch), except that the ranks of one
    # sequence-parallel group share their rows.
    dp = world // p.sp_size if p.sp_size > 0 and world % p.sp_size == 0 else world
    per_step = dp * max(t.micro_batch_size, 1)
    if t.global_batch_size > 0 and t.global_batch_size % per_step:
        lower = max(per_step, t.global_batch_size // per_step * per_step)
        problems.append(
            f"train.global_batch_size={t.global_batch_size} is not divisible by data-parallel size {dp} x "
            f"train.micro_batch_size={t.micro_batch_size} = {per_step}; use e.g. {lower} or {lower + per_step}"
        )
    return problems


def dataset_problems(spec: RunSpec) -> list[str]:
    """The dataset lists (the files themselves: `files.file_problems`)."""
    d, problems = spec.data, []
    if not d.datasets:
        problems.append("data.datasets is empty: give at least one dataset (name, path)")
    for group, items in (("data.datasets", d.datasets), ("data.eval_datasets", d.eval_datasets)):
        names = [ds.name for ds in items]
        for i, ds in enumerate(items):
            if ds.sample_ratio < 0:
                problems.append(f"{group}[{i}].sample_ratio={ds.sample_ratio}: must be >= 0")
            if names.count(ds.name) > 1:
                problems.append(f"{group}[{i}].name={ds.name}: names must be unique")
    if spec.train.eval_every and not d.eval_datasets:
        problems.append(f"train.eval_every={spec.train.eval_every} but data.eval_datasets is empty")
    return problems


def attention_heads(m: ModelSpec) -> tuple:
    """(query heads, KV heads) of the text model from model.arch over load_from's config.json; None where unknown."""
    cfg = folder_config(m.load_from) or {}
    arch = dict(m.arch or {})
    text = {**(cfg.get("text_config") or cfg), **dict(arch.get("text_config") or arch)}
    heads = text.get("num_attention_heads")
    return heads, text.get("num_key_value_heads", heads)


def sp_problems(spec: RunSpec, world: int) -> list[str]:
    """What parallel.sp_size (Ulysses sequence parallelism) needs of the world, the model and the rows."""
    p, sp = spec.parallel, spec.parallel.sp_size
    if sp <= 1:
        return []
    out = []
    shard = world // p.replicate_degree if p.replicate_degree > 0 and world % p.replicate_degree == 0 else world
    where = "the shard group size" if p.replicate_degree > 1 else "the world size"
    if shard % sp:
        out.append(f"parallel.sp_size={sp} does not divide {where} {shard} (parallel.nproc_per_node="
                   f"{p.nproc_per_node}, parallel.replicate_degree={p.replicate_degree}); use a divisor of {shard}")
    heads, _ = attention_heads(spec.model)
    if heads and heads % sp:
        out.append(f"parallel.sp_size={sp} does not divide the model's num_attention_heads={heads} "
                   "(model.arch or model.load_from's config.json): each rank attends with heads / sp_size heads")
    if spec.data.pack_max_length < sp:
        out.append(f"data.pack_max_length={spec.data.pack_max_length} is shorter than parallel.sp_size={sp}: "
                   "each rank of a sequence-parallel group needs a piece of every row")
    if spec.method != "sft":
        out.append(f"parallel.sp_size={sp} works with method=sft only (got method={spec.method})")
    return out


# Why adamw_8bit cannot update FSDP2 shards (checked with bitsandbytes 0.50.2 on torch 2.13): its update is a
# custom operator with no DTensor sharding rule ("bitsandbytes.optimizer_update_32bit.default does not have a
# sharding strategy registered").
BNB_SHARDED_REASON = ("optim.name=adamw_8bit: bitsandbytes' 8-bit AdamW cannot update FSDP2-sharded parameters "
                      "(its kernels have no DTensor rule); train on one process with parallel.param_dtype equal to "
                      "model.dtype, or use optim.name=adamw")


def optim_problems(spec: RunSpec, world: int) -> list[str]:
    """What the chosen optimizer cannot do here (before any model is built)."""
    o, p = spec.optim, spec.parallel
    out = []
    if not 0.0 <= o.momentum < 1.0:
        out.append(f"optim.momentum={o.momentum}: must be in [0, 1)")
    if o.name == "adamw_8bit":
        if importlib.util.find_spec("bitsandbytes") is None:
            out.append("optim.name=adamw_8bit needs bitsandbytes: pip install 'xtune[bnb]'")
        sharded = world > 1 or p.param_dtype not in ("auto", spec.model.dtype) or p.cpu_offload
        if sharded:
            out.append(BNB_SHARDED_REASON + f" (here: {world} processes, parallel.param_dtype={p.param_dtype})")
    return out


def model_problems(m: ModelSpec, *, check_files: bool = True) -> list[str]:
    """What is wrong with the model section; with check_files, also its folders and files.
    The config stage, the model adapters and the engine's preflight all ask this one function."""
    problems: list[str] = family_problems(m, check_files=check_files)
    if m.family not in VISION_FAMILIES:
        for flag in ("freeze_vision", "freeze_projector"):
            if getattr(m, flag):
                problems.append(f"model.{flag}=true: model.family={m.family} has no vision part")
    if m.family in VISION_FAMILIES and m.freeze_vision and m.freeze_projector and m.freeze_language:
        problems.append("model.freeze_vision, freeze_projector and freeze_language are all true: nothing to train")
    if m.load_from is None and not m.arch:
        problems.append(
            f"model.load_from is required for model {m.name}: give its Hugging Face folder, e.g. "
            f"model.load_from=/models/{m.name} (or pick a tiny model such as model=qwen3_tiny for a random-init trial)"
        )
    if check_files:
        problems.extend(model_file_problems(m, problems))
    return problems


# Target names that select layers of the language model (plain names and all-linear), as against regexes.
_PLAIN_TARGET = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


def pref_problems(spec: RunSpec) -> list[str]:
    """The pref section and what preference data needs of the data section (dpo runs only)."""
    if spec.method != "dpo":
        return []

    q, d, problems = spec.pref, spec.data, []
    if q.beta is not None and q.beta <= 0:
        problems.append(f"pref.beta={q.beta}: must be > 0 (or null for the paper's value)")
    if not 0.0 <= q.label_smoothing < 0.5:
        problems.append(f"pref.label_smoothing={q.label_smoothing}: must be in [0, 0.5)")
    if q.label_smoothing and q.loss not in ("dpo", "simpo"):
        problems.append(f"pref.label_smoothing={q.label_smoothing}: only the dpo and simpo losses use it, "
                        f"not pref.loss={q.loss}")
    if q.orpo_lambda < 0:
        problems.append(f"pref.orpo_lambda={q.orpo_lambda}: must be >= 0")
    if q.reference != "auto" and q.loss in CHOICES["pref.loss"] and (q.reference == "init") != needs_reference(q.loss):
        need = "init" if needs_reference(q.loss) else "none"
        problems.append(f"pref.reference={q.reference}: pref.loss={q.loss} needs reference {need} (or auto)")
    if d.pack == "hard":
        problems.append("data.pack=hard cuts documents, but a preference pair must stay whole in one row: "
                        "use data.pack=soft, bfd or none")
    if d.sample_max_length * 2 > d.pack_max_length:
        problems.append(f"data.sample_max_length={d.sample_max_length}: a pair (two documents) must fit in one row "
                        f"of data.pack_max_length={d.pack_max_length}; give at most {d.pack_max_length // 2}")
    return problems


def peft_problems(spec: RunSpec) -> list[str]:
    """The peft section: ranges, combinations, the 4-bit library (the target names need the model: see
    xtune.peft.check_targets, run before any weight exists)."""
    p, m = spec.peft, spec.model
    problems: list[str] = []
    if p.method == "none":
        if p.quantize != "none":
            problems.append(f"peft.quantize={p.quantize} needs adapters: set peft.method=lora (or peft=qlora)")
        return problems
    if p.r <= 0:
        problems.append(f"peft.r={p.r}: the adapter rank must be > 0")
    if p.alpha <= 0:
        problems.append(f"peft.alpha={p.alpha}: must be > 0")
    if not 0.0 <= p.dropout < 1.0:
        problems.append(f"peft.dropout={p.dropout}: must be in [0, 1)")
    if not p.target_modules:
        problems.append("peft.target_modules is empty: give layer names (q_proj), regexes over full names, or [all-linear]")
    if m.freeze_language and any(_PLAIN_TARGET.match(t) for t in p.target_modules):
        problems.append("model.freeze_language=true contradicts adapters on the language model "
                        f"(peft.target_modules={list(p.target_modules)}): unset one of them")
    if p.quantize == "nf4":
        if importlib.util.find_spec("torchao") is None:
            problems.append("peft.quantize=nf4 (QLoRA) needs the 4-bit library: pip install 'xtune[qlora]'")
        if p.method == "dora":
            problems.append("peft.method=dora with peft.quantize=nf4 is not supported: peft's DoRA reads the base "
                            "weight as a plain tensor; use peft.method=lora for QLoRA, or quantize=none for DoRA")
    return problems


def plan(spec: RunSpec, world_size: int | None = None) -> dict:
    """What a run will do, for --dry-run: computed from the spec alone, no model, no data read."""
    world = world_size_of(spec, world_size)
    dp = world // spec.parallel.sp_size if world % spec.parallel.sp_size == 0 else world
    accum = spec.train.global_batch_size // (dp * spec.train.micro_batch_size)
    return {
        "recipe": spec.recipe,
        "model": f"{spec.model.name} ({spec.model.family}, "
        f"{'weights from ' + spec.model.load_from if spec.model.load_from else 'random init'})",
        "world_size": world,
        "replicate x shard": f"{spec.parallel.replicate_degree} x {world // spec.parallel.replicate_degree}",
        "data x sequence parallel": f"{dp} x {spec.parallel.sp_size}",
        "global_batch_size": spec.train.global_batch_size,
        "micro_batch_size": spec.train.micro_batch_size,
        "gradient_accumulation": accum,
        "tokens_per_step (max)": spec.train.global_batch_size * spec.data.pack_max_length,
        "steps": spec.train.max_steps
        if spec.train.max_steps is not None
        else f"{spec.train.epochs} epochs (row count known after tokenisation)",
        "datasets": [dataclasses.asdict(ds) for ds in spec.data.datasets],
        "eval_datasets": [ds.name for ds in spec.data.eval_datasets],
        "work_dir": spec.train.work_dir,
    }
