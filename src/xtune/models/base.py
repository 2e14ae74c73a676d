"""ModelAdapter: everything the engine needs to know about one model family.

The engine never touches transformers classes directly; it goes through an adapter:

    adapter = get_adapter(spec.model)
    config = adapter.build_config()
    with torch.device("meta"):
        model = adapter.build_model(config, attn_impl)
    ... fully_shard(adapter.blocks(model)), to_empty(), then either
    adapter.init_weights(model)                             # random init (from the torch seed)
    or adapter.reset_buffers(model) + load adapter.read_hf_state_dict(spec.load_from)
    hidden, aux = adapter.hidden_states(model, batch, attn_impl)
    loss = linear_cross_entropy(hidden, adapter.output_weight(model), batch.labels[0], ...)
    adapter.save_hf(full_state_dict, config, tokenizer, out_dir)

State dicts handed to and returned by the adapter use the *model's* key names (what
`model.state_dict()` gives); `read_hf_state_dict` / `save_hf` translate from / to the layout of the
original Hugging Face folder, so an export is a drop-in replacement for the folder it came from.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from ..config.validate import TOKENIZER_FILES, model_problems, remote_code_problem, tokenizer_dir
from ..errors import XtuneError

WEIGHTS_INDEX = "model.safetensors.index.json"
WEIGHTS_SINGLE = "model.safetensors"
# Files that travel from the original folder into an export when xtune does not write them itself
# (remote code and processor configs), so the export stays a drop-in replacement.
PASSTHROUGH_SUFFIXES = (".py",)
PASSTHROUGH_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3

def _deep_update(base: Dict[str, Any], overrides: Dict[str, Any]) -> Dict[str, Any]:
    """Recursive dict merge: nested dicts (text_config, vision_config) are merged, not replaced."""
    out = dict(base)
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_update(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _plain(value):
    """OmegaConf containers (ListConfig/DictConfig) and tuples -> plain Python for config classes."""
    if isinstance(value, dict) or hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or (hasattr(value, "__iter__") and not isinstance(value, (str, bytes))):
        return [_plain(v) for v in value]
    return value


class KeyStream:
    """Original-layout (key, tensor) pairs in, model-layout ones out as soon as they are complete."""

    def __init__(self, convert: Callable[[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]):
        self.convert = convert

    def push(self, key: str, tensor: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.convert({key: tensor})

    def close(self) -> None:
        """Raise if something pushed is still incomplete."""


class ModelAdapter:
    family: str = ""
    auto_class: str = "AutoModelForCausalLM"
    model_cls: Any = None  # transformers model class
    config_cls: Any = None  # transformers config class

    def __init__(self, spec):
        self.spec = spec

    # ----------------------------------------------------------------- paths and validation
    def tokenizer_path(self) -> Optional[Path]:
        return tokenizer_dir(self.spec)

    def validate(self) -> List[str]:
        """Cheap checks (no model, no tokenizer built): every problem found, as messages."""
        return model_problems(self.spec)

    # ----------------------------------------------------------------- tokenizer
    def load_tokenizer(self):
        from transformers import AutoTokenizer

        path = self.tokenizer_path()
        if path is None:
            raise XtuneError("no tokenizer: set model.tokenizer (a folder or builtin:NAME) or model.load_from")
        if not path.is_dir() or not any((path / f).is_file() for f in TOKENIZER_FILES):
            raise XtuneError(f"tokenizer files missing in {path} (expected one of {', '.join(TOKENIZER_FILES)})")
        # Remote code (Intern-S1's tokenizer is a Python class in the model folder) runs only with the
        # user's consent; the config stage already reported this, the check here guards direct callers.
        problem = remote_code_problem(self.spec)
        if problem:
            raise XtuneError(problem)
        try:
            # An explicit bool: None would make transformers ask on stdin.
            return AutoTokenizer.from_pretrained(str(path), local_files_only=True,
                                                 trust_remote_code=bool(self.spec.trust_remote_code))
        except ImportError as e:  # the tokenizer's own code needs a package (Intern-S1's: sentencepiece)
            extra = " (pip install 'xtune[intern_s1]')" if "sentencepiece" in str(e) else ""
            raise XtuneError(f"the tokenizer in {path} needs a Python package that is not installed{extra}: {e}") from e

    # ----------------------------------------------------------------- config
    def original_config_dict(self) -> Optional[Dict[str, Any]]:
        if self.spec.load_from is None:
            return None
        path = Path(str(self.spec.load_from)).expanduser() / "config.json"
        if not path.is_file():
            raise XtuneError(f"model.load_from: {path} not found")
        with open(path) as f:
            return json.load(f)

    def config_from_dict(self, d: Dict[str, Any]):
        """Original config.json dict -> the transformers config xtune builds the model from."""
        d = {k: v for k, v in d.items() if k not in ("architectures", "auto_map", "transformers_version")}
        d.pop("model_type", None)
        return self.config_cls(**d)

    def build_config(self):
        arch = _plain(dict(self.spec.arch or {}))
        original = self.original_config_dict()
        merged = _deep_update(original, arch) if original is not None else arch
        # transformers 5 validates configs with huggingface_hub's strict dataclasses (huggingface_hub 1.x).
        from huggingface_hub.errors import StrictDataclassError

        try:
            config = self.config_from_dict(merged)
        except (ValueError, TypeError, StrictDataclassError) as e:  # values that contradict each other
            where = f"{self.spec.load_from}/config.json with model.arch" if original is not None else "model.arch"
            raise XtuneError(f"the model config ({where}) is invalid: {e}") from None
        config.use_cache = False
        return config

    def original_config_json(self, config, dtype: Optional[torch.dtype]) -> Dict[str, Any]:
        """The config.json written by save_hf: the original one (+ arch overrides) when there is one,
        else transformers' own serialisation of `config`."""
        original = self.original_config_dict()
        if original is not None:
            d = _deep_update(original, _plain(dict(self.spec.arch or {})))
        else:
            d = config.to_dict()
            d["architectures"] = [self.model_class(config).__name__]
            d["use_cache"] = True
        if dtype is not None:
            name = str(dtype).replace("torch.", "")
            d["torch_dtype" if "torch_dtype" in d else "dtype"] = name
        return d

    # ----------------------------------------------------------------- model
    def model_class(self, config) -> Any:
        """The transformers class built for `config`."""
        return self.model_cls

    def build_model(self, config, attn_impl: str) -> nn.Module:
        dtype = getattr(torch, self.spec.dtype)
        model = self.model_class(config)._from_config(config, attn_implementation=attn_impl, dtype=dtype)
        model.config.use_cache = False
        return model

    @torch.no_grad()
    def init_weights(self, model: nn.Module) -> None:
        """Initialise a materialised model with transformers' own init, from the current torch seed."""
        for module in model.modules():
            module.__dict__.pop("_is_hf_initialized", None)
            for p in module.parameters(recurse=False):
                p.__dict__.pop("_is_hf_initialized", None)
        model.initialize_weights()
        model.tie_weights()

    @torch.no_grad()
    def reset_buffers(self, model: nn.Module) -> None:
        """Recompute non-persistent buffers (rotary inv_freq) that `to_empty` leaves uninitialised and
        that checkpoints do not contain. Call after materialising a meta model that gets loaded weights."""
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        for module in model.modules():
            if "RotaryEmbedding" in type(module).__name__ and hasattr(module, "original_inv_freq"):
                if module.rope_type == "default":
                    inv_freq, _ = module.compute_default_rope_parameters(module.config)
                else:
                    inv_freq, _ = ROPE_INIT_FUNCTIONS[module.rope_type](module.config)
                module.inv_freq.copy_(inv_freq)
                module.original_inv_freq.copy_(inv_freq)

    def language_model(self, model: nn.Module) -> nn.Module:
        """The text decoder (has .layers and .norm)."""
        return model.model

    def blocks(self, model: nn.Module) -> List[nn.Module]:
        return list(self.language_model(model).layers)

    def apply_freeze(self, model: nn.Module) -> None:
        if self.spec.freeze_language:
            for p in self.language_model(model).parameters():
                p.requires_grad_(False)
            for p in model.get_output_embeddings().parameters():
                p.requires_grad_(False)

    def output_weight(self, model: nn.Module) -> torch.Tensor:
        return model.get_output_embeddings().weight

    def final_hidden_module(self, model: nn.Module) -> nn.Module:
        """The module whose output (a tensor, or a model output whose first item is one) is the final
        hidden state: after the last norm, before the output projection."""
        return self.language_model(model).norm

    # ----------------------------------------------------------------- forward
    def _forward_kwargs(self, model, batch, attn_impl) -> Dict[str, Any]:
        from ..ops.attention import packed_kwargs

        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        return packed_kwargs(batch, attn_impl, dtype=dtype)

    def _extra_forward(self, model, batch) -> Tuple[Dict[str, Any], list]:
        """Family-specific forward kwargs and temporary hooks (removed after the forward)."""
        return {}, []

    def _aux_loss(self, model, outputs) -> Optional[torch.Tensor]:
        return None

    def hidden_states(self, model: nn.Module, batch, attn_impl: str) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Final hidden states [T, H] (after the last norm, before lm_head) and the aux loss or None.

        The root module's forward is called (not `model.model`) so FSDP2's root hooks unshard the
        embeddings / norm / lm_head; `logits_to_keep` is an empty index so no logits are computed,
        and the normed hidden states are taken with a forward hook on `final_hidden_module`.
        """
        captured: Dict[str, torch.Tensor] = {}

        def grab(_module, _inputs, output):
            captured["h"] = output if isinstance(output, torch.Tensor) else output[0]

        kwargs = self._forward_kwargs(model, batch, attn_impl)
        extra, hooks = self._extra_forward(model, batch)
        hooks.append(self.final_hidden_module(model).register_forward_hook(grab))
        try:
            outputs = model(
                input_ids=batch.input_ids,
                logits_to_keep=torch.empty(0, dtype=torch.long, device=batch.input_ids.device),
                **kwargs,
                **extra,
            )
        finally:
            for h in hooks:
                h.remove()
        hidden = captured["h"]
        return hidden.reshape(-1, hidden.shape[-1]), self._aux_loss(model, outputs)

    # ----------------------------------------------------------------- weights: read
    def _weight_files(self, folder: Path) -> Dict[str, List[str]]:
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
            files: Dict[str, List[str]] = {}
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

    def read_original_state_dict(self, folder) -> Dict[str, torch.Tensor]:
        from safetensors import safe_open

        folder = Path(str(folder)).expanduser()
        out: Dict[str, torch.Tensor] = {}
        for fname, keys in self._weight_files(folder).items():
            with safe_open(str(folder / fname), framework="pt") as f:
                for key in keys or list(f.keys()):
                    out[key] = f.get_tensor(key)
        return out

    def to_model_keys(self, sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Original layout -> model layout (identity unless a family overrides it)."""
        return sd

    def to_original_keys(self, sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Model layout -> original layout (identity unless a family overrides it)."""
        return sd

    def adapter_module_prefix(self) -> Optional[Tuple[str, str]]:
        """(prefix in the trained model, prefix in the model an adapter export loads onto) when they differ."""
        return None

    def key_stream(self, original_keys: List[str]) -> "KeyStream":
        """Converts the original layout to the model's one (key, tensor) at a time; `original_keys` are all
        the keys that will be pushed. Families whose map is per key use `to_model_keys` on each."""
        return KeyStream(self.to_model_keys)

    def iter_hf_state_dict(self, folder) -> Iterator[Dict[str, torch.Tensor]]:
        """The weights of a Hugging Face folder in the model's key names, one shard file at a time, so
        that a reader never holds more than one file plus what a family is still assembling (the MoE
        experts of a layer split over two files). Tensors are views of the mapped files
        (`SafetensorsView`): copy them before writing to them."""
        from .safetensors_io import SafetensorsView

        folder = Path(str(folder)).expanduser()
        files = self._weight_files(folder)
        for fname, keys in files.items():
            if not keys:
                files[fname] = SafetensorsView(folder / fname).keys()
        stream = self.key_stream([k for keys in files.values() for k in keys])
        for fname, keys in files.items():
            f = SafetensorsView(folder / fname)
            batch: Dict[str, torch.Tensor] = {}
            for key in keys:
                if key not in f.header:
                    raise XtuneError(f"{folder / fname} lacks {key}, which {WEIGHTS_INDEX} puts there")
                batch.update(stream.push(key, f.get(key)))
            del f  # the mapping goes when the consumer drops the batch's views
            yield batch
        stream.close()

    def read_hf_state_dict(self, folder) -> Dict[str, torch.Tensor]:
        """Read a Hugging Face folder (sharded with an index, or one file) into the model's key names."""
        out: Dict[str, torch.Tensor] = {}
        for batch in self.iter_hf_state_dict(folder):
            out.update(batch)
        return out

    # ----------------------------------------------------------------- weights: save
    def _tied_output_key(self, config) -> Optional[str]:
        tied = getattr(config, "tie_word_embeddings", False) or getattr(
            config.get_text_config(), "tie_word_embeddings", False
        )
        return "lm_head.weight" if tied else None

    def save_hf(self, full_state_dict: Dict[str, torch.Tensor], config, tokenizer, out_dir,
                max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
        """Write a Hugging Face folder in the original layout: config.json, generation_config.json,
        safetensors shards + index, tokenizer files (with chat template), passthrough files."""
        from safetensors.torch import save_file

        out = Path(str(out_dir)).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        sd = dict(full_state_dict)
        tied = self._tied_output_key(config)
        if tied:
            sd.pop(tied, None)  # safetensors refuses shared tensors; transformers re-ties on load
        sd = self.to_original_keys(sd)
        sd = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
        float_dtypes = {v.dtype for v in sd.values() if v.is_floating_point()}
        dtype = float_dtypes.pop() if len(float_dtypes) == 1 else None

        # Greedy sharding in key order; file names follow transformers' convention.
        shards: List[Dict[str, torch.Tensor]] = [{}]
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
        from transformers import GenerationConfig

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
