"""Hugging Face export: from the live sharded model (during a run) or from any checkpoint folder."""

from __future__ import annotations

import copy
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from xtune import peft as xpeft
from xtune.checkpoint.dcp import load_model_only, read_marker
from xtune.config.io import spec_from_yaml
from xtune.config.schema import RunSpec
from xtune.errors import CheckpointError, XtuneError
from xtune.models import get_adapter
from xtune.parallel.build import meta_model
from xtune.parallel.fsdp import retie
from xtune.peft.quant import dequantize_state, quantize_bases


def gather_full_state_dict(model: torch.nn.Module) -> dict:
    """Collective: the full (unsharded) weights, on CPU, on rank 0 only (other ranks get {})."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def write_hf(adapter, full_state_dict: dict, config, tokenizer, out_dir: str | Path) -> Path:
    """The HF folder in the original layout, written so that `out_dir` is never half-written."""
    return replace_dir(out_dir, lambda tmp: adapter.save_hf(full_state_dict, config, tokenizer, tmp))


def write_peft(adapter, spec: RunSpec, lora_config, full_state_dict: dict, config, tokenizer, *, adapter_dir=None,
               merged_dir=None, dtype: torch.dtype = torch.float32) -> None:
    """The PEFT folder (adapter_config.json + adapter_model.safetensors, what PeftModel.from_pretrained, vLLM
    and LMDeploy read) and optionally the merged model in the original layout.

    peft itself writes the adapter format and merges: the base model is rebuilt on the meta device, wrapped
    with the run's LoraConfig, and given the trained tensors without a copy (`assign`). A 4-bit base is
    dequantised to `dtype` (the compute dtype) first, so the merge adds the adapters to the weights trained on.
    """
    from peft import get_peft_model  # lazy: peft is a heavy import only adapter runs need

    full = dequantize_state(full_state_dict, dtype)
    with torch.device("meta"):
        model = adapter.build_model(config, "sdpa")
    with warnings.catch_warnings():  # peft 0.21 asks transformers 5 a deprecated is_gradient_checkpointing
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, copy.deepcopy(lora_config), low_cpu_mem_usage=True)
    # Set after wrapping: get_peft_model renames it to the (meta) model's own name_or_path.
    peft_model.peft_config["default"].base_model_name_or_path = str(spec.model.load_from) if spec.model.load_from else None
    inner = peft_model.get_base_model()
    missing = [k for k in inner.load_state_dict(full, strict=False, assign=True).missing_keys]
    if missing:
        raise RuntimeError(f"the adapted model lacks {len(missing)} weights, e.g. {missing[:3]}")

    def fill_adapter(tmp: Path) -> None:
        with warnings.catch_warnings():  # the same question again
            warnings.simplefilter("ignore", FutureWarning)
            peft_model.save_pretrained(str(tmp))
        renamed = adapter.adapter_module_prefix()
        if renamed is not None:
            rename_adapter_modules(tmp, *renamed)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))

    if adapter_dir is not None:
        replace_dir(adapter_dir, fill_adapter)
    if merged_dir is not None:
        merged = peft_model.merge_and_unload()
        write_hf(adapter, merged.state_dict(), config, tokenizer, merged_dir)


def rename_adapter_modules(folder: Path, old: str, new: str) -> None:
    """Rename the adapted modules of a PEFT folder from `old...` to `new...` (keys and target_modules), for
    an adapter trained on the text part of a multimodal model and loaded onto the whole model."""
    weights = folder / "adapter_model.safetensors"
    head = "base_model.model."
    sd = load_file(str(weights))
    sd = {(head + new + k[len(head + old):] if k.startswith(head + old) else k): v for k, v in sd.items()}
    save_file(sd, str(weights), metadata={"format": "pt"})
    cfg_path = folder / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    targets = cfg.get("target_modules")
    if isinstance(targets, list):
        cfg["target_modules"] = sorted(new + t[len(old):] if t.startswith(old) else t for t in targets)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def replace_dir(out_dir: str | Path, fill) -> Path:
    """Run `fill(tmp)` on a sibling temp folder, then swap it in for `out_dir`."""
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fill(tmp)
    if out.exists():
        for _, sub in step_exports(out):
            os.rename(sub, tmp / sub.name)
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)
    return out


def step_exports(hf_root: Path) -> list:
    """(step, folder) of the periodic exports `hf_root/step-N`, oldest first."""
    if not hf_root.is_dir():
        return []
    return sorted((int(p.name[5:]), p) for p in hf_root.iterdir()
                  if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit())


def prune_step_exports(hf_root: Path, keep_last: int) -> None:
    """train.keep_last applies to the periodic exports as to checkpoints (<= 0 keeps all)."""
    if keep_last > 0:
        for _, old in step_exports(hf_root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def export_checkpoint(ckpt_dir: str | Path, out_dir: str | Path, spec: RunSpec=None, adapter=None,
                      what: str | None = None) -> Path:
    """Checkpoint folder (run_dir/checkpoints/step-N) -> HF folder, in this single process.

    The run's config.yaml (two levels up) says which model to build; the DCP shards are resharded
    into one unsharded model on CPU, whatever the number of ranks that wrote them. For an adapter run,
    `what` is `adapter` (the PEFT folder) or `merged` (the full model); by default the run's
    peft.merge_on_export decides. The frozen base comes from model.load_from (or the run's saved base).
    """
    ckpt = Path(ckpt_dir)
    read_marker(ckpt)
    run_dir = ckpt.resolve().parent.parent
    if spec is None:
        cfg = run_dir / "config.yaml"
        if not cfg.is_file():
            raise CheckpointError(f"{cfg} not found: export needs the run's config.yaml two levels above {ckpt}")
        spec = spec_from_yaml(cfg)
    if not xpeft.enabled(spec.peft):
        if what is not None:
            raise XtuneError(f"--{'adapter-only' if what == 'adapter' else 'merged'}: {ckpt} is from a full-parameter "
                             "run (no adapters); export it without the flag")
        adapter = adapter or get_adapter(spec.model)
        model, config = build_plain_model(adapter, spec)
        load_model_only(ckpt, model)
        return write_hf(adapter, model.state_dict(), config, adapter.load_tokenizer(), out_dir)
    spec = xpeft.with_saved_base(spec, run_dir)
    adapter = adapter or get_adapter(spec.model)
    model, config, lora_config = build_plain_peft_model(adapter, spec)
    load_model_only(ckpt, model, trainable_only=True)
    what = what or ("merged" if spec.peft.merge_on_export else "adapter")
    out = Path(out_dir)
    write_peft(adapter, spec, lora_config, model.state_dict(), config, adapter.load_tokenizer(),
               adapter_dir=out if what == "adapter" else None, merged_dir=out if what == "merged" else None)
    return out


def build_plain_model(adapter, spec: RunSpec, attn_impl: str | None = "sdpa"):
    """An unsharded model on CPU with only its buffers initialised (weights come from a checkpoint)."""
    model, config, _ = _build_plain(adapter, spec, attn_impl, peft=False)
    return model, config


def build_plain_peft_model(adapter, spec: RunSpec, attn_impl: str | None = "sdpa"):
    """The adapted model on CPU with its base loaded (and NF4-rounded for QLoRA, as in training); the
    adapters come from a checkpoint. Returns (model, config, LoraConfig)."""
    model, config, lora_config = _build_plain(adapter, spec, attn_impl, peft=True)
    base = adapter.read_hf_state_dict(spec.model.load_from)
    model.load_state_dict(xpeft.to_peft_keys(model.state_dict().keys(), base), strict=False)
    if spec.peft.quantize == "nf4":
        quantize_bases(model)
    xpeft.init_adapter_weights(model, spec.train.seed)  # modules_to_save copies; adapters are overwritten
    return model, config, lora_config


def _build_plain(adapter, spec: RunSpec, attn_impl, peft: bool):
    model, config, lora_config = meta_model(adapter, spec, attn_impl, adapters=peft)
    model.to_empty(device="cpu")
    adapter.reset_buffers(model)  # the weights come from a checkpoint next; only the buffers are computed
    retie(model)
    return model, config, lora_config
