"""Build the model on the meta device, shard it with FSDP2, materialise it and load its weights.

Parameters are created on `meta`, sharded per block, and only the local shard is materialised (`to_empty`).
Pretrained weights are read by rank 0 alone and broadcast shard by shard (`broadcast_from_rank0`), so a model
larger than one process's memory loads. A random init is made whole on rank 0 and broadcast the same way,
so that it does not depend on the number of ranks.
"""

from __future__ import annotations

import copy
import ctypes
import logging

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from xtune import peft as xpeft
from xtune.config.schema import RunSpec
from xtune.errors import XtuneError
from xtune.parallel import attention
from xtune.parallel.build import DTYPES, meta_model
from xtune.peft import quant
from xtune.peft.quant import quantize_into

log = logging.getLogger("xtune.engine")



def param_dtype(parallel, device: torch.device) -> torch.dtype:
    if parallel.param_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[parallel.param_dtype]


def checkpointed_indices(n_blocks: int, ratio: float) -> list[int]:
    """Evenly spread `ratio * n_blocks` blocks (e.g. 0.5 of 8 -> every second block)."""
    if ratio <= 0:
        return []
    return [i for i in range(n_blocks) if int((i + 1) * ratio) > int(i * ratio)]


def _replace_child(root: nn.Module, target: nn.Module, new: nn.Module) -> None:
    for parent in root.modules():
        for name, child in parent.named_children():
            if child is target:
                setattr(parent, name, new)
                return
    raise RuntimeError("block not found in model")


def apply_activation_checkpointing(root: nn.Module, blocks: list[nn.Module], ratio: float) -> list[nn.Module]:
    """Wrap the chosen blocks with checkpoint_wrapper (must happen before fully_shard)."""
    chosen = set(checkpointed_indices(len(blocks), ratio))
    out = []
    for i, block in enumerate(blocks):
        if i in chosen:
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False)
            _replace_child(root, block, wrapped)
            block = wrapped
        out.append(block)
    return out


def compile_blocks(blocks: list[nn.Module]) -> None:
    """`parallel.compile`: each block compiled in place (after activation checkpointing, before fully_shard, so
    FSDP2's hooks stay outside the graph), with a dynamic sequence length: a packed row of a new length reuses the
    graph. The attention functions are excluded from tracing (their per-document work depends on the row's
    document boundaries), so a new document layout recompiles nothing either."""
    for block in blocks:
        block.compile(dynamic=True)


def shard(root: nn.Module, blocks: list[nn.Module], parallel, mesh, device: torch.device,
          ignored: set | None = None) -> None:
    """fully_shard each block, then the root (which takes the remaining parameters). `ignored` parameters
    (QLoRA's 4-bit bases) stay whole on every rank, outside FSDP."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype(parallel, device),
                              reduce_dtype=DTYPES[parallel.reduce_dtype])
    offload = OffloadPolicy()
    if parallel.cpu_offload:
        if device.type == "cuda":
            offload = CPUOffloadPolicy()
        else:  # parameters already live in CPU memory; FSDP's offload would only try to pin it
            log.warning("parallel.cpu_offload has no effect on CPU; ignored")
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp, offload_policy=offload,
                    reshard_after_forward=parallel.reshard_after_forward, ignored_params=ignored or None)
    # The root's parameters (embeddings, lm_head) are needed again at the start of backward:
    # keeping them unsharded after forward saves an all-gather.
    fully_shard(root, mesh=mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=False,
                ignored_params=ignored or None)


def needs_fsdp(spec: RunSpec, denv) -> bool:
    """FSDP only where it does something: several ranks, a compute dtype other than the master
    weights' (mixed precision), or CPU offload on GPU. A single process otherwise trains the plain
    module: FSDP on one rank would only copy every parameter and gradient in and out each step
    (bench/README.md has its measured cost). Checkpoints, export and clipping work the same on both."""
    master = DTYPES[spec.model.dtype]
    return (denv.world_size > 1 or param_dtype(spec.parallel, denv.device) != master
            or (spec.parallel.cpu_offload and denv.device.type == "cuda"))


def build_sharded(adapter, spec: RunSpec, denv, attn_impl: str, make_root, on_base_ready=None):
    """Meta-init -> (adapters) -> (activation checkpointing) -> fully_shard -> to_empty -> init / load
    -> (4-bit base, adapter init).

    `make_root(model, attn_impl)` returns the FSDP root module wrapping the model (the loss module); `attn_impl` is
    the implementation its forward passes to `packed_kwargs` (parallel/attention.py switched the decoder to it).
    `on_base_ready(model, config)` runs once the base weights are initialised or loaded, before quantization
    when the base is random-init (the trainer saves it there); a QLoRA base loaded from a folder is 4-bit by
    then. Returns (root, model config, LoraConfig or None); the HF model is `root.model`.
    """
    # Where the weights come from: the adapter's model spec (a resumed random-init adapter run points it at
    # the base it saved).
    load_from = adapter.spec.load_from
    model, config, lora_config = meta_model(adapter, spec, attn_impl)
    forward_impl = attention.switch(adapter.language_model(model), attn_impl,
                                    denv.sp_group if denv.sp_size > 1 else None)
    quantize = lora_config is not None and spec.peft.quantize == "nf4"
    root = make_root(model, forward_impl)
    blocks = list(adapter.blocks(model))
    if spec.parallel.activation_checkpointing:
        blocks = apply_activation_checkpointing(model, blocks, spec.parallel.ac_ratio)
    if spec.parallel.compile:
        compile_blocks(blocks)
    if needs_fsdp(spec, denv):
        shard(root, blocks, spec.parallel, denv.mesh, denv.device, quant.ignored_params(model) if quantize else None)
    offload = spec.parallel.cpu_offload and denv.device.type == "cuda"
    device = torch.device("cpu") if offload else denv.device  # offload: shards stay on CPU
    # QLoRA from a folder: the bases are not materialised here; the load quantizes them one by one. A random-init
    # base is initialised whole and quantized after (the trainer saves it in full precision, on_base_ready).
    to_quantize = quant.take_off_bases(model) if quantize and load_from else None
    root.to_empty(device=device)
    with torch.no_grad():
        adapter.reset_buffers(model)  # non-persistent buffers (rotary inv_freq) are not in checkpoints
    retie(model)
    if not load_from:
        init_random_weights(adapter, model, spec, denv, attn_impl)
    torch.manual_seed(spec.train.seed)
    if load_from:
        load_full_weights(adapter, model, load_from, denv, to_quantize, device)
    if on_base_ready is not None:
        on_base_ready(model, config)
    if lora_config is not None:
        if quantize:
            quant.quantize_bases(model)  # a random-init base; or the weights too small to quantize (warns)
        xpeft.init_adapter_weights(model, spec.train.seed)
    return root, config, lora_config


def init_random_weights(adapter, model: nn.Module, spec: RunSpec, denv, attn_impl: str) -> None:
    """A random init that does not depend on the layout: rank 0 initialises one whole plain model (no
    adapters, wrappers or shards) from `train.seed` with transformers' own init, and every rank's shards
    take it by broadcast, the way loaded weights arrive. The same seed gives the same model on 1 rank or
    N (data parallel, HSDP, sequence parallel), so a run stays reproducible when its world size changes.
    Costs one unsharded copy of the model on rank 0 while it is sent (as a load from a folder does)."""
    full = {}
    if denv.is_main:
        # A copy of the config: building a model (and switching its attention) writes into its config, and an
        # adapter may hand out the one config the trained model was built with.
        with torch.device("meta"):
            plain = adapter.build_model(copy.deepcopy(adapter.build_config()), attn_impl)
        plain.to(dtype=DTYPES[spec.model.dtype])
        plain.to_empty(device="cpu")
        with torch.no_grad():
            torch.manual_seed(spec.train.seed)
            adapter.init_weights(plain)
        retie(plain)
        full = plain.state_dict()
        keys = list(model.state_dict().keys())
        if any(xpeft.is_adapter_key(k) for k in keys):  # base weights under peft's names (base_layer)
            full = xpeft.to_peft_keys(keys, full)
        del plain
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    set_model_state_dict(model, full, options=options)
    del full
    _return_freed_memory()


def retie(model: nn.Module) -> None:
    """`to_empty` gives each module its own new tensor, so on a plain (unsharded) module a tied output
    projection stops sharing the input embedding's parameter (FSDP2 keeps one parameter for both).
    Tie them again where the config says so; a load then fills both (the file has the embedding only)."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    tied = getattr(model.config.get_text_config(), "tie_word_embeddings", False)
    if tied and out is not None and inp is not None and out.weight is not inp.weight:
        out.weight = inp.weight


def load_full_weights(adapter, model: nn.Module, folder: str, denv, to_quantize: dict | None = None,
                      device: torch.device | None = None) -> None:
    """Rank 0 reads the HF folder one shard file at a time (`adapter.iter_hf_state_dict`); each batch
    reaches every rank's shards by broadcast before the next file is read, so no rank ever holds the
    whole checkpoint (nor a second, converted copy of it).

    `to_quantize` (QLoRA, quant.take_off_bases): base weights taken off the model, each materialised on
    `device` as it arrives, broadcast whole to every rank, quantized to NF4 and its full-precision copy dropped."""
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    to_quantize = dict(to_quantize or {})
    # With adapters the base weights sit under peft's wrapper names (q_proj.weight -> q_proj.base_layer.weight).
    keys = list(model.state_dict().keys()) + list(to_quantize) if denv.is_main else []
    peft_keys = keys if any(xpeft.is_adapter_key(k) for k in keys) else None
    batches = None
    if denv.is_main:
        batches = iter(adapter.iter_hf_state_dict(folder))
    loaded = set()
    while True:
        batch, status = {}, "done"
        if denv.is_main:
            try:
                batch = next(batches, None)
                while batch is not None and not batch:  # a file whose experts complete in the next one
                    batch = next(batches, None)
                status = "batch" if batch is not None else "done"
            except XtuneError as e:  # every rank stops, not only the reader
                status = f"error: {e}"
        status = denv.broadcast_object(status)
        if status.startswith("error: "):
            raise XtuneError(status[len("error: "):])
        if status == "done":
            break
        if denv.is_main:
            if peft_keys is not None:
                batch = xpeft.to_peft_keys(peft_keys, batch)
            loaded.update(batch)
        if to_quantize:
            _load_quantized(to_quantize, batch, denv, device)
        set_model_state_dict(model, batch if denv.is_main else {}, options=options)
        del batch
        _return_freed_memory()
    tied = _tied_names(model)
    # Rank 0 is the one that saw the files: its verdict is the one every rank acts on.
    missing = sorted(k for k in keys if k not in loaded and k not in tied
                     and not xpeft.is_adapter_key(k)) if denv.is_main else None
    missing = denv.broadcast_object(missing)
    if missing:
        raise XtuneError(f"{folder} lacks {len(missing)} weights of the model, e.g. {', '.join(missing[:5])}")


def _load_quantized(bases: dict, batch: dict, denv, device: torch.device) -> None:
    """The batch's weights of `bases` ({state key: (base linear, meta weight)}), taken out of rank 0's `batch`:
    each is materialised in its dtype, broadcast from rank 0, quantized on every rank and dropped."""
    names = [k for k in batch if k in bases] if denv.is_main else None
    if denv.world_size > 1:
        names = denv.broadcast_object(names)
    for name in names:
        base, meta = bases.pop(name)
        weight = torch.empty(meta.shape, dtype=meta.dtype, device=device)
        if denv.is_main:
            weight.copy_(batch.pop(name))
        if denv.world_size > 1:  # the 4-bit base is whole on every rank (FSDP-ignored)
            comm = weight.to(denv.comm_device)
            dist.broadcast(comm, src=0)
            weight = comm.to(device)
        quantize_into(base, weight)
        del weight
        _return_freed_memory()  # torchao's temporaries (~16 floats per value) would stay in the heap till the next file


def _return_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim). Once a buffer of a few MB has been
    freed, glibc's adaptive mmap threshold puts later ones of that size (the fused MoE experts of the
    next layer) in the heap, where freed chunks stay part of the RSS; trimming after each batch keeps
    the reader's footprint at what is alive. A no-op where libc has no malloc_trim."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _tied_names(model: nn.Module) -> set:
    """Names of parameters that share storage with an earlier one (tied lm_head / embeddings)."""
    seen, tied = {}, set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        seen.setdefault(id(p), name)
    return tied
