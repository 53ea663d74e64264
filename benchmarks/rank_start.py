"""CPU a training rank spends before its first step: its own Llama against transformers'.

A rank (`TrainWorker`) imports torch and the pretraining modules, builds the model and runs its
first step. It builds `jobs.pretrain.llama.LlamaForCausalLM`, which has transformers' names and
arithmetic (tests/unit/test_llama.py) without importing transformers. This runs both, each in
fresh interpreters, interleaved:

- baseline: the rank's imports, then transformers' `LlamaForCausalLM` built from the same config
  (what a rank did before), one forward and backward;
- rank: the same with the rank's own model.

Goal: rank/baseline <= 0.7 (the tiny preset, where imports are nearly all of a rank's start).

    python benchmarks/rank_start.py [--repeat 5]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.driver_start import RANK, compare  # noqa: E402

SETUP = (
    f"{RANK}\n"
    "import torch\n"
    "from controlplane.spec import ModelSpec\n"
    "config = state.llama_config(ModelSpec(preset='tiny').resolve(vocab_size=4096, max_seq_len=64), 1, 0)\n"
)
STEP = "model(input_ids=torch.zeros(8, 64, dtype=torch.long)).logits.sum().backward()\n"
OURS = f"{SETUP}from jobs.pretrain.llama import LlamaForCausalLM\nmodel = LlamaForCausalLM(config)\n{STEP}"
THEIRS = (
    f"{SETUP}import transformers\n"
    "model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_dict()))\n"
    f"{STEP}"
)


def main() -> int:
    theirs, ours = ("rank start with transformers' Llama", THEIRS), ("rank start with its own Llama", OURS)
    return compare(__doc__.splitlines()[0], theirs, ours, goal=0.7)


if __name__ == "__main__":
    sys.exit(main())
