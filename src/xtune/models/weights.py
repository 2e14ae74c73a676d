"""Weight I/O in the layout of a Hugging Face folder: reading it (sharded or not, one file at a time), the
family's key maps between that layout and the model's, and writing an export that is a drop-in replacement
for the folder it came from (config.json, generation config, shards + index, tokenizer, passthrough files).

`HFWeights` is one part of `ModelAdapter` (models/base.py); a family overrides its key maps.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import GenerationConfig

from xtune.errors import XtuneError
from xtune.models.build import deep_update, plain
from xtune.models.safetensors_io import SafetensorsView

WEIGHTS_INDEX = "model.safetensors.index.json"
WEIGHTS_SINGLE = "model.safetensors"
# Files that travel from the original folder into an export when xtune does not write them itself
# (remote code and processor configs), so the export stays a drop-in replacement.
PASSTHROUGH_SUFFIXES = (".py",)
PASSTHROUGH_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


def rename_prefix(key: str, pairs) -> str | None:
    """`key` with the first matching `old` prefix of (old, new) `pairs` replaced by `new`; None if none match."""
    for old, new in pairs:
        if key.startswith(old):
            return new + key[len(old):]
    return None


class KeyStream:
    """Original-layout (key, tensor) pairs in, model-layout ones out as soon as they are complete."""

    def __init__(self, convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]):
        self.convert = convert

    def push(self, key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.convert({key: tensor})

    def close(self) -> None:
        """Raise if something pushed is still incomplete."""


class HFWeights:
    spec: Any  # the model spec (config/schema.ModelSpec), set by ModelAdapter

    # ----------------------------------------------------------------- weights: read
    def _weight_files(self, folder: Path) -> dict[str, list[str]]:
        """{shard file: [original keys]} from the index, or the single file."""
        if not folder.is_dir():
            raise XtuneError(f"model weights: {folder} is not a folder")
        index = folder / WEIGHTS_INDEX
        if index.is_file():
            try:
                with open(index) as f:
                    weight_map = json.load(f).get("weight_map")
            except (ValueError, AttributeError) as e:  # cut short, or not the index's JSON object
                raise XtuneError(f"{index}: not a valid safetensors index ({e}); copy or download it again") from None
            if not weight_map or not isinstance(weight_map, dict):
                raise XtuneError(f"{index} has no weight_map")
            files: dict[str, list[str]] = {}
            for key, fname in weight_map.items():
                files.setdefault(fname, []).append(key)
            missing = [f for f in files if not (folder / f).is_file()]
            if missing:
                raise XtuneError(f"{folder}: shard(s) listed in {WEIGHTS_INDEX} are missing: {', '.join(sorted(missing))}")
            return files
        single = folder / WEIGHTS_SINGLE
        if single.is_file():
            return {WEIGHTS_SINGLE: []}  # empty list: all keys of the file
        raise XtuneError(f"{folder} has no {WEIGHTS_SINGLE} or {WEIGHTS_INDEX}")

    def read_original_state_dict(self, folder) -> dict[str, torch.Tensor]:
        folder = Path(str(folder)).expanduser()
        out: dict[str, torch.Tensor] = {}
        for fname, keys in self._weight_files(folder).items():
            with safe_open(str(folder / fname), framework="pt") as f:
                for key in keys or list(f.keys()):
                    out[key] = f.get_tensor(key)
        return out

    def to_model_keys(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Original layout -> model layout (identity unless a family overrides it)."""
        return sd

    def to_original_keys(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Model layout -> original layout (identity unless a family overrides it)."""
        return sd

    def adapter_module_prefix(self) -> tuple[str, str] | None:
        """(prefix in the trained model, prefix in the model an adapter export loads onto) when they differ."""
        return None

    def key_stream(self, original_keys: list[str]) -> KeyStream:
        """Converts the original layout to the model's one (key, tensor) at a time; `original_keys` are all
        the keys that will be pushed. Families whose map is per key use `to_model_keys` on each."""
        return KeyStream(self.to_model_keys)

    def iter_hf_state_dict(self, folder) -> Iterator[dict[str, torch.Tensor]]:
        """The weights of a Hugging Face folder in the model's key names, one shard file at a time, so
        that a reader never holds more than one file plus what a family is still assembling (the MoE
        experts of a layer split over two files). Tensors are views of the mapped files
        (`SafetensorsView`): copy them before writing to them."""
        folder = Path(str(folder)).expanduser()
        files = self._weight_files(folder)
        for fname, keys in files.items():
            if not keys:
                files[fname] = SafetensorsView(folder / fname).keys()
        stream = self.key_stream([k for keys in files.values() for k in keys])
        for fname, keys in files.items():
            f = SafetensorsView(folder / fname)
            batch: dict[str, torch.Tensor] = {}
            for key in keys:
                if key not in f.header:
                    raise XtuneError(f"{folder / fname} lacks {key}, which {WEIGHTS_INDEX} puts there")
                batch.update(stream.push(key, f.get(key)))
            del f  # the mapping goes when the consumer drops the batch's views
            yield batch
        stream.close()

    def read_hf_state_dict(self, folder) -> dict[str, torch.Tensor]:
        """Read a Hugging Face folder (sharded with an index, or one file) into the model's key names."""
        out: dict[str, torch.Tensor] = {}
        for batch in self.iter_hf_state_dict(folder):
            out.update(batch)
        return out

    # ----------------------------------------------------------------- weights: save
    def original_config_json(self, config, dtype: torch.dtype | None) -> dict[str, Any]:
        """The config.json written by save_hf: the original one (+ arch overrides) when there is one,
        else transformers' own serialisation of `config`."""
        original = self.original_config_dict()
        if original is not None:
            d = deep_update(original, plain(dict(self.spec.arch or {})))
        else:
            d = config.to_dict()
            d["architectures"] = [self.model_class(config).__name__]
            d["use_cache"] = True
        if dtype is not None:
            name = str(dtype).replace("torch.", "")
            d["torch_dtype" if "torch_dtype" in d else "dtype"] = name
        return d

    def tied_output_key(self, config) -> str | None:
        tied = getattr(config, "tie_word_embeddings", False) or getattr(
            config.get_text_config(), "tie_word_embeddings", False
        )
        return "lm_head.weight" if tied else None

    def save_hf(self, full_state_dict: dict[str, torch.Tensor], config, tokenizer, out_dir,
                max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
        """Write a Hugging Face folder in the original layout: config.json, generation_config.json,
        safetensors shards + index, tokenizer files (with chat template), passthrough files."""
        out = Path(str(out_dir)).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        sd = dict(full_state_dict)
        tied = self.tied_output_key(config)
        if tied:
            sd.pop(tied, None)  # safetensors refuses shared tensors; transformers re-ties on load
        sd = self.to_original_keys(sd)
        sd = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
        float_dtypes = {v.dtype for v in sd.values() if v.is_floating_point()}
        dtype = float_dtypes.pop() if len(float_dtypes) == 1 else None

        # Greedy sharding in key order; file names follow transformers' convention.
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for key in sorted(sd):
            nbytes = sd[key].numel() * sd[key].element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][key] = sd[key]
            size += nbytes
        for stale in list(out.glob("model*.safetensors")) + [out / WEIGHTS_INDEX]:
            stale.unlink(missing_ok=True)
        if len(shards) == 1:
            save_file(shards[0], str(out / WEIGHTS_SINGLE), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(out / name), metadata={"format": "pt"})
                weight_map.update({k: name for k in shard})
            total = sum(v.numel() * v.element_size() for v in sd.values())
            with open(out / WEIGHTS_INDEX, "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)

        self._fill_special_ids(config, tokenizer)
        with open(out / "config.json", "w") as f:
            json.dump(self.original_config_json(config, dtype), f, indent=2, sort_keys=True)
        self._save_generation_config(config, out)
        self._copy_passthrough(out)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out))
        return out

    @staticmethod
    def _fill_special_ids(config, tokenizer) -> None:
        """A random-init config has no special token ids; take them from the tokenizer so that
        `generate()` on the export stops at the end of the turn."""
        if tokenizer is None:
            return
        for cfg in {id(c): c for c in (config, config.get_text_config())}.values():
            for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
                if getattr(cfg, attr, None) is None and getattr(tokenizer, attr, None) is not None:
                    setattr(cfg, attr, getattr(tokenizer, attr))

    def _save_generation_config(self, config, out: Path) -> None:
        src = Path(str(self.spec.load_from)).expanduser() / "generation_config.json" if self.spec.load_from else None
        if src is not None and src.is_file():
            shutil.copyfile(src, out / "generation_config.json")
            return
        generation = GenerationConfig.from_model_config(config.get_text_config())
        generation.use_cache = True  # training turns the KV cache off; inference wants it
        generation.save_pretrained(str(out))

    def _copy_passthrough(self, out: Path) -> None:
        if self.spec.load_from is None:
            return
        src = Path(str(self.spec.load_from)).expanduser()
        for path in src.iterdir():
            if path.is_file() and (path.suffix in PASSTHROUGH_SUFFIXES or path.name in PASSTHROUGH_FILES):
                shutil.copyfile(path, out / path.name)
