"""Generation on 2 ranks (gloo): each rank generates its share and the results are gathered in input order.

Usage: torchrun --nproc-per-node 2 generate_worker.py FOLDER OUT_DIR MODE
  MODE folder: every rank loads FOLDER whole (Generator.from_path), as `xtune eval` under torchrun does.
  MODE fsdp:   the training model as the trainer builds it (FSDP2 over both ranks, the sft loss root holding the HF
               model as `.model`, the decoder on xtune's packed attention): Generator(root), the live-model path.
Rank 0 writes OUT_DIR/MODE.json: greedy completions (with and without stop strings) and log-likelihoods.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.distributed.generate_cases import LOGLIK_PAIRS, PROMPTS, SPECS  # noqa: E402
from xtune.generate import Generator  # noqa: E402


def fsdp_generator(folder):
    from xtune.config.schema import ModelSpec, RunSpec
    from xtune.methods import get_method
    from xtune.models import get_adapter
    from xtune.ops import packed_sdpa
    from xtune.parallel.distributed import init_distributed
    from xtune.parallel.fsdp import build_sharded

    spec = RunSpec(model=ModelSpec(load_from=folder, family="qwen3"))
    denv = init_distributed(spec.parallel)
    adapter = get_adapter(spec.model)

    def make_root(model, forward_impl):  # as the trainer does (build_sharded switched the decoder's attention)
        return get_method(spec).root(model, adapter, forward_impl, "chunk")

    root, _, _ = build_sharded(adapter, spec, denv, "sdpa", make_root)
    from xtune.errors import XtuneError

    try:  # the HF model inside the root is not what generates under FSDP: its embeddings are the root's to gather
        Generator(root.model, adapter.load_tokenizer())
        raise AssertionError("Generator(root.model) was accepted")
    except XtuneError as e:
        assert "not an FSDP root" in str(e)
    assert root.model.config.get_text_config()._attn_implementation == packed_sdpa.NAME
    return Generator(root, adapter.load_tokenizer(), family="qwen3"), denv


def main():
    folder, out_dir, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    if mode == "fsdp":
        gen, denv = fsdp_generator(folder)
    else:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        gen, denv = Generator.from_path(folder), None
    result = {"completions": [[[c.token_ids, c.text, c.finish_reason] for c in cs]
                              for spec in SPECS for cs in gen.generate(PROMPTS, spec)],
              "loglik": gen.loglikelihood(LOGLIK_PAIRS, batch_size=2)}
    if mode == "fsdp":  # the module is back as training left it, and trains: generation came before any training forward
        from tests.distributed.tiny import pack, random_docs
        from xtune.ops import packed_sdpa

        assert gen.root.training and gen.model.config.get_text_config()._attn_implementation == packed_sdpa.NAME
        ce, _ = gen.root(pack(random_docs(0, 3)))
        ce.backward()
        assert all(p.grad is not None for p in gen.root.parameters() if p.requires_grad)
    import torch.distributed as dist

    if dist.get_rank() == 0:
        (out_dir / f"{mode}.json").write_text(json.dumps(result))
    if denv is not None:
        denv.close()
    else:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
