"""xtune: declarative fine-tuning of language and vision-language models."""

import logging as _logging

__version__ = "0.1.0"

# torchao (QLoRA's NF4) logs a warning for each prebuilt CUDA extension that does not load on this machine,
# and transformers imports it whenever it is installed; xtune only uses its pure-PyTorch NF4 tensor.
# Both also register pytree nodes that torch warns about, and peft imports bitsandbytes, which warns that an
# optional CPU kernel package is missing. None of it is actionable for a user.
for _name in ("torchao", "torch.utils._pytree", "bitsandbytes"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
