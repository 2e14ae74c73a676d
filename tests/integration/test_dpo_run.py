"""`xtune dpo` end to end in one process with the real stages: LoRA + DPO takes its reference from the base with
the adapters disabled (checked against plain transformers on the saved base), trains adapters only, and logs
TRL's metric names; and `xtune data inspect` shows a pair's label masks."""

import json

import numpy as np
import torch

from tests.reliability.helpers import DEMO, xtune
from xtune.data.types import IGNORE_INDEX

BASE = ["recipe=demo_dpo", "train.max_steps=2", "train.global_batch_size=1", "train.log_every=1",
        "data.pack_max_length=256", "data.sample_max_length=128", "logging.tensorboard=false",
        "data.eval_datasets=[]", "train.eval_every=0", "train.save_every=0", "data.num_workers=0"]


def test_lora_dpo_reference_is_the_base_with_adapters_disabled(tmp_path, monkeypatch):
    from transformers import Qwen3ForCausalLM

    from xtune.config.compose import load_spec
    from xtune.data.loader import PackedData
    from xtune.launch.launcher import run
    from xtune.methods import reference_logps as reference_mod
    from xtune.models import get_adapter

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join((DEMO / "pref_train.jsonl").read_text().splitlines()[:12]) + "\n")
    _, spec = load_spec(BASE + [f"data.cache_dir={tmp_path / 'cache'}", "peft=lora",
                                f"data.datasets=[{{name:pref,path:{data}}}]"], command="dpo")

    # Give the adapters non-zero weights before the reference pass: only disabling them yields the base.
    compute = reference_mod.compute

    def perturbed(root, *a, **kw):
        with torch.no_grad():
            for name, p in root.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
        return compute(root, *a, **kw)

    monkeypatch.setattr(reference_mod, "compute", perturbed)
    run_dir = tmp_path / "run"
    assert run(spec, run_dir) == 0
    stored = np.load(next((run_dir / "reference").glob("train-*.npy")))

    # Independent: the saved random-init base in plain transformers, each pair half alone.
    base = Qwen3ForCausalLM.from_pretrained(str(run_dir / "base"), attn_implementation="eager").float()
    packed = PackedData(spec.data.datasets, spec, get_adapter(spec.model).load_tokenizer(), shuffle=False,
                        verbose=False)
    table = np.zeros((packed.num_pairs, 2))
    for k in range(2 * packed.num_pairs):
        ids, labels, _ = packed.item(k)
        with torch.no_grad():
            logits = base(input_ids=torch.tensor([ids.astype(np.int64)]), use_cache=False).logits[0]
        lab = torch.tensor(labels.astype(np.int64))
        mask = lab != IGNORE_INDEX
        pid = int(packed.pair_base[packed.items[k // 2][0]] + packed.items[k // 2][1])
        table[pid, k % 2] = float(torch.log_softmax(logits, -1)[mask].gather(1, lab[mask][:, None]).sum())
    np.testing.assert_allclose(stored, table, rtol=1e-5, atol=1e-4)

    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if "loss" in r]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected"):
        assert key in train[0]
    assert (run_dir / "hf_adapter" / "adapter_model.safetensors").is_file()
    from safetensors.torch import load_file

    assert all("lora_" in k or "modules_to_save" in k or "embed_tokens" in k or "lm_head" in k
               for k in load_file(str(run_dir / "hf_adapter" / "adapter_model.safetensors")))


def test_data_inspect_shows_the_label_masks_of_a_pair(tmp_path):
    out = xtune("data", "inspect", "recipe=demo_dpo", f"data.cache_dir={tmp_path}/cache", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "demo_pref" in out.stdout and "chosen sample" in out.stdout and "rejected sample" in out.stdout
    # The same pair, rendered with ANSI styles: prompt dim (untrained), responses bold green (trained).
    out = xtune("data", "inspect", "recipe=demo_dpo", f"data.cache_dir={tmp_path}/cache", timeout=300)
    assert out.returncode == 0


def test_dpo_config_errors_exit_2_before_anything_is_built(tmp_path):
    out = xtune("dpo", "pref.loss=kto", "pref.reference=none", "pref.loss=ipo", "data.pack=hard",
                f"train.work_dir={tmp_path}/r", timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "pref.reference=none: pref.loss=ipo needs reference init" in out.stderr
    assert "data.pack=hard" in out.stderr
    out = xtune("dpo", "pref.loss=kto", timeout=120)
    assert out.returncode == 2 and "pref.loss=kto" in out.stderr and "dpo, ipo, simpo, orpo" in out.stderr
    out = xtune("sft", "recipe=demo_dpo", timeout=120)
    assert out.returncode == 2 and "xtune dpo recipe=demo_dpo" in out.stderr.replace("\n", "")
