"""One uninterrupted reference run (real CLI, single process) shared by the tests that compare losses."""

import pytest

from tests.reliability.helpers import STEPS, checkpoint_state, records, run_args, write_chat_data, xtune


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    data = write_chat_data(root / "data" / "chat.jsonl")
    return {"root": root, "data": data, "cache": root / "cache"}


@pytest.fixture(scope="session")
def reference(workspace):
    """The run never stopped: per-step records and its run dir (tests copy it, never change it)."""
    run = workspace["root"] / "reference"
    out = xtune(*run_args(workspace["data"], workspace["cache"], run))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    recs = records(run)
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    assert recs[-1]["loss"] < recs[0]["loss"]  # it learns: the comparisons below can fail
    assert len({r["loss"] for r in recs}) == STEPS
    assert checkpoint_state(run)["complete"] == [STEPS - 2, STEPS - 1, STEPS]  # keep_last=3
    return {"dir": run, "records": recs}
