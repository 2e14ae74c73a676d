"""The chat session behind `xtune chat`: streamed text equals the completion (stop strings held back), multi-turn
history reaches the template, /system, /reset, /image and /exit do what they say."""

from __future__ import annotations

import io
import sys

import pytest

from tests.integration.test_model_families import make_original
from xtune.config.schema import GenSpec
from xtune.generate import Generator
from xtune.generate.chat import ChatSession, interactive


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat") / "dense"
    make_original("qwen3_tiny", folder)
    return Generator.from_path(folder)


def test_streamed_text_is_the_completion_and_history_is_kept(generator):
    out = io.StringIO()
    spec = GenSpec(max_new_tokens=12)
    session = ChatSession(generator, spec, out, system="Answer briefly.")
    first = session.answer("hi")
    assert out.getvalue() == first + "\n"
    msgs = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "hi"}]
    assert first == generator.generate([msgs], spec)[0][0].text
    second = session.answer("and then?")
    turn2 = msgs + [{"role": "assistant", "content": first}, {"role": "user", "content": "and then?"}]
    assert second == generator.generate([turn2], spec)[0][0].text  # the whole conversation was the prompt
    assert out.getvalue() == first + "\n" + second + "\n"


def test_stop_strings_are_never_shown(generator):
    full = generator.generate(["hi"], GenSpec(max_new_tokens=16))[0][0].text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    out = io.StringIO()
    text = ChatSession(generator, GenSpec(max_new_tokens=16, stop=[stop]), out).answer("hi")
    assert text == full[:full.index(stop)] and out.getvalue() == text + "\n"


def test_commands(generator, monkeypatch):
    err, out = io.StringIO(), io.StringIO()
    session = ChatSession(generator, GenSpec(max_new_tokens=4), out)
    session.answer("hi")
    assert session.command("/system Be kind.", err) and session.system == "Be kind." and session.history == []
    session.answer("hi")
    assert session.command("/reset", err) and session.history == [] and session.system == "Be kind."
    assert session.command("/image cat.png", err) and session.image == "cat.png"
    assert session.command("/nonsense", err) and "unknown command /nonsense" in err.getvalue()
    assert not session.command("/exit", err)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n\n/reset\nhello\n/exit\nnever read\n"))
    fresh = ChatSession(generator, GenSpec(max_new_tokens=4), io.StringIO())
    assert interactive(fresh, io.StringIO()) == 0
    assert [m["content"] for m in fresh.history if m["role"] == "user"] == ["hello"]


def test_the_gen_group_is_composed_and_checked():
    from xtune.commands import compose_gen
    from xtune.errors import ConfigError

    spec = compose_gen(["gen.temperature=0.7", "gen.n=3", "gen.stop=[END,'###']", "gen.enable_thinking=false"])
    assert (spec.temperature, spec.n, spec.stop, spec.enable_thinking) == (0.7, 3, ["END", "###"], False)
    assert compose_gen([]) == GenSpec()
    with pytest.raises(ConfigError) as e:
        compose_gen(["gen.top_p=2", "gen.max_new_tokens=0", "gen.n=2", "gen.top_k=-1"])
    msg = str(e.value)
    for fragment in ("gen.top_p=2.0: must be in (0, 1]", "gen.max_new_tokens=0: must be > 0",
                     "gen.n=2 with gen.temperature=0 (greedy)", "gen.top_k=-1: must be >= 0"):
        assert fragment in msg
    with pytest.raises(ConfigError, match="gen.temprature=1: unknown key 'temprature' in gen. Did you mean 'temperature'"):
        compose_gen(["gen.temprature=1"])
    with pytest.raises(ConfigError, match="optim.lr=1: only generation settings are taken here"):
        compose_gen(["optim.lr=1"])
