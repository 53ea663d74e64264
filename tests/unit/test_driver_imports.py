"""The driver defines the worker actor class without importing what only a rank runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "torch.distributed.checkpoint")


def _imported_after(code: str) -> dict[str, bool]:
    probe = f"import json, sys\n{code}\nprint(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_driver_and_the_actor_class_import_no_torch():
    loaded = _imported_after(
        "import jobs.pretrain.entry, jobs.pretrain.placement\nfrom jobs.pretrain.worker import TrainWorker"
    )
    assert loaded == dict.fromkeys(HEAVY, False)


def test_a_lazy_module_imports_at_first_use_and_is_the_module():
    from jobs.pretrain.lazy import lazy

    mod = lazy("json.decoder")
    assert "not imported" in repr(mod)
    import json.decoder

    assert mod.JSONDecoder is json.decoder.JSONDecoder
    assert "imported" in repr(mod) and "not" not in repr(mod)


def test_a_rank_builds_steps_and_saves_its_model_without_transformers():
    loaded = _imported_after(
        "import torch\n"
        "from controlplane.spec import ModelSpec, ParallelismSpec\n"
        "from jobs.pretrain import parallelize as pz, saving, sharded, state as st\n"
        "config = st.llama_config(ModelSpec(preset='tiny').resolve(vocab_size=64, max_seq_len=16), 1, 0)\n"
        "model = pz.build(config, 0, torch.device('cpu'), ParallelismSpec(), None)\n"
        "model(input_ids=torch.zeros(1, 8, dtype=torch.long)).logits.sum().backward()\n"
        "json.dumps(config.to_dict())"
    )
    assert loaded["torch"] and not loaded["transformers"]
