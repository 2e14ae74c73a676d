"""What a new user hit on a first try (issue 23, section 4), each through the real command line in this
process: exit 2 with one message, before anything is launched, never a traceback."""

from __future__ import annotations

from tests.reliability.helpers import GOOD, quick_run, write_lines
from tests.reliability.test_bad_input_table import xtune_here


def test_demo_recipe_arch_on_a_llama_folder_is_refused_before_launch(tmp_path):
    """`recipe=demo model.family=auto model.load_from=<Llama>`: the demo's arch (hidden 128) would be kept
    over the folder's config.json (hidden 64) and every rank died in a size mismatch."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "llama"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(folder)
    f = write_lines(tmp_path / "ok.jsonl", GOOD[:4])
    out = xtune_here(*quick_run(tmp_path, f"data.datasets=[{{name:x,path:{f}}}]", "model.family=auto",
                                f"model.load_from={folder}"))
    said = out.stdout + out.stderr
    assert out.returncode == 2 and "Traceback" not in said, said[-3000:]
    message = " ".join(out.stderr.split())
    assert f"model.arch.hidden_size=128 contradicts {folder}/config.json (hidden_size: 64)" in message, message
    assert not (tmp_path / "run").exists()  # refused before the run directory (or any worker) existed


def test_a_recipe_path_that_is_not_yaml_is_refused_without_echoing_it(tmp_path):
    secret = "root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"
    (tmp_path / "passwd").write_text(secret)
    for command in (["sft"], ["data", "inspect"], ["config", "show"]):
        out = xtune_here(*command, f"recipe={tmp_path}/passwd")
        said = out.stdout + out.stderr
        assert out.returncode == 2, said
        assert f"{tmp_path}/passwd: a recipe must be a YAML mapping" in " ".join(out.stderr.split()), said
        assert "root:x" not in said and "daemon" not in said and "Traceback" not in said, said
        assert len([ln for ln in out.stderr.splitlines() if ln.strip().startswith("-")]) == 1, said


def test_an_added_unknown_key_reads_as_any_unknown_key(tmp_path):
    added = xtune_here("sft", "recipe=demo", "+trian.seed=3", "--dry-run")
    plain = xtune_here("sft", "recipe=demo", "trian.seed=3", "--dry-run")
    assert added.returncode == plain.returncode == 2, added.stderr + plain.stderr
    assert "Traceback" not in added.stdout + added.stderr
    assert added.stderr == plain.stderr, (added.stderr, plain.stderr)
    assert "Did you mean 'train'?" in added.stderr
