"""ModelAdapter: everything the engine needs to know about one model family.

The engine never touches transformers classes directly; it goes through an adapter:

    adapter = get_adapter(spec.model)
    config = adapter.build_config()
    with torch.device("meta"):
        model = adapter.build_model(config, attn_impl)
    ... fully_shard(adapter.blocks(model)), to_empty(), then either
    adapter.init_weights(model)                             # random init (from the torch seed)
    or adapter.reset_buffers(model) + load adapter.read_hf_state_dict(spec.load_from)
    hidden, aux = adapter.hidden_states(model, batch, attn_impl)
    loss = linear_cross_entropy(hidden, adapter.output_weight(model), batch.labels[0], ...)
    adapter.save_hf(full_state_dict, config, tokenizer, out_dir)

State dicts handed to and returned by the adapter use the *model's* key names (what
`model.state_dict()` gives); `read_hf_state_dict` / `save_hf` translate from / to the layout of the
original Hugging Face folder, so an export is a drop-in replacement for the folder it came from.

The adapter is composed of one part per job: models/build.py (config, model, init, freezing),
models/weights.py (reading and writing Hugging Face folders, key maps) and models/forward.py (the hidden
states). A family subclasses ModelAdapter and overrides what differs.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from xtune.config.files import TOKENIZER_FILES, remote_code_problem, tokenizer_dir
from xtune.config.schema import ModelSpec
from xtune.config.validate import model_problems
from xtune.errors import XtuneError
from xtune.models.build import ModelBuilder
from xtune.models.forward import HiddenStates
from xtune.models.weights import HFWeights, KeyStream

__all__ = ["KeyStream", "ModelAdapter"]


class ModelAdapter(ModelBuilder, HFWeights, HiddenStates):
    def __init__(self, spec: ModelSpec):
        self.spec = spec

    # ----------------------------------------------------------------- paths and validation
    def tokenizer_path(self) -> Path | None:
        return tokenizer_dir(self.spec)

    def validate(self) -> list[str]:
        """Cheap checks (no model, no tokenizer built): every problem found, as messages."""
        return model_problems(self.spec)

    # ----------------------------------------------------------------- tokenizer
    def load_tokenizer(self):
        path = self.tokenizer_path()
        if path is None:
            raise XtuneError("no tokenizer: set model.tokenizer (a folder or builtin:NAME) or model.load_from")
        if not path.is_dir() or not any((path / f).is_file() for f in TOKENIZER_FILES):
            raise XtuneError(f"tokenizer files missing in {path} (expected one of {', '.join(TOKENIZER_FILES)})")
        # Remote code (Intern-S1's tokenizer is a Python class in the model folder) runs only with the
        # user's consent; the config stage already reported this, the check here guards direct callers.
        problem = remote_code_problem(self.spec)
        if problem:
            raise XtuneError(problem)
        try:
            # An explicit bool: None would make transformers ask on stdin.
            return AutoTokenizer.from_pretrained(str(path), local_files_only=True,
                                                 trust_remote_code=bool(self.spec.trust_remote_code))
        except ImportError as e:  # the tokenizer's own code needs a package (Intern-S1's: sentencepiece)
            extra = " (pip install 'xtune[intern_s1]')" if "sentencepiece" in str(e) else ""
            raise XtuneError(f"the tokenizer in {path} needs a Python package that is not installed{extra}: {e}") from e
