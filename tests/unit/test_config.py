"""Composition and validation of the run spec: every recipe, overrides, and user mistakes."""

import dataclasses

import pytest

from xtune.config.compose import compose, load_spec, recipe_files, to_spec
from xtune.config.schema import RunSpec
from xtune.errors import ConfigError

# demo_grpo starts from the SFT demo's export (work_dirs/demo/sft/hf), which may not exist yet.
BIG = {"demo_grpo", "qwen3_8b_grpo",
       "intern_s1_mini", "intern_s1_mini_lora", "qwen3_8b", "qwen3_8b_dpo", "qwen3_8b_long", "qwen3_8b_qlora",
       "qwen3_30b_a3b"}


@pytest.mark.parametrize("recipe", sorted(recipe_files()))
def test_every_recipe_composes_and_validates(recipe, tmp_path):
    overrides = [f"recipe={recipe}"]
    if recipe in BIG:
        # Weights need not exist to compose and validate the rest of the spec.
        overrides.append(f"model.load_from={tmp_path}/weights")
    cfg = compose(overrides)
    spec = to_spec(cfg, check_files=recipe not in BIG)
    assert isinstance(spec, RunSpec)
    assert spec.recipe == recipe
    assert dataclasses.is_dataclass(spec.model) and spec.description


@pytest.mark.parametrize("peft", ["lora", "dora", "qlora"])
@pytest.mark.parametrize("recipe", sorted(recipe_files()))
def test_every_recipe_takes_every_peft_option(recipe, peft, tmp_path):
    overrides = [f"recipe={recipe}", f"peft={peft}"]
    if recipe in BIG:
        overrides.append(f"model.load_from={tmp_path}/weights")
    spec = to_spec(compose(overrides), check_files=recipe not in BIG)
    assert spec.peft.method == ("dora" if peft == "dora" else "lora")
    assert spec.peft.quantize == ("nf4" if peft == "qlora" else "none")


def test_qwen3_8b_qlora_has_the_seed_settings(tmp_path):
    _, spec = load_spec(["recipe=qwen3_8b_qlora", f"model.load_from={tmp_path}"], check_files=False)
    p = spec.peft
    assert (p.method, p.quantize, p.r, p.alpha, p.dropout, p.target_modules) == ("lora", "nf4", 64, 16, 0.1,
                                                                                   ["all-linear"])
    assert (spec.optim.lr, list(spec.optim.betas), spec.optim.max_grad_norm) == (2e-4, [0.9, 0.999], 1.0)
    assert (spec.sched.type, spec.sched.warmup_ratio, spec.data.pack_max_length) == ("cosine", 0.03, 2048)


def test_intern_s1_mini_lora_keeps_the_reference_freezing(tmp_path):
    _, spec = load_spec(["recipe=intern_s1_mini_lora", f"model.load_from={tmp_path}"], check_files=False)
    assert spec.peft.method == "lora" and spec.model.freeze_vision and spec.model.freeze_projector
    assert [d.sample_ratio for d in spec.data.datasets] == [5.0, 20.0]


def test_intern_s1_mini_matches_reference_configuration(tmp_path):
    _, spec = load_spec(["recipe=intern_s1_mini", f"model.load_from={tmp_path}"], check_files=False)
    assert spec.model.family == "intern_s1"
    assert [d.sample_ratio for d in spec.data.datasets] == [5.0, 20.0]
    assert (spec.data.sample_max_length, spec.data.pack_max_length, spec.data.pack) == (8192, 16384, "soft")
    assert spec.optim.lr == 1e-6 and spec.sched.type == "cosine" and spec.sched.warmup_ratio == 0.0
    assert (spec.loss.mode, spec.loss.chunk_size) == ("chunk", 1024)
    assert spec.train.global_batch_size == 8 and spec.train.epochs == 2 and spec.train.max_steps is None
    assert spec.model.freeze_vision and spec.model.freeze_projector and not spec.model.freeze_language
    assert spec.model.trust_remote_code is False  # consent comes from the user, on the command line


def test_intern_s1_mini_without_weights_fails_early_naming_load_from():
    cfg = compose(["recipe=intern_s1_mini"])  # composing needs no weights
    with pytest.raises(ConfigError) as e:
        to_spec(cfg, check_files=False)
    assert "model.load_from is required" in str(e.value)


def test_tiny_models_need_no_weights_or_tokenizer_path():
    _, spec = load_spec(["recipe=intern_s1_mini", "model=intern_s1_tiny", "parallel=single"])
    assert spec.model.load_from is None and spec.model.tokenizer == "builtin:intern_s1_tiny"
    _, spec = load_spec(["recipe=demo", "model=qwen3_tiny"])
    assert spec.model.tokenizer == "builtin:qwen3_tiny"


def test_overrides_of_scalars_lists_and_groups():
    _, spec = load_spec([
        "recipe=demo",
        "optim.lr=1e-4",
        "optim.betas=[0.8,0.9]",
        "train.sample_prompts=[hello,world]",
        "model=qwen3_moe_tiny",
        "sched=linear",
        "data.datasets.0.sample_ratio=2.5",
    ])
    assert spec.optim.lr == 1e-4
    assert list(spec.optim.betas) == [0.8, 0.9]
    assert list(spec.train.sample_prompts) == ["hello", "world"]
    assert spec.model.family == "qwen3_moe" and spec.sched.type == "linear"
    assert spec.data.datasets[0].sample_ratio == 2.5
    # The recipe's own values stay where not overridden.
    from omegaconf import OmegaConf

    assert spec.train.max_steps == OmegaConf.load(recipe_files()["demo"]).train.max_steps


def test_spec_is_frozen():
    _, spec = load_spec(["recipe=demo"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.optim.lr = 1.0


def test_all_override_problems_are_reported_together():
    with pytest.raises(ConfigError) as e:
        compose(["recipe=demo", "optim.lrr=1", "train.global_batch_size=many", "model=qwen3_8bb", "loss.mode=fast"])
    msgs = e.value.problems
    assert len(msgs) == 4
    assert any("optim.lrr" in m and "Did you mean 'lr'" in m for m in msgs)
    assert any("train.global_batch_size=many" in m for m in msgs)
    assert any("model=qwen3_8bb" in m and "Did you mean 'qwen3_8b'" in m for m in msgs)
    assert any("loss.mode=fast" in m and "chunk" in m for m in msgs)


def test_cross_field_rules():
    cfg = compose([
        "recipe=demo",
        "data.sample_max_length=4096",
        "train.epochs=1",
        "parallel.nproc_per_node=2",
        "train.global_batch_size=3",
    ])
    with pytest.raises(ConfigError) as e:
        to_spec(cfg)
    text = str(e.value)
    assert "data.sample_max_length=4096" in text and "data.pack_max_length" in text
    assert "exactly one of train.epochs and train.max_steps" in text
    assert "train.global_batch_size=3 is not divisible" in text


@pytest.mark.parametrize("pack", ["soft", "bfd", "none", "hard"])
def test_a_sample_longer_than_a_row_is_refused_unless_hard_packing_cuts_it(pack):
    """The one rule for data.sample_max_length > data.pack_max_length (validator only): soft, bfd and none place
    whole samples, so it is refused naming both keys and the mode; hard cuts samples into rows, so it passes."""
    overrides = ["recipe=demo", f"data.pack={pack}", "data.pack_max_length=256", "data.sample_max_length=512"]
    if pack == "hard":
        _, spec = load_spec(overrides)
        assert (spec.data.sample_max_length, spec.data.pack_max_length) == (512, 256)
        return
    with pytest.raises(ConfigError) as e:
        load_spec(overrides)
    assert e.value.problems == [f"data.sample_max_length=512 is larger than data.pack_max_length=256: a sample must "
                                f"fit in one packed row with data.pack={pack} (data.pack=hard cuts longer samples "
                                "into rows)"]


def test_hard_packing_of_long_samples_needs_an_image_to_fit_in_a_row():
    """hard never cuts an image block: with samples longer than a row, a vision model's largest image (12 tiles +
    thumbnail x 256 tokens + 2 = 3330 tokens here) must fit in one row."""
    from xtune.config.schema import DatasetSpec, DataSpec, ModelSpec
    from xtune.config.validate import length_problems

    def spec(pack_max_length):
        return RunSpec(model=ModelSpec(family="intern_s1", max_tiles=12, tokens_per_tile=256, use_thumbnail=True),
                       data=DataSpec(datasets=[DatasetSpec(name="x", path="x")], pack="hard",
                                     sample_max_length=8192, pack_max_length=pack_max_length))

    (msg,) = length_problems(spec(2048))
    assert msg.startswith("data.pack=hard with data.sample_max_length=8192 > data.pack_max_length=2048: an image "
                          "takes up to 3330 tokens") and "raise data.pack_max_length to 3330" in msg
    assert length_problems(spec(3330)) == []


def test_missing_files_are_named(tmp_path):
    cfg = compose(["recipe=demo", f"data.datasets.0.path={tmp_path}/nope.jsonl", "model.tokenizer=builtin:nope"])
    with pytest.raises(ConfigError) as e:
        to_spec(cfg)
    text = str(e.value)
    assert f"{tmp_path}/nope.jsonl: no such file" in text
    assert "builtin:nope" in text and "builtin:qwen3_tiny" in text


def test_user_recipe_file_and_config_dir(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "my_tiny.yaml").write_text(
        "name: my_tiny\nfamily: qwen3\ntokenizer: builtin:qwen3_tiny\narch: {hidden_size: 32, num_hidden_layers: 1}\n"
    )
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "mine.yaml").write_text(
        "description: mine\ndefaults:\n  - override /model: my_tiny\noptim:\n  lr: 0.5\n"
    )
    _, spec = load_spec(["recipe=mine"], config_dirs=[str(tmp_path)])
    assert spec.model.name == "my_tiny" and spec.optim.lr == 0.5 and spec.recipe == "mine"

    path_recipe = tmp_path / "elsewhere.yaml"
    path_recipe.write_text("description: by path\ntrain:\n  epochs: null\n  max_steps: 7\n")
    _, spec = load_spec([f"recipe={path_recipe}"])
    assert spec.train.max_steps == 7 and spec.recipe == "elsewhere"


def test_readme_config_reference_is_generated_from_the_schema():
    from pathlib import Path

    from xtune.config.key_table import BEGIN, END, markdown, rows

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = readme[readme.index(BEGIN): readme.index(END) + len(END)]
    assert table == markdown(), "README table is stale: run python -m xtune.config.key_table"
    keys = {r[0] for r in rows()}
    assert {"optim.lr", "train.global_batch_size", "data.pack", "parallel.attn", "model.load_from"} <= keys


@pytest.mark.parametrize("override, hint", [("lr=1e-4", "optim.lr"), ("seed=3", "train.seed"), ("epochs=2", "train.epochs")])
def test_a_sections_key_at_the_top_level_points_to_its_section(override, hint):
    with pytest.raises(ConfigError) as e:
        compose([override])
    assert f"Did you mean '{hint}'?" in str(e.value)


@pytest.mark.parametrize("overrides, fragment", [
    (["optim.betas=[0.9,1.0]"], "optim.betas=[0.9, 1.0]: give two values in [0, 1)"),
    (["optim.betas=[0.9]"], "optim.betas=[0.9]: give two values"),
    (["sched.warmup_ratio=1.0"], "sched.warmup_ratio=1.0: must be in [0, 1)"),
    (["sched.min_lr_ratio=-0.1"], "sched.min_lr_ratio=-0.1: must be in [0, 1]"),
    (["parallel.ac_ratio=0"], "parallel.ac_ratio=0.0: must be in (0, 1]"),
    (["train.micro_batch_size=0"], "train.micro_batch_size=0: must be > 0"),
    (["data.pack_max_length=-8"], "data.pack_max_length=-8: must be > 0"),
    (["loss.chunk_size=0"], "loss.chunk_size=0: must be > 0"),
    (["data.num_workers=-1"], "data.num_workers=-1: must be >= 0"),
    (["data.datasets.0.sample_ratio=-1"], "data.datasets[0].sample_ratio=-1.0: must be >= 0"),
    (["data.eval_datasets.0.name=demo_tasks", "data.datasets=[{name: a, path: x}, {name: a, path: y}]"],
     "data.datasets[1].name=a: names must be unique"),
    (["data.eval_datasets=[]", "train.eval_every=5"], "train.eval_every=5 but data.eval_datasets is empty"),
    (["data.datasets=[]"], "data.datasets is empty"),
    (["model.freeze_vision=true"], "model.freeze_vision=true: model.family=qwen3 has no vision part"),
    (["optim=sgd", "optim.momentum=1.0"], "optim.momentum=1.0: must be in [0, 1)"),
    (["optim=adamw_8bit", "parallel.nproc_per_node=2"], "bitsandbytes' 8-bit AdamW cannot update FSDP2-sharded"),
    (["optim=adamw_8bit", "parallel.param_dtype=bfloat16"], "(here: 1 processes, parallel.param_dtype=bfloat16)"),
])
def test_each_validation_rule_names_the_key(overrides, fragment):
    with pytest.raises(ConfigError) as e:
        load_spec(["recipe=demo", *overrides], check_files=False)
    assert fragment in e.value.problems or any(fragment in p for p in e.value.problems), e.value.problems


def test_file_rules_name_the_missing_path(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(ConfigError) as e:
        load_spec(["recipe=demo", f"model.load_from={folder}", f"data.datasets.0.media_root={tmp_path}/media",
                   f"train.resume={tmp_path}/ckpt"])
    text = str(e.value)
    assert f"model.load_from={folder}: no weights there (expected model.safetensors" in text
    assert f"data.datasets[0] (demo_tasks).media_root={tmp_path}/media: no such folder" in text
    assert f"train.resume={tmp_path}/ckpt: no such checkpoint folder" in text


def test_unparsable_override_is_a_config_error():
    with pytest.raises(ConfigError) as e:
        compose(["recipe=demo", "optim.lr=[1,", "optim.lrr=2"])
    assert any(p.startswith("cannot parse override 'optim.lr=[1,'") for p in e.value.problems)
    assert any("optim.lrr=2: unknown key 'lrr'" in p for p in e.value.problems)  # still reported together


def test_a_run_composes_once(monkeypatch):
    """One `xtune sft` job is composed by Hydra exactly once (the error path alone composes again)."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    calls = []
    original = ConfigLoaderImpl.load_configuration
    monkeypatch.setattr(ConfigLoaderImpl, "load_configuration",
                        lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    from xtune.config.compose import compose_jobs

    jobs = compose_jobs("sft", ["recipe=demo", "optim.lr=0.5"])
    assert len(calls) == 1 and jobs[0].spec.optim.lr == 0.5
    jobs = compose_jobs("sft", ["recipe=demo", "optim.lr=0.5,0.25"], multirun=True)
    assert len(calls) == 3 and [j.spec.optim.lr for j in jobs] == [0.5, 0.25]
