"""The fast chat rendering (`xtune.data.fast_render`) decides like jinja2's own sandbox and labels like
`apply_chat_template`.

- Sandbox: the reference is the environment transformers compiles templates in, which is jinja2's own
  `ImmutableSandboxedEnvironment` (asserted), with the same filters and globals as the fast one. Both answer
  every attribute of every kind of object a chat template can reach (plain JSON values, the loop, namespaces,
  the globals and filters), twice (the fast sandbox caches verdicts), and render a list of hostile templates.
- Labels: every data file the tests have (the bundled demo files and, when present, ../shared's resource files)
  tokenised with the fast path and with `apply_chat_template` rendering gives the same ids, labels and drops.
- Versions: outside the transformers / jinja2 versions it was checked against, the fast path is not used.
"""

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from jinja2.runtime import LoopContext, Undefined
from jinja2.sandbox import ImmutableSandboxedEnvironment
from transformers.utils.chat_template_utils import _compile_jinja_template

from xtune.data import fast_render
from xtune.data.preference import pair_records, parse_pair
from xtune.data.records import iter_lines, parse_record
from xtune.data.templates import Renderer, resolve_template
from xtune.data.tokenize import SampleTokenizer, TokenizedChunk, TokenizeSettings
from xtune.errors import DataError

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "src" / "xtune" / "assets" / "demo"
RESOURCE = ROOT.parent / "shared" / "data" / "resource"
FAMILY = {"qwen_tok": "qwen3", "intern_tok": "intern_s1"}
MESSAGES = [{"role": "user", "content": "hi", "n": 1, "tool_calls": [{"function": {"name": "f"}}]}]
# Names a template might try besides every name in dir(obj): internals of functions, generators, frames, classes
PROBED_NAMES = ("role", "content", "nope", "n", "__globals__", "__code__", "__closure__", "__builtins__", "func_globals",
                "func_code", "gi_frame", "gi_code", "cr_frame", "f_locals", "f_globals", "mro", "__mro__",
                "__subclasses__", "__base__", "__self__", "__func__", "__wrapped__", "_Namespace__attrs", "format",
                "format_map", "_undefined_hint")
HOSTILE = [
    "{{ messages.append(1) }}",  # mutating the list
    "{{ messages.pop() }}",
    "{{ messages.extend([1]) }}{{ messages.insert(0, 1) }}",
    "{{ messages.sort() }}",
    "{{ messages.clear() }}",
    "{{ messages[0].pop('role') }}",  # mutating a message
    "{{ messages[0].update({'a': 1}) }}",
    "{{ messages[0].setdefault('a', 1) }}",
    "{{ messages[0].popitem() }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",  # reaching object
    "{{ messages[0].__class__.__base__ }}",
    "{{ raise_exception.__globals__['os'] }}",  # a function's globals
    "{{ strftime_now.__globals__.datetime }}",
    "{{ self.__init__.__globals__ }}",
    "{{ cycler.__init__.__globals__['os'] }}",
    "{{ lipsum.__globals__['os'] }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ dict.__class__.__call__ }}",
    "{{ (messages | attr('__class__')).__base__ }}",  # the attr filter goes through the sandbox too
    "{{ messages[0] | attr('pop') }}",
    "{{ messages | map(attribute='__class__') | list }}",
    "{{ '{0.__class__}'.format(messages) }}",  # str.format reaching attributes
    "{{ '{0.__class__.__base__}'.format_map({'0': 1}) }}",
    "{{ '%s' | format(messages.__class__) }}",
    "{{ messages[0].content.format }}|{{ messages[0].content.upper() }}",
    "{% set ns = namespace(a=1) %}{% set ns._b = 2 %}{{ ns._b }}",  # transformers' namespace refuses _names
    "{% set ns = namespace(a=1) %}{% set ns.b = 'x' %}{{ ns.a }}{{ ns.b.upper() }}{{ ns._c }}{{ ns.__dict__ }}",
    "{% for m in messages %}{{ loop.index0 }}{{ loop.__class__ }}{{ loop._iterator }}{{ loop.cycle.__func__ }}"
    "{% endfor %}",
    "{{ range(10 ** 9) | length }}",  # range beyond MAX_RANGE
    "{{ messages[0].items }}|{{ messages[0].keys() | list }}|{{ messages[0].get('role') }}|{{ messages[0].nope }}",
    "{{ messages[0].tool_calls[0].function.name }}{{ messages[0].tool_calls[0].function.__class__ }}",
    "{{ messages | tojson }}|{{ dict(a=1) }}|{{ dict.fromkeys(['a']) }}",
    "{{ raise_exception('nope') }}",
    "{% for m in messages %}\n{{ m.content + 1 }}{% endfor %}",  # a TypeError inside the template
]
# Among those, the ones the sandbox must refuse (its SecurityError), not merely render as empty
REFUSED = [*range(17), 18, 25]


def _envs(template="{{ messages }}"):
    fast = fast_render.compile_template(template)
    ref = _compile_jinja_template(template)
    assert type(ref.environment) is ImmutableSandboxedEnvironment  # jinja2's own sandbox, as configured by transformers
    assert isinstance(fast.environment, ImmutableSandboxedEnvironment)
    assert type(fast.environment) is not ImmutableSandboxedEnvironment  # the fast one subclasses it
    return fast, ref


def _plain(text: str) -> str:
    return re.sub(r" at 0x[0-9a-f]+", "", text)  # object addresses differ between calls


def _decision(env, obj, name):
    """What the sandbox answers for `obj.name` and `obj[name]`: the value's kind, or its refusal."""
    out = []
    for op in (env.getattr, env.getitem):
        try:
            v = op(obj, name)
        except Exception as e:  # noqa: BLE001
            out.append(("raises", type(e).__name__, _plain(str(e))))
            continue
        if isinstance(v, Undefined):
            exc = getattr(v, "_undefined_exception", None)
            out.append(("undefined", type(v).__name__, v._undefined_hint, exc.__name__ if exc else None))
        else:
            out.append(("value", type(v).__name__, _plain(repr(v))[:200],
                        env.is_safe_callable(v) if callable(v) else None))
    return out


class Marked:
    """An object with methods jinja2's sandbox must not call (its documented markers)."""

    def delete(self):
        pass

    def run(self):
        pass

    delete.alters_data = True
    run.unsafe_callable = True


def _reachable(env):
    """One object of every kind a chat template can reach, and one whose methods carry jinja2's markers."""
    g = env.globals
    ns = g["namespace"](a=1)
    loop = LoopContext(iter([1, 2]), env.undefined)
    values = [MESSAGES, MESSAGES[0], "text", 1, 1.5, True, None, (1, 2), [1, "a"], {"k": [1]}]
    return values + [ns, loop, g["dict"], g["raise_exception"], g["strftime_now"], g["cycler"], g["joiner"],
                     g["lipsum"], g["range"], env.filters["tojson"], env.undefined(name="x"), "".join, "a".format, Marked()]


def test_attribute_decisions_equal_jinja2s_sandbox_on_every_reachable_name():
    fast, ref = _envs()
    compared = refused = 0
    for obj_fast, obj_ref in zip(_reachable(fast.environment), _reachable(ref.environment)):
        names = sorted(set(dir(obj_ref)) | set(PROBED_NAMES))
        for _ in range(2):  # the second pass meets the fast sandbox's cached verdicts
            for name in names:
                want = _decision(ref.environment, obj_ref, name)
                assert _decision(fast.environment, obj_fast, name) == want, (type(obj_ref).__name__, name)
                compared += 1
                refused += want[0][0] == "undefined" and want[0][3] == "SecurityError"
    assert compared > 3000 and refused > 1000


def _outcome(template, **kw):
    try:
        return "ok", _plain(template.render(**kw))
    except Exception as e:  # noqa: BLE001
        return type(e).__name__, _plain(str(e))


@pytest.mark.parametrize("k", range(len(HOSTILE)))
def test_hostile_templates_get_jinja2s_own_decision(k):
    fast, ref = _envs(HOSTILE[k])
    msgs = json.loads(json.dumps(MESSAGES))
    want = _outcome(ref, messages=json.loads(json.dumps(MESSAGES)))
    assert _outcome(fast, messages=msgs) == want
    assert msgs == MESSAGES  # nothing was mutated
    assert (want[0] == "SecurityError") == (k in REFUSED), want


def test_other_versions_are_rendered_by_apply_chat_template(qwen_tok, monkeypatch):
    tpl = resolve_template(qwen_tok)
    assert fast_render.versions_supported() and Renderer(qwen_tok, tpl)._fast is not None
    for name, version in (("transformers", "6.0.0"), ("transformers", "4.57.1"), ("jinja2", "3.2.0"), ("jinja2", "dev")):
        with monkeypatch.context() as m:
            # The module fast_render imports now: inside a full session sys.modules can hold another
            # transformers module object than the one this file imported at collection.
            m.setattr(sys.modules[name], "__version__", version)
            r = Renderer(qwen_tok, tpl)
            assert r._fast is None, (name, version)
            msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
            assert r.render(msgs) == qwen_tok.apply_chat_template(msgs, tokenize=False)


# -- labels: the fast path against apply_chat_template on every data file ----------------------------------------
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
# What the files lack: reasoning under each of its names, None values, tool calls (JSON text and objects),
# think blocks, text that looks like jinja
TRICKY = [
    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": "r1"},
                  {"role": "user", "content": "q2"}, {"role": "assistant", "content": "b", "reasoning": "r2"}]},
    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "thinking": "t",
                                                     "reasoning_content": None, "name": None}]},
    {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "<tool_response>x</tool_response>"},
                  {"role": "assistant", "content": "<think>\nplan\n</think>\n\nanswer"}]},
    {"tools": TOOLS, "messages": [
        {"role": "user", "content": "call"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Rome\"}"}},
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "content": "1"}, {"role": "tool", "content": "2"}, {"role": "assistant", "content": "ok"}]},
    {"messages": [{"role": "user", "content": "héllo 世界 {{ not jinja }} {% raw %}"},
                  {"role": "assistant", "content": "{{ messages }}"}]},
]


def _data_files(tmp_path):
    """(file, media root) of every data file: the resource files name their images as `resource/...`."""
    tricky = tmp_path / "tricky.jsonl"
    tricky.write_text("".join(json.dumps(r) + "\n" for r in TRICKY))
    files = [(tricky, tmp_path)] + [(p, p.parent) for p in sorted(DEMO.glob("*.jsonl"))]
    return files + ([(p, RESOURCE.parent) for p in sorted(RESOURCE.glob("*.jsonl"))] if RESOURCE.is_dir() else [])


def _tokenize_file(st: SampleTokenizer, path: Path, root: Path):
    """Every record of `path` tokenised: the chunk, and the message of each record that failed."""
    out, errors, records = TokenizedChunk(), [], []
    for lineno, line in iter_lines(str(path)):
        try:
            if st.s.preference:
                records.append(pair_records(parse_pair(str(path), lineno, line), str(path), lineno, str(root)))
            else:
                records.append(parse_record(str(path), lineno, line, str(root)))
        except DataError as e:
            errors.append(str(e))
    run = st.tokenize_pairs if st.s.preference else st.tokenize
    for i in range(0, len(records), 64):  # in batches, as the data stage does; a failing batch record by record
        try:
            run(records[i:i + 64], out)
        except DataError:
            for rec in records[i:i + 64]:
                try:
                    run([rec], out)
                except DataError as e:
                    errors.append(str(e))
    return out, errors


@pytest.mark.parametrize("tok_name", ["qwen_tok", "intern_tok"])
def test_labels_equal_apply_chat_template_rendering_on_every_data_file(tok_name, request, tmp_path):
    tok = request.getfixturevalue(tok_name)
    tpl = resolve_template(tok, "auto", FAMILY[tok_name])
    samples = 0
    for path, root in _data_files(tmp_path):
        pref = path.name.startswith("pref_")
        settings = TokenizeSettings(tpl, 10**6, preference=pref, pair_max_length=10**6 if pref else 0)
        fast, ref = SampleTokenizer(tok, settings), SampleTokenizer(tok, settings)
        ref.renderer = Renderer(tok, tpl, fast=False)
        assert fast.renderer._fast is not None and ref.renderer._fast is None
        a, a_err = _tokenize_file(fast, path, root)
        b, b_err = _tokenize_file(ref, path, root)
        assert a_err == b_err, path
        assert (a.records, a.truncated, a.dropped_no_loss, a.dropped_image_cut) == \
            (b.records, b.truncated, b.dropped_no_loss, b.dropped_image_cut), path
        assert len(a.ids) == len(b.ids) and a.sources == b.sources, path
        for x, y, lx, ly in zip(a.ids, b.ids, a.labels, b.labels):
            assert np.array_equal(x, y) and np.array_equal(lx, ly), path
        samples += len(a.ids)
        assert len(a.ids) == len(TRICKY) or path.name != "tricky.jsonl"
    assert samples > 3000
