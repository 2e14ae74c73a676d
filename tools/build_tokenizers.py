"""Build the small tokenizers shipped with xtune (src/xtune/assets/tokenizers/).

No model hub is reachable from the machines xtune is developed and tested on, so fast tests
need a real tokenizer that behaves like the real ones: a byte-level BPE with Qwen3's
pre-tokenizer, Qwen3's added special tokens in Qwen3's order, and the real chat templates.
Only the BPE vocabulary is small (trained here on generated text), so ids differ from the
real models, but every rule that matters to data preparation (special tokens, template,
byte-level round trip of any UTF-8 text) is the same.

    python tools/build_tokenizers.py            # rewrites both folders, deterministically
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "src" / "xtune" / "assets" / "tokenizers"
VOCAB_SIZE = 3000

# Qwen2/Qwen3 pre-tokenizer split pattern (the GPT-4 style regex with single digits).
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen3's added tokens, in Qwen3's order (ids 151643..151668 in the real vocabulary).
# The second field says whether the real tokenizer marks the token `special`.
QWEN3_ADDED = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False), ("<tool_response>", False), ("</tool_response>", False),
    ("<think>", False), ("</think>", False),
]

# Intern-S1 adds InternLM's agent tokens and InternVL's image tokens after Qwen3's.
# `<img>` / `</img>` delimit an image, `<IMG_CONTEXT>` is the per-token image placeholder.
INTERN_S1_EXTRA = [
    ("<|action_start|>", True), ("<|action_end|>", True), ("<|interpreter|>", True), ("<|plugin|>", True),
    ("<img>", True), ("</img>", True), ("<IMG_CONTEXT>", True),
    ("<quad>", True), ("</quad>", True), ("<ref>", True), ("</ref>", True), ("<box>", True), ("</box>", True),
]

# Qwen3's chat template (the Qwen3-8B release): tools in the system turn, the assistant turn after
# the last real user query carries a <think> block (empty without reasoning), earlier turns none.
QWEN3_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""

# Intern-S1's chat template, reconstructed from its published behaviour: ChatML turns like Qwen3;
# with thinking enabled (the default) a fixed "expert reasoner" system prompt is added (appended to
# the user's system message if any); tools are described in the system turn and called with
# InternLM's <|action_start|><|plugin|> ... <|action_end|> blocks; list contents render their text
# parts and one <IMG_CONTEXT> per image part. The assistant turn is rendered as written (no
# template-inserted <think> block), so a conversation renders the same whether or not it ends here.
INTERN_S1_TEMPLATE = """{%- set default_thinking_sys -%}
You are an expert reasoner with extensive experience in all areas. You approach problems through systematic thinking and rigorous reasoning. Your response should reflect deep understanding and precise logical thinking, making your solution path and reasoning clear to others. Please put your thinking process within <think>...</think> tags.
{%- endset -%}
{%- set thinking = enable_thinking is not defined or enable_thinking -%}
{%- macro render_content(content) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- elif content is none -%}
        {{- '' -}}
    {%- else -%}
        {%- for part in content -%}
            {%- if part.type == 'text' -%}
                {{- part.text -}}
            {%- elif part.type in ['image', 'image_url'] -%}
                {{- '<IMG_CONTEXT>' -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- set system_parts = [] -%}
{%- if messages and messages[0].role == 'system' -%}
    {%- set system_parts = system_parts + [render_content(messages[0].content)] -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- if thinking -%}
    {%- set system_parts = system_parts + [default_thinking_sys] -%}
{%- endif -%}
{%- if tools -%}
    {%- set tool_text -%}
Your response should consist of a reasoning step (**thought**) followed immediately by a function call in valid JSON format. Wrap each function call using the `<|action_start|><|plugin|>` and `<|action_end|>` tags.

# External Tools
You have access to these tools:
{{ tools | tojson(indent=2) }}
    {%- endset -%}
    {%- set system_parts = system_parts + [tool_text] -%}
{%- endif -%}
{%- if system_parts -%}
    {{- '<|im_start|>system\\n' + system_parts | join('\\n\\n') + '<|im_end|>\\n' -}}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if message.role == 'assistant' -%}
        {{- '<|im_start|>assistant\\n' -}}
        {%- if message.reasoning_content is string and message.reasoning_content -%}
            {{- '<think>\\n' + message.reasoning_content.strip('\\n') + '\\n</think>\\n\\n' -}}
        {%- endif -%}
        {{- render_content(message.content) -}}
        {%- if message.tool_calls -%}
            {%- for tool_call in message.tool_calls -%}
                {%- if tool_call.function -%}{%- set tool_call = tool_call.function -%}{%- endif -%}
                {%- set args = tool_call.arguments -%}
                {{- '\\n<|action_start|><|plugin|>\\n{"name": "' + tool_call.name + '", "parameters": ' -}}
                {%- if args is string -%}{{- args -}}{%- else -%}{{- args | tojson -}}{%- endif -%}
                {{- '}\\n<|action_end|>' -}}
            {%- endfor -%}
        {%- endif -%}
        {{- '<|im_end|>\\n' -}}
    {%- elif message.role == 'tool' -%}
        {{- '<|im_start|>environment name=<|plugin|>\\n' + render_content(message.content) + '<|im_end|>\\n' -}}
    {%- else -%}
        {{- '<|im_start|>' + message.role + '\\n' + render_content(message.content) + '<|im_end|>\\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\\n' -}}
    {%- if enable_thinking is defined and enable_thinking is false -%}
        {{- '<think>\\n\\n</think>\\n\\n' -}}
    {%- endif -%}
{%- endif -%}"""


def training_corpus(seed: int = 0) -> list[str]:
    """Deterministic generated text: English prose, numbers, code, punctuation, a little CJK."""
    rng = random.Random(seed)
    words = (
        "the of and to in is that for it as was with be by on not he this are or his from at which but have "
        "an they you were her she there been one all we their has would when if so no will can more other "
        "what some time up out about into than them only could new these two may first then do any like my "
        "now over such our man me even most made after also did many before must through back years where "
        "much your way well down should because each just those people how too little state good very make "
        "world still own see men work long get here between both life being under never day same another know "
        "model data train token image user assistant system answer question think step because therefore "
        "distance light years parsec points score average team number letters word arranged ways choices "
        "healthy diet exercise sleep water colors primary atom nucleus protons neutrons electrons charge "
        "pollution energy transport emissions dog cat picture window collar brown fluffy animal describe "
        "function variable return value result error file line path folder config learning rate batch size "
        "gradient loss optimizer weight layer hidden attention head vector matrix tensor shape index list dict "
        "string integer float boolean true false none null print import class method object instance module "
        "package version install server client request response message content role tool call argument "
        "parameter example sample dataset epoch step checkpoint resume export load save read write open close "
        "history science physics chemistry biology mathematics equation formula probability statistics mean "
        "variance median percent total difference product quotient remainder square root prime factor "
        "city country river mountain ocean forest weather temperature summer winter spring autumn morning "
        "evening night today tomorrow yesterday family friend teacher student school university library book "
        "story music movie game sport football market price money bank business company customer service "
        "health doctor hospital medicine disease symptom treatment patient food fruit vegetable breakfast "
        "dinner kitchen recipe computer software hardware network internet website program language english "
        "however although whether several various important different possible available necessary simple "
        "quickly carefully usually always often sometimes together without within around against during"
    ).split()
    idents = [a + sep + b for a in words[:120:3] for b in words[120::5] for sep in ("_", ".")]
    code = [
        "def main(argv):\n    return 0\n",
        "for i in range(10):\n    print(i * 2)\n",
        "import torch\nx = torch.zeros(4, 8)\ny = x.sum(dim=-1)\n",
        "class Config:\n    def __init__(self, lr=2e-5):\n        self.lr = lr\n",
        "if (a != b && c >= d) { return x[i] + y[j]; }\n",
        "answers = ['A', 'B', 'C', 'D', 'E']\nprint(answers[index])\n",
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n',
        "SELECT id, name FROM users WHERE age > 30 ORDER BY name;\n",
        "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 42); }\n",
    ]
    cjk = "图片中的狗是什么颜色这只有一条红色项圈两张相同之处都存在动物第一幅二副猫你能描述毛吗"
    lines = []
    for _ in range(12000):
        kind = rng.random()
        if kind < 0.6:
            n = rng.randint(5, 25)
            s = " ".join(rng.choice(words) for _ in range(n))
            s = s[0].upper() + s[1:] + rng.choice([".", "?", "!", ",", ";", ":"])
            lines.append(s)
        elif kind < 0.75:
            lines.append(
                " ".join(str(rng.randint(0, 10 ** rng.randint(1, 6))) for _ in range(rng.randint(2, 8)))
                + rng.choice([" = 180", " x 10^5", " (A) 6 (B) 30", "%", " + 3.26"])
            )
        elif kind < 0.8:
            lines.append(rng.choice(code))
        elif kind < 0.9:
            lines.append(f"{rng.choice(idents)} = {rng.choice(idents)}({rng.choice(words)}, {rng.randint(0, 99)})")
        else:
            lines.append("".join(rng.choice(cjk) for _ in range(rng.randint(4, 20))) + "。")
    lines.append("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~ \t\n\r\n")
    return lines


def build_bpe(corpus: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def write_folder(name: str, corpus: list[str], added: list[tuple[str, bool]], template: str, extra: dict) -> None:
    from transformers import PreTrainedTokenizerFast

    tok = build_bpe(corpus)
    base = tok.get_vocab_size()
    # One at a time so the ids follow the list order exactly.
    for text, special in added:
        token = AddedToken(text, special=special, normalized=False, single_word=False, lstrip=False, rstrip=False)
        (tok.add_special_tokens if special else tok.add_tokens)([token])
    for i, (text, _) in enumerate(added):
        assert tok.token_to_id(text) == base + i, (text, tok.token_to_id(text), base + i)

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
        **extra,
    )
    hf.chat_template = template
    folder = OUT / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    # The template goes into tokenizer_config.json (the classic place every loader reads).
    hf.save_pretrained(folder, save_jinja_files=False)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = template
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    size = sum(p.stat().st_size for p in folder.iterdir())
    print(f"{folder.relative_to(ROOT)}: vocab {base} + {len(added)} added, {size / 1024:.0f} KiB")


def main() -> None:
    corpus = training_corpus()
    write_folder("qwen3_tiny", corpus, QWEN3_ADDED, QWEN3_TEMPLATE, {})
    write_folder(
        "intern_s1_tiny",
        corpus,
        QWEN3_ADDED + INTERN_S1_EXTRA,
        INTERN_S1_TEMPLATE,
        # Named image tokens, read by InternVL-style processors (tokenizer.start_image_token, ...).
        {"extra_special_tokens": {
            "start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
        }},
    )


if __name__ == "__main__":
    main()
