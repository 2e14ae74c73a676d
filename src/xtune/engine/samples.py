"""End-of-run samples: greedy completions of `train.sample_prompts` by the exported model.

The model is built with transformers' own class for the family (`adapter.model_cls`: Qwen3, Qwen3-MoE,
InternVL) and the export's weights are read back by the adapter, so an export in Intern-S1's original
`interns1` layout (whose config names remote code that does not run on transformers 5, and whose
`auto_map` has no image-text class) generates without running any code from the folder. What is
generated from is what was written: the export, not the training copy.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable, List, Optional

import torch
import transformers

from xtune.checkpoint.hf_export import rename_adapter_modules
from xtune.errors import XtuneError


def load_export(adapter, hf_dir: Path) -> torch.nn.Module:
    """The export at `hf_dir` as the family's transformers model (eval mode, KV cache on). A PEFT adapter folder
    (an adapter run with peft.merge_on_export=false) is applied by peft to its base and merged."""
    adapter_config = Path(hf_dir) / "adapter_config.json"
    if adapter_config.is_file():
        from peft import PeftModel  # lazy: peft is a heavy import only adapter exports need

        base = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
        if not base:
            raise XtuneError(f"{adapter_config} names no base model (base_model_name_or_path)")
        renamed = adapter.adapter_module_prefix()
        if renamed is None:
            return PeftModel.from_pretrained(load_export(adapter, Path(base)), str(hf_dir)).merge_and_unload().eval()
        # The adapter names the multimodal model's modules; samples run on the text model built here.
        with tempfile.TemporaryDirectory() as tmp:
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                shutil.copyfile(Path(hf_dir) / name, Path(tmp) / name)
            rename_adapter_modules(Path(tmp), renamed[1], renamed[0])
            return PeftModel.from_pretrained(load_export(adapter, Path(base)), tmp).merge_and_unload().eval()
    config = adapter.config_from_dict(json.loads((Path(hf_dir) / "config.json").read_text()))
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
    for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        cfg.use_cache = True
    return model.eval()


def prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    """[1, T] ids of one user turn and the assistant header (plain text without a chat template)."""
    if getattr(tokenizer, "chat_template", None):
        # enable_thinking=False renders the empty think block, as in the trained answers.
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            enable_thinking=False, return_tensors="pt")
        return ids if torch.is_tensor(ids) else ids["input_ids"]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


DISPLAY_CHARS = 160


def display(text: str, limit: int = DISPLAY_CHARS) -> str:
    """One readable line: line breaks shown as ' ⏎ ' with blank lines and whitespace runs collapsed, cut with an
    ellipsis past `limit` characters; an answer of nothing but whitespace (an undertrained model) is '(empty)'."""
    lines = [" ".join(line.split()) for line in text.splitlines()]
    flat = " ⏎ ".join(line for line in lines if line)
    if not flat:
        return "(empty)"
    return flat if len(flat) <= limit else flat[:limit - 1].rstrip() + "…"


def generate_samples(adapter, tokenizer, hf_dir: Path, prompts: List[str], max_new_tokens: int, step: int,
                     out_file: Optional[Path] = None, log: Callable[[str], None] = print,
                     text_log: Optional[Callable[[str, str, int], None]] = None) -> list:
    """Greedy completions of `prompts` by the export at `hf_dir`; appended to `out_file` (JSON lines, full text),
    shown in `log` as one readable line each and given to `text_log(tag, markdown, step)` (TensorBoard text)."""
    transformers.utils.logging.disable_progress_bar()
    model = load_export(adapter, hf_dir)
    out = []
    for prompt in prompts:
        ids = prompt_ids(tokenizer, prompt)
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, use_cache=True,
                                 max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
        out.append({"step": step, "prompt": prompt, "completion": text})
        log(f"sample @ step {step}> {display(prompt, 80)} -> {display(text)}")
        if text_log is not None:
            text_log(f"samples/{len(out) - 1}", f"**{prompt}**\n\n{text}", step)
    if out_file is not None:
        with open(out_file, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in out)
    return out
