"""`xtune chat PATH`: talk to a model in the terminal, or answer one prompt (`--prompt`, or standard input when it
is not a terminal) and exit.

Tokens are printed as they come (transformers' `TextStreamer`, told where to write; text from the first stop string
on is held back, so what is shown is the completion's text). Interactive commands: `/reset` (forget the
conversation), `/system TEXT` (a new system prompt, conversation reset), `/image FILE` (attach an image to the next
turn; vision-language models), `/exit`. The answer goes to standard output; the banner and prompts go to standard
error, so `echo hi | xtune chat RUN > answer.txt` writes only the answer.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TextIO

from transformers import TextStreamer

from xtune.config.schema import GenSpec
from xtune.errors import XtuneError
from xtune.generate.generator import Generator

HELP = "commands: /reset (new conversation), /system TEXT, /image FILE (next turn), /exit"


class StopAwareStreamer(TextStreamer):
    """transformers' TextStreamer writing to `out`, never showing a stop string or what follows it."""

    def __init__(self, tokenizer, out: TextIO, stop: Sequence[str]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out, self.stop = out, [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.text, self.shown, self.stopped = "", 0, False

    def on_finalized_text(self, text: str, stream_end: bool = False):
        if self.stopped:
            return
        self.text += text
        hits = [self.text.find(s) for s in self.stop if s in self.text]
        if hits:
            self._show(min(hits))
            self.stopped = True
        else:
            self._show(len(self.text) if stream_end else max(self.shown, len(self.text) - self.hold))

    def _show(self, upto: int) -> None:
        if upto > self.shown:
            self.out.write(self.text[self.shown:upto])
            self.out.flush()
            self.shown = upto


def user_turn(text: str, image: str | None):
    if image is None:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}


class ChatSession:
    """A conversation with one Generator: the history, the system prompt and one pending image."""

    def __init__(self, generator, gen: GenSpec, out: TextIO, system: str | None = None,
                 image: str | None = None):
        self.generator, self.gen, self.out = generator, gen, out
        self.system, self.image = system, image
        self.history: list[dict] = []

    def messages(self, turn: dict) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history + [turn]

    def answer(self, text: str) -> str:
        turn = user_turn(text, self.image)
        self.image = None
        streamer = StopAwareStreamer(self.generator.tokenizer, self.out, self.gen.stop)
        completion = self.generator.generate([self.messages(turn)], self.gen, streamer=streamer)[0][0]
        self.out.write("\n")
        self.out.flush()
        self.history += [turn, {"role": "assistant", "content": completion.text}]
        return completion.text

    def command(self, line: str, err: TextIO) -> bool:
        """Handle a /command; False when the session ends."""
        name, _, arg = line.partition(" ")
        if name in ("/exit", "/quit"):
            return False
        if name == "/reset":
            self.history = []
            err.write("(conversation reset)\n")
        elif name == "/system":
            self.system, self.history = arg.strip() or None, []
            err.write(f"(system prompt {'set' if self.system else 'cleared'}; conversation reset)\n")
        elif name == "/image":
            self.image = arg.strip() or None
            err.write(f"(image for the next turn: {self.image})\n" if self.image else "(no image)\n")
        else:
            err.write(f"unknown command {name}; {HELP}\n")
        return True


def read_line(prompt: str, err: TextIO) -> str | None:
    err.write(prompt)
    err.flush()
    line = sys.stdin.readline()
    return line.rstrip("\n") if line else None


def interactive(session: ChatSession, err: TextIO) -> int:
    err.write(f"{HELP}\n")
    while True:
        try:
            line = read_line("you> ", err)
        except KeyboardInterrupt:
            err.write("\n")
            return 0
        if line is None:
            err.write("\n")
            return 0
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not session.command(line, err):
                return 0
            continue
        session.out.write("model> ")
        try:
            session.answer(line)
        except KeyboardInterrupt:  # stop this answer, keep the session
            session.out.write("\n(interrupted)\n")


def run_chat(path: str, gen: GenSpec, *, prompt: str | None = None, image: str | None = None,
             system: str | None = None, device: str = "cpu", trust_remote_code: bool = False,
             out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """What `xtune chat` does once its options are parsed (see the module doc)."""
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read().strip()
        if not prompt:
            raise XtuneError("xtune chat: standard input is not a terminal and holds no prompt; give --prompt TEXT "
                             "or type in a terminal")
    if gen.n != 1:
        raise XtuneError(f"gen.n={gen.n}: xtune chat shows one answer per turn; use gen.n=1 (xtune eval samples n)")
    generator = Generator.from_path(path, device=device, trust_remote_code=trust_remote_code)
    if image is not None and generator.prompts.images is None:
        raise XtuneError(f"--image {image}: {path} is not a vision-language model")
    session = ChatSession(generator, gen, out, system=system, image=image)
    if prompt is not None:
        session.answer(prompt)
        return 0
    err.write(f"xtune chat: {getattr(generator, 'source', path)}\n")
    return interactive(session, err)
