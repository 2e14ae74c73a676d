"""The prompts and settings of the 2-rank generation test (shared by the test and its worker)."""

from xtune.config.schema import GenSpec

# 5 prompts, batches of 2: rank 0 gets 3 (two batches), rank 1 gets 2 (one batch, then a dummy one under FSDP).
PROMPTS = ["What is 2 + 3?", "Sort from smallest to largest: 7 2 9 4", "Name a colour.", "hi",
           [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Count to five."}]]
# Stop strings end rows at different steps: a rank whose rows are all done keeps stepping (synced_gpus) under FSDP.
SPECS = [GenSpec(max_new_tokens=10, batch_size=2), GenSpec(max_new_tokens=10, batch_size=2, stop=["e", "o"])]
LOGLIK_PAIRS = [("What is 2 + 3?", "5"), ("Name a colour.", "blue"), ("hi", "Hello there!")]
