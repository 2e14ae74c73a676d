"""Bad input through the command line, table-driven: every row is what a user gives (overrides, files)
-> exit code 2 and a message naming the key or the file:line, never a traceback.

tests/integration/test_cli.py checks config mistakes with --dry-run and tests/unit/test_data_*.py the data
errors as exceptions; these rows run the real `xtune sft` (no --dry-run), so a data error surfaces from
the engine through Hydra's job runner, where only the CLI's own handling stands between it and a traceback.
"""

import shutil

import pytest

from tests.reliability.helpers import GOOD, IMAGE, ROOT, image_msg, quick_run, records, run_all, write_lines

# (id, lines of the dataset file, fragments of the message; {f} is the file's path)
DATA_ROWS = [
    ("malformed_json", GOOD[:2] + ['{"messages": [{"role": "user", "content": "hi"}'] + GOOD[2:4],
     ["{f}:3:", "malformed JSON"]),
    ("no_messages", GOOD[:4] + [{"id": "x", "conversation": [{"role": "user", "content": "hi"}]}],
     ["{f}:5:", "no 'messages' key"]),
    ("unknown_role", GOOD[:1] + [{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}],
     ["{f}:2:", "message 1", "unknown role 'bot'"]),
    ("missing_image", GOOD[:3] + [image_msg(1, "images/nowhere.png")],
     ["{f}:4:", "image file not found", "images/nowhere.png"]),
    ("placeholders_vs_images", GOOD[:2] + [image_msg(2, IMAGE)],
     ["{f}:3:", "2 <IMG_CONTEXT> placeholder(s) for 1 image(s)"]),
    ("empty_file", [], ["{f}:0:", "empty file"]),
]


@pytest.fixture(scope="module")
def data_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad_data")
    jobs, files = {}, {}
    for name, lines, _ in DATA_ROWS:
        d = tmp / name
        d.mkdir()
        files[name] = f = write_lines(d / "bad.jsonl", lines)
        jobs[name] = quick_run(d, f"data.datasets=[{{name:x,path:{f}}}]")
    d = tmp / "skip"
    d.mkdir()
    files["skip"] = f = write_lines(d / "mixed.jsonl", SKIP_LINES)
    jobs["skip"] = quick_run(d, f"data.datasets=[{{name:x,path:{f}}}]", "data.on_error=skip")
    # The same kind of error on 2 ranks (`xtune sft` starting torchrun itself): rank 0 may be killed before
    # it prints, so the worker hands the message to the launcher.
    d = tmp / "two_ranks"
    d.mkdir()
    files["two_ranks"] = f = write_lines(d / "bad.jsonl", DATA_ROWS[2][1])
    jobs["two_ranks"] = quick_run(d, f"data.datasets=[{{name:x,path:{f}}}]", "parallel.nproc_per_node=2")
    return {name: (files[name], out) for name, out in run_all(jobs).items()}


@pytest.mark.parametrize("name, fragments", [(r[0], r[2]) for r in DATA_ROWS], ids=[r[0] for r in DATA_ROWS])
def test_bad_data_stops_with_file_line(data_runs, name, fragments):
    f, out = data_runs[name]
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-3000:]
    for frag in fragments:
        assert frag.format(f=f) in out.stderr, (frag, out.stderr[-3000:])
    assert "Traceback" not in out.stderr and "Error executing job" not in out.stderr, out.stderr[-3000:]
    assert not records(f.parent / "run")  # nothing trained


def test_bad_data_on_two_ranks_is_reported_once(data_runs):
    f, out = data_runs["two_ranks"]
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-3000:]
    assert out.stderr.count(f"error: {f}:2: message 1: unknown role 'bot'") == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "ChildFailedError" not in out.stderr, out.stderr[-3000:]
    assert not (f.parent / "run" / ".worker-error.json").exists()


# Good records with a malformed line 4 and an unknown role on line 8 (the malformed_json row proves that
# without on_error=skip the first of them stops the run).
SKIP_LINES = GOOD[:3] + ['{"messages": ['] + GOOD[3:6] + [{"messages": [{"role": "robot", "content": "x"}]}] + GOOD[6:]


def test_on_error_skip_trains_and_reports_what_it_skipped(data_runs):
    f, out = data_runs["skip"]
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    said = out.stdout + out.stderr
    assert "x: 2 bad record(s) skipped (data.on_error=skip)" in said, said[-3000:]
    assert f"{f}:4: malformed JSON" in said and f"{f}:8: message 0: unknown role 'robot'" in said
    assert "Traceback" not in out.stderr
    assert [r["step"] for r in records(f.parent / "run")] == [1]


def make_folders(t):
    (t / "no_config").mkdir()
    (t / "no_tok_files").mkdir()
    (t / "no_tok_files" / "README.md").write_text("tokenizer went missing\n")
    broken = t / "broken_tok"
    shutil.copytree(ROOT / "src" / "xtune" / "assets" / "tokenizers" / "qwen3_tiny", broken)
    (broken / "tokenizer.json").write_text('{"version": "1.0", "model": ')  # cut short


# (id, overrides ({t} is the test's tmp folder), fragments of the message)
CONFIG_ROWS = [
    ("misspelt_key", ["train.max_stpes=3"], ["train.max_stpes=3: unknown key 'max_stpes' in train",
                                            "Did you mean 'max_steps'?"]),
    ("wrong_type", ["train.save_every=often"], ["train.save_every=often", "could not be converted to Integer"]),
    ("bad_group_option", ["optim=adamww"], ["optim=adamww: no such optim", "Did you mean 'adamw'?"]),
    ("bad_choice", ["data.on_error=ignore"], ["data.on_error=ignore: not allowed; choose one of raise, skip"]),
    ("cross_field", ["train.epochs=2"], ["give exactly one of train.epochs and train.max_steps"]),
    ("missing_dataset_file", ["data.datasets.0.path={t}/nope.jsonl"],
     ["data.datasets[0] (demo_tasks).path={t}/nope.jsonl: no such file or folder"]),
    ("load_from_missing", ["model.load_from={t}/no_model"], ["model.load_from={t}/no_model: no such folder"]),
    ("load_from_not_hf", ["model.load_from={t}/no_config"],
     ["model.load_from={t}/no_config: no config.json there"]),
    ("tokenizer_files_missing", ["model.tokenizer={t}/no_tok_files"],
     ["model.tokenizer={t}/no_tok_files: no tokenizer files there"]),
    ("tokenizer_file_broken", ["model.tokenizer={t}/broken_tok"],
     ["could not load the tokenizer ({t}/broken_tok)"]),
]


@pytest.fixture(scope="module")
def config_runs(tmp_path_factory):
    t = tmp_path_factory.mktemp("bad_config")
    make_folders(t)
    jobs = {}
    for name, overrides, _ in CONFIG_ROWS:
        jobs[name] = ["sft", "recipe=demo", "train.max_steps=2", "data.eval_datasets=[]", "train.eval_every=0",
                      f"data.cache_dir={t / 'cache'}", f"train.work_dir={t / name}",
                      *[o.format(t=t) for o in overrides]]
    return t, run_all(jobs)


@pytest.mark.parametrize("name, fragments", [(r[0], r[2]) for r in CONFIG_ROWS], ids=[r[0] for r in CONFIG_ROWS])
def test_bad_config_exits_2_naming_the_key(config_runs, name, fragments):
    t, runs = config_runs
    out = runs[name]
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-3000:]
    message = " ".join(out.stderr.split())  # rich may wrap long lines
    for frag in fragments:
        assert frag.format(t=t) in message, (frag, out.stderr[-3000:])
    assert "Traceback" not in out.stderr and "Error executing job" not in out.stderr
    assert not (t / name / "metrics.jsonl").exists()
