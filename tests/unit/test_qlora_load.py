"""QLoRA loads its base 4-bit as the weights arrive: never whole in the compute dtype.

References are independent of xtune: the folder loaded by transformers, each adapted linear weight quantized
with torchao's own `to_nf4` (the NF4 library xtune uses), and peft's `get_peft_model` over those 4-bit weights.
The memory test loads a model whose fp32 base is 120 MiB in a child process and bounds the peak memory growth
of the load at half of that (main's load, which materialised and loaded the whole base before quantizing, exceeds
the whole base).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed.tiny import ListLoader, child_env, save_tiny_hf
from tests.unit.test_models_streaming_load import PeakSampler
from tests.unit.test_tuning import assert_packed_equals_reference, peft_reference, randomize_b, spec_of, trainer_of

NF4_PARTS = ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean", "nf4")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def torchao_nf4(weight: torch.Tensor):
    """QLoRA's NF4: 64-value blocks, block scales double-quantized in groups of up to 256 (the largest
    power of two dividing the number of blocks, as torchao needs)."""
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    return to_nf4(weight, 64, math.gcd(weight.numel() // 64, 256))


def reference_bases(folder) -> dict:
    """{xtune's state key: NF4 of transformers' loaded weight} for every adapted linear layer."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    return {k.removesuffix(".weight") + ".base_layer.weight": torchao_nf4(v)
            for k, v in model.state_dict().items() if k.rsplit(".", 2)[-2] in TARGETS}


def nf4_parts(t) -> dict:
    return {p: getattr(t, p) for p in NF4_PARTS}


def assert_same_nf4(got: dict, want: dict) -> None:
    """Bit-identical packed codes, block scales and double-quantization state."""
    assert sorted(got) == sorted(want) and want
    for k, w in want.items():
        g = got[k]
        assert (g["shape"] if isinstance(g, dict) else g.shape) == w.shape, k
        g = g if isinstance(g, dict) else nf4_parts(g)
        for part, value in nf4_parts(w).items():
            assert torch.equal(g[part], value), (k, part)


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "init"
    save_tiny_hf(folder, seed=11)
    return folder


def test_streamed_4bit_base_is_torchao_nf4_of_the_weights_and_trains_like_peft(init_dir, tmp_path):
    from xtune.peft.quant import is_nf4

    tr = trainer_of(spec_of(init_dir, "peft=qlora", "peft.r=4", "peft.alpha=8", "peft.dropout=0.0"), tmp_path / "run")
    try:
        bases = {n: p for n, p in tr.model.named_parameters() if n.endswith("base_layer.weight")}
        assert len(bases) == 2 * 7 and all(is_nf4(p) for p in bases.values())
        want = reference_bases(init_dir)
        assert_same_nf4(bases, want)
        # Loss and adapter gradients of a packed row == peft's model over the same 4-bit weights, document by
        # document (so a QLoRA run trains exactly as before: main quantized the fully loaded weights the same way).
        ref, inner, ours, theirs = peft_reference(init_dir, tr)
        for k, w in want.items():
            inner.get_submodule(k.removesuffix(".weight")).weight = torch.nn.Parameter(w, requires_grad=False)
        randomize_b(tr.model, 0)
        docs = [d for row in ListLoader(1, 1, 0, 1, 1, seed=9, docs_per_row=4).rows_of_step(0) for d in row]
        assert_packed_equals_reference(tr, ref, ours, theirs, docs)
    finally:
        tr.close()


def test_a_base_weight_missing_from_the_folder_is_named(init_dir, tmp_path):
    """The bases quantized on arrival are still checked: a folder without one fails with its name."""
    import shutil

    from safetensors.torch import load_file, save_file

    from xtune.errors import XtuneError

    folder = tmp_path / "lacking"
    shutil.copytree(init_dir, folder)
    sd = load_file(str(folder / "model.safetensors"))
    del sd["model.layers.1.mlp.down_proj.weight"]
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    try:
        with pytest.raises(XtuneError, match=r"lacks 1 weights of the model, e.g. model.layers.1.mlp.down_proj"):
            trainer_of(spec_of(folder, "peft=qlora"), tmp_path / "run")
    finally:  # the trainer never got built, so nothing closed the process group trainer_of started (train() does)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------------------- memory

# Many small layers: the base (~125 MiB in fp32) is large next to what quantizing one weight needs (torchao's
# temporaries, ~64 bytes per value of the largest weight, 4 MiB here).
ARCH = dict(vocab_size=1024, hidden_size=128, intermediate_size=512, num_hidden_layers=128, num_attention_heads=2,
            num_key_value_heads=1, head_dim=64, max_position_embeddings=512, tie_word_embeddings=False)


def _child(folder: str, out: str) -> None:
    """A single-process QLoRA build from `folder` (the trainer's build_sharded); reports the peak memory growth."""
    import peft  # noqa: F401  (imported before the baseline: library code is not the load's memory)
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4  # noqa: F401

    from tests.unit.test_tuning import BASE
    from xtune.config.compose import load_spec
    from xtune.models import get_adapter
    from xtune.parallel.distributed import init_distributed
    from xtune.parallel.fsdp import build_sharded
    from xtune.peft.quant import is_nf4

    spec = load_spec(BASE + [f"model.load_from={folder}", "peft=qlora", "peft.r=4"])[1]
    denv = init_distributed(spec.parallel)
    adapter = get_adapter(spec.model)
    read = adapter.iter_hf_state_dict
    samplers = []

    def read_and_sample(folder_):
        # Memory growth from the first file read to the last one's quantization (before it: the model's
        # modules and the other weights, materialised empty); a sample per file too, whatever the thread managed.
        with PeakSampler() as sampler:
            samplers.append(sampler)
            for batch in read(folder_):
                sampler.sample()
                yield batch
                sampler.sample()

    adapter.iter_hf_state_dict = read_and_sample
    root, _, _ = build_sharded(adapter, spec, denv, "sdpa", lambda m, _impl: m)
    (sampler,) = samplers
    params = dict(root.named_parameters())
    n4 = [n for n, p in params.items() if is_nf4(p)]
    base_fp32 = 4 * sum(p.numel() for p in params.values() if is_nf4(p))
    rest_fp32 = 4 * sum(p.numel() for p in params.values() if not is_nf4(p))
    Path(out).write_text(json.dumps({"growth": sampler.peak * 1024, "samples": sampler.samples, "nf4": len(n4),
                                     "base_fp32": base_fp32, "rest_fp32": rest_fp32}))
    denv.close()


def test_qlora_load_never_holds_the_base_in_full_precision(tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    folder = tmp_path / "m"
    torch.manual_seed(0)
    Qwen3ForCausalLM(Qwen3Config(**ARCH)).save_pretrained(str(folder), max_shard_size="8MB")
    files = list(folder.glob("*.safetensors"))
    assert len(files) >= 10
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "tests.unit.test_qlora_load", str(folder), str(out)],
                          capture_output=True, text=True,
                          timeout=300, env=child_env(), cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["nf4"] == 7 * ARCH["num_hidden_layers"] and r["samples"] >= 2 * len(files)
    # What the load may add: the other weights and adapters (fp32; materialised but untouched before), the 4-bit
    # base (~0.53 byte per value), one shard file and one weight being quantized with torchao's temporaries:
    # about 0.3x the fp32 base here. Holding the whole base in fp32 at once (materialise, load, then quantize, as
    # main did) is over 1x.
    bound = r["rest_fp32"] + 0.5 * r["base_fp32"]
    print(f"fp32 base {r['base_fp32'] / 2**20:.1f} MiB, rest {r['rest_fp32'] / 2**20:.1f} MiB; "
          f"peak growth while loading {r['growth'] / 2**20:.1f} MiB ({r['samples']} samples)")
    assert r["growth"] < bound, f"peak growth {r['growth'] / 2**20:.1f} MiB >= bound {bound / 2**20:.1f} MiB"


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
