"""What a path names and how its model is built for generation: a run directory, a Hugging Face folder, a PEFT
adapter folder.

- A run directory (`config.yaml` beside `checkpoints/` or `hf/`): its `hf/` export when there is one (an adapter
  run with `peft.merge_on_export=false`: `hf_adapter/`), else its newest complete checkpoint, built in memory the
  way `xtune export` builds it (`checkpoint.hf_export.build_plain_model` + `checkpoint.dcp.load_model_only`):
  nothing is written to disk. An adapter run's checkpoint generates with the adapters injected as in training
  (a QLoRA base stays NF4, as it was trained).
- A Hugging Face folder (`config.json` + safetensors): the family's transformers class with the weights read by
  the family adapter (`load_export`), so an Intern-S1 export in its original `interns1` layout runs no code from
  the folder. Any other causal LM transformers knows loads through `AutoModelForCausalLM.from_pretrained`.
- A PEFT adapter folder (`adapter_config.json`): its base (`base_model_name_or_path`) loaded as above, then
  peft's public `PeftModel.from_pretrained` and `merge_and_unload`.

Safetensors only; remote code only with `trust_remote_code=True` (the run's `model.trust_remote_code`).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from xtune import peft as xpeft
from xtune.checkpoint.dcp import complete_checkpoints, load_model_only, resolve_resume
from xtune.checkpoint.hf_export import build_plain_model, build_plain_peft_model, rename_adapter_modules
from xtune.config.families import AUTO_MODEL_TYPES, resolve_family
from xtune.config.io import spec_from_yaml
from xtune.config.schema import ModelSpec, RunSpec
from xtune.errors import XtuneError
from xtune.models import get_adapter

ADAPTER_CONFIG = "adapter_config.json"
WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
EXPECTED = ("a run directory (config.yaml with checkpoints/ or hf/), a Hugging Face model folder (config.json and "
            "model.safetensors), or a PEFT adapter folder (adapter_config.json)")


@dataclass
class Loaded:
    """A model ready to generate, with what rendering and images need."""

    model: torch.nn.Module
    tokenizer: Any
    model_spec: ModelSpec  # the family, tokenizer and image settings (image_size, tokens_per_tile, ...)
    template: str = "auto"  # data.template of the run ("auto" elsewhere)
    source: str = ""  # what was loaded, for the chat banner


def kind_of(path: Path) -> str:
    """run | hf | adapter, or an XtuneError naming the path and what was expected."""
    if not path.exists():
        raise XtuneError(f"{path}: no such file or folder; expected {EXPECTED}")
    if not path.is_dir():
        raise XtuneError(f"{path} is a file; expected {EXPECTED}")
    if (path / ADAPTER_CONFIG).is_file():
        return "adapter"
    if (path / "config.json").is_file() and any((path / w).is_file() for w in WEIGHTS):
        return "hf"
    if (path / "config.yaml").is_file() and ((path / "checkpoints").is_dir() or (path / "hf").is_dir()):
        return "run"
    if (path / "config.yaml").is_file():
        raise XtuneError(f"{path} is a run directory with no checkpoint yet (no checkpoints/ and no hf/ export): "
                         "wait for its first checkpoint (train.save_every) or the end of the run")
    if (path / "config.json").is_file():
        raise XtuneError(f"{path} has config.json but no model.safetensors (or its index): only safetensors "
                         "weights are loaded; expected a Hugging Face model folder")
    raise XtuneError(f"{path} is not a model xtune can load; expected {EXPECTED}")


def load(path, *, device="cpu", dtype: str | None = None, trust_remote_code: bool = False) -> Loaded:
    path = Path(path).expanduser()
    kind = kind_of(path)
    if kind == "run":
        loaded = _load_run(path, dtype)
    else:
        loaded = _load_folder(path, kind, dtype, trust_remote_code)
    loaded.model.to(device)
    return loaded


def _dtype_name(dtype, default: str = "float32") -> str:
    if dtype is None:
        return default
    return str(dtype).replace("torch.", "")


def _load_run(run_dir: Path, dtype) -> Loaded:
    spec = spec_from_yaml(run_dir / "config.yaml")
    for folder, kind in ((run_dir / "hf", "hf"), (run_dir / "hf_adapter", "adapter")):
        if (folder / "config.json").is_file() or (folder / ADAPTER_CONFIG).is_file():
            loaded = _load_folder(folder, kind, dtype, bool(spec.model.trust_remote_code), run_spec=spec)
            loaded.source = f"{run_dir} (export {folder.name}/)"
            return loaded
    if not complete_checkpoints(run_dir / "checkpoints"):
        raise XtuneError(f"{run_dir} is a run directory with no checkpoint yet (checkpoints/ holds no complete "
                         "step-N) and no hf/ export: wait for its first checkpoint (train.save_every)")
    ckpt = resolve_resume("auto", run_dir)
    spec = xpeft.with_saved_base(spec, run_dir)
    if dtype is not None:
        spec = dataclasses.replace(spec, model=dataclasses.replace(spec.model, dtype=_dtype_name(dtype)))
    model, tokenizer = _model_from_checkpoint(spec, ckpt)
    return Loaded(model, tokenizer, spec.model, spec.data.template, f"{run_dir} (checkpoint {ckpt.name})")


def _model_from_checkpoint(spec: RunSpec, ckpt: Path):
    """The run's model built unsharded on CPU with the checkpoint's weights (what `xtune export` writes, in memory)."""
    adapter = get_adapter(spec.model)
    if xpeft.enabled(spec.peft):
        if not spec.model.load_from:
            raise XtuneError(f"{ckpt}: an adapter run without model.load_from needs its saved base "
                             f"{xpeft.saved_base_dir(ckpt.parent.parent)}, which is missing")
        model, _, _ = build_plain_peft_model(adapter, spec)
        load_model_only(ckpt, model, trainable_only=True)
    else:
        model, _ = build_plain_model(adapter, spec)
        load_model_only(ckpt, model)
    return model.eval(), adapter.load_tokenizer()


def _folder_spec(folder: Path, dtype, trust_remote_code: bool, run_spec=None) -> ModelSpec:
    """The model spec of a HF folder: its family from config.json; the run's image settings when it came from one."""
    base = run_spec.model if run_spec is not None else ModelSpec()
    spec = dataclasses.replace(base, name=folder.name, family=None, load_from=str(folder), tokenizer=None, arch={},
                               dtype=_dtype_name(dtype, base.dtype), trust_remote_code=trust_remote_code)
    spec = resolve_family(spec)
    if run_spec is None and spec.family == "intern_s1":
        spec = dataclasses.replace(spec, **_image_settings(folder))
    return spec


def _image_settings(folder: Path) -> dict:
    """image_size and tokens_per_tile of an InternVL-style config.json (tile side / patch, pixel shuffle)."""
    cfg = json.loads((folder / "config.json").read_text())
    vision = cfg.get("vision_config") or {}
    size, patch = vision.get("image_size", 448), vision.get("patch_size", 14)
    size = size[0] if isinstance(size, list) else size
    patch = patch[0] if isinstance(patch, list) else patch
    ratio = cfg.get("downsample_ratio", 0.5)
    return {"image_size": int(size), "tokens_per_tile": int(round((size // patch) ** 2 * ratio * ratio))}


def _load_folder(folder: Path, kind: str, dtype, trust_remote_code: bool, run_spec=None) -> Loaded:
    if kind == "adapter":
        base = _adapter_base(folder)
        spec = _folder_spec(base, dtype, trust_remote_code, run_spec)
        model = load_export(get_adapter(spec), folder)
        tok_spec = spec if not _has_tokenizer(folder) else dataclasses.replace(spec, tokenizer=str(folder))
    else:
        spec = tok_spec = _folder_spec(folder, dtype, trust_remote_code, run_spec)
        model = load_export(get_adapter(spec), folder)
    problems = [p for p in get_adapter(tok_spec).validate() if "tokenizer" in p or "trust_remote_code" in p]
    if problems:
        hint = problems[0] if run_spec is not None else problems[0].replace(
            "set model.trust_remote_code=true", "pass --trust-remote-code (Python: trust_remote_code=True)")
        raise XtuneError(f"{folder}: {hint}")
    template = run_spec.data.template if run_spec is not None else "auto"
    return Loaded(model, get_adapter(tok_spec).load_tokenizer(), spec, template, str(folder))


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))


def _adapter_base(folder: Path) -> Path:
    cfg_path = folder / ADAPTER_CONFIG
    try:
        base = json.loads(cfg_path.read_text()).get("base_model_name_or_path")
    except ValueError as e:
        raise XtuneError(f"{cfg_path}: not valid JSON ({e})") from None
    if not base:
        raise XtuneError(f"{folder} is a PEFT adapter folder whose {ADAPTER_CONFIG} names no base model "
                         "(base_model_name_or_path); expected the path of a Hugging Face model folder there")
    path = Path(base).expanduser()
    if not path.is_absolute() and not path.exists():
        path = (folder / base).resolve()  # a base given relative to the adapter folder
    if not (path / "config.json").is_file():
        raise XtuneError(f"{folder} is a PEFT adapter folder whose base model {base} (base_model_name_or_path in "
                         f"{ADAPTER_CONFIG}) is not here; expected a Hugging Face model folder at that path "
                         "(no hub downloads)")
    return path


def load_export(adapter, hf_dir: Path) -> torch.nn.Module:
    """The HF folder (or PEFT adapter folder) at `hf_dir` as the family's transformers model, in eval mode with
    the KV cache on. A PEFT adapter folder is applied by peft to its base and merged."""
    hf_dir = Path(hf_dir)
    if (hf_dir / ADAPTER_CONFIG).is_file():
        return _load_peft(adapter, hf_dir)
    config = adapter.config_from_dict(json.loads((hf_dir / "config.json").read_text()))
    if adapter.family == "auto" and config.model_type not in AUTO_MODEL_TYPES:
        return _from_pretrained(adapter, hf_dir)
    with torch.device("meta"):
        model = adapter.build_model(config, "sdpa")
    model.to_empty(device="cpu")
    adapter.reset_buffers(model)  # rotary inv_freq: not in checkpoints
    weights = adapter.read_hf_state_dict(hf_dir)
    result = model.load_state_dict(weights, strict=False)
    del weights
    model.tie_weights()
    tied = adapter.tied_output_key(config)  # an export leaves out the tied lm_head
    missing = [k for k in result.missing_keys if k != tied]
    if missing:
        raise XtuneError(f"{hf_dir} lacks {len(missing)} weights, e.g. {', '.join(missing[:5])}")
    _generation_config(model, hf_dir)
    return model.eval()


def _from_pretrained(adapter, hf_dir: Path) -> torch.nn.Module:
    """A causal LM the `auto` family does not train: transformers' own loader (safetensors only)."""
    return AutoModelForCausalLM.from_pretrained(
        str(hf_dir), use_safetensors=True, local_files_only=True, dtype=getattr(torch, adapter.spec.dtype),
        trust_remote_code=bool(adapter.spec.trust_remote_code), attn_implementation="sdpa").eval()


def _generation_config(model, folder: Path) -> None:
    """The folder's generation_config.json (its eos ids), as from_pretrained reads it; the KV cache on."""
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        cfg.use_cache = True


def _load_peft(adapter, hf_dir: Path) -> torch.nn.Module:
    from peft import PeftModel  # lazy: peft is a heavy import only adapter folders need

    base = load_export(adapter, _adapter_base(hf_dir))
    renamed = adapter.adapter_module_prefix()
    if renamed is None:
        return PeftModel.from_pretrained(base, str(hf_dir)).merge_and_unload().eval()
    # The adapter names the multimodal model's modules; generation runs on the text model built here.
    with tempfile.TemporaryDirectory() as tmp:
        for name in (ADAPTER_CONFIG, "adapter_model.safetensors"):
            shutil.copyfile(hf_dir / name, Path(tmp) / name)
        rename_adapter_modules(Path(tmp), renamed[1], renamed[0])
        return PeftModel.from_pretrained(base, tmp).merge_and_unload().eval()
