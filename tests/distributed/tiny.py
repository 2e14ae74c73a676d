"""Test fixtures for the engine: the qwen3 adapter on a fixed tiny config (with NaN injection), hand-made
packed batches, a stateful list loader, and a single-process reference loss computed from transformers' own
logits (independent of the adapter's forward).
"""

from __future__ import annotations

import math
import os
import random
import socket
import time

import torch
import torch.nn.functional as F

from xtune.config.schema import ModelSpec
from xtune.data.types import IGNORE_INDEX, PackedBatch
from xtune.models.qwen3 import Qwen3Adapter

VOCAB = 96


def tiny_config(**over):
    from transformers import Qwen3Config

    kw = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 512,
          "tie_word_embeddings": False, "rms_norm_eps": 1e-6}
    return Qwen3Config(**{**kw, **over})


class TinyAdapter(Qwen3Adapter):
    """The qwen3 family on `tiny_config()`, whatever the spec's arch; the weights come from `spec.load_from`.
    The hidden states of the forward calls numbered in `nan_at_steps` are made NaN."""

    def __init__(self, spec: ModelSpec, nan_at_steps=()):
        super().__init__(spec)
        self.config = tiny_config()
        self.nan_at_calls = set(nan_at_steps)  # forward-call indices whose hidden states become NaN
        self.calls = 0

    def validate(self):
        return []  # the model spec names no family and no tokenizer: the tests hand over token ids

    def load_tokenizer(self):
        return None

    def build_config(self):
        return self.config

    def hidden_states(self, model, batch, attn_impl, share=None):
        h, aux = super().hidden_states(model, batch, attn_impl, share)
        if self.calls in self.nan_at_calls:
            h = h * float("nan")
        self.calls += 1
        return h, aux


# ----------------------------------------------------------------------------------------- batches


def random_docs(seed: int, n_docs: int, min_len=4, max_len=24):
    """(input_ids, labels) documents with prompt tokens masked, like chat samples."""
    g = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        n = g.randint(min_len, max_len)
        ids = [g.randrange(VOCAB) for _ in range(n)]
        prompt = g.randint(1, n - 2)
        labels = [ids[i + 1] if i + 1 >= prompt else IGNORE_INDEX for i in range(n - 1)] + [IGNORE_INDEX]
        docs.append((ids, labels))
    return docs


def pack(docs) -> PackedBatch:
    ids = [t for d in docs for t in d[0]]
    labels = [t for d in docs for t in d[1]]
    pos = [i for d in docs for i in range(len(d[0]))]
    cu = [0]
    for d in docs:
        cu.append(cu[-1] + len(d[0]))
    return PackedBatch(
        input_ids=torch.tensor([ids]), labels=torch.tensor([labels]), position_ids=torch.tensor([pos]),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32), max_seqlen=max(len(d[0]) for d in docs),
        doc_trained_tokens=torch.tensor([sum(1 for t in d[1] if t != IGNORE_INDEX) for d in docs]),
    )


class ListLoader:
    """Deterministic per-step micro-batches: rows of the global batch of step s are generated from
    (seed, s, row); rank r takes its contiguous share, split into micro-batches."""

    def __init__(self, total_steps, rows_per_step, dp_rank, dp_size, micro_per_rank, seed=0, docs_per_row=3,
                 sleep=0.0, cycle=None):
        self.total_steps = total_steps
        self.rows, self.rank, self.dp, self.micro = rows_per_step, dp_rank, dp_size, micro_per_rank
        self.seed, self.docs_per_row, self.sleep = seed, docs_per_row, sleep
        self.cycle = cycle  # repeat the data every `cycle` steps (so a few steps visibly learn)
        self.pos = 0

    def rows_of_step(self, s):
        return [random_docs(self.seed * 100003 + s * 101 + r, self.docs_per_row) for r in range(self.rows)]

    def __iter__(self):
        return self

    def __next__(self):
        if self.pos >= self.total_steps:
            raise StopIteration
        rows = self.rows_of_step(self.pos % self.cycle if self.cycle else self.pos)
        per_rank = self.rows // self.dp
        mine = rows[self.rank * per_rank:(self.rank + 1) * per_rank]
        per_micro = per_rank // self.micro
        out = [pack([d for row in mine[i * per_micro:(i + 1) * per_micro] for d in row]) for i in range(self.micro)]
        self.pos += 1
        if self.sleep:
            time.sleep(self.sleep)
        return out

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]


# ----------------------------------------------------------------------------------------- reference


def reference_loss(model, docs, reduction="token"):
    """Loss of the documents run one by one through a plain transformers model (no packing, no FSDP)."""
    total, wsum = 0.0, 0.0
    for ids, labels in docs:
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()
        lab = torch.tensor(labels)
        ce = F.cross_entropy(logits, lab, ignore_index=IGNORE_INDEX, reduction="none")
        n = int((lab != IGNORE_INDEX).sum())
        if n == 0:
            continue
        w = {"token": 1.0, "sample": 1.0 / n, "square": 1.0 / math.sqrt(n)}[reduction]
        total = total + w * ce.sum()
        wsum += w * n
    return total / wsum


def save_tiny_hf(folder, seed=0):
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(tiny_config())
    model.save_pretrained(str(folder))
    return model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(extra=None):
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env.update(extra or {})
    return env


def run_on_one_and_two_ranks(worker: str, *args, cwd, timeout=300) -> None:
    """`python WORKER ARGS` on 1 rank and under torchrun on 2 ranks, side by side; fails with the stderr tail."""
    import subprocess
    import sys
    import tempfile

    env = child_env()
    with tempfile.TemporaryFile("w+") as err:  # a file, not a pipe: the 1-rank worker never blocks on its output
        one = subprocess.Popen([sys.executable, worker, *map(str, args)], env=env, cwd=cwd,
                               stdout=subprocess.DEVNULL, stderr=err)
        two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                              "--master-addr=127.0.0.1", f"--master-port={free_port()}", worker, *map(str, args)],
                             env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
        one.wait(timeout=timeout)
        err.seek(0)
        assert one.returncode == 0, err.read()[-4000:]
    assert two.returncode == 0, two.stderr[-4000:]
