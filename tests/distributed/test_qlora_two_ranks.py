"""QLoRA on 2 ranks: the base, read by rank 0 from a multi-file folder and quantized as it arrives, is the same
4-bit base on both ranks, bit for bit torchao's NF4 of the weights transformers loads (the independent reference).
Training on 2 ranks from such a base: tests/integration/test_lora_families.py (qwen3_tiny, qlora)."""

import subprocess
import sys
from pathlib import Path

import torch

from tests.distributed.tiny import child_env, free_port, tiny_config
from tests.unit.test_qlora_load import assert_same_nf4, reference_bases

HERE = Path(__file__).resolve().parent


def test_two_ranks_load_the_same_4bit_base_as_torchao_on_the_transformers_weights(tmp_path):
    from transformers import Qwen3ForCausalLM

    init = tmp_path / "init"
    torch.manual_seed(5)
    Qwen3ForCausalLM(tiny_config()).save_pretrained(str(init), max_shard_size="50KB")
    assert len(list(init.glob("*.safetensors"))) >= 3  # names are broadcast per file
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                           "--master-addr=127.0.0.1", f"--master-port={free_port()}",
                           str(HERE / "qlora_load_worker.py"), str(init), str(tmp_path)],
                          env=child_env(), cwd=HERE.parents[1], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    want = reference_bases(init)
    assert len(want) == 2 * 7
    for rank in (0, 1):
        assert_same_nf4(torch.load(tmp_path / f"rank{rank}.pt"), want)
