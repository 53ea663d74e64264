"""The vLLM scorer against the transformers one on the same model (run where vllm imports).

vLLM refuses head_dim 16 (the tiny preset), so the model here has head_dim 64.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.evaluate import vllm_scorer
from jobs.evaluate.files import load_jcommonsenseqa, load_jsquad
from jobs.evaluate.harness import plan, template
from tests.serving_factory import make_model_dir

pytestmark = pytest.mark.skipif(not vllm_scorer.available(), reason="vllm is not installed")
DATA = Path(__file__).resolve().parent.parent / "unit" / "data" / "jglue"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    dims = dict(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=2)
    return make_model_dir(tmp_path_factory.mktemp("vllm-model"), max_position_embeddings=2048, **dims)


def test_vllm_scores_like_transformers(model_dir):
    from jobs.evaluate.hf_scorer import HFScorer

    hf = HFScorer(model_dir, "cpu")
    vl = vllm_scorer.VLLMScorer(model_dir, dtype="float32", max_model_len=2048, memory_fraction=0.1)
    assert vl.dtype == "float32" and vl.max_len == 2048
    try:
        items, train = (
            load_jcommonsenseqa(DATA / "jcommonsenseqa-valid.json"),
            load_jcommonsenseqa(DATA / "jcommonsenseqa-train.json"),
        )
        tpl = template("jcommonsenseqa", "0.3")
        reqs = [(hf.encode(tpl.prompt(i, s)), [hf.encode(c) for c in i.choices]) for i, s in plan(items, train, 3)]
        for a, b in zip(vl.choice_logprobs(reqs), hf.choice_logprobs(reqs), strict=True):
            assert a == pytest.approx(b, abs=1e-2 + 1e-3 * max(abs(x) for x in b))
        qa, qa_train = load_jsquad(DATA / "jsquad-valid.json"), load_jsquad(DATA / "jsquad-train.json")
        gen = [(hf.encode(template("jsquad", "0.2").prompt(i, s)), 5) for i, s in plan(qa, qa_train, 2)]
        assert [t.split("\n")[0] for t in vl.generate(gen)] == [t.split("\n")[0] for t in hf.generate(gen)]
        windows = [list(range(5, 60))]
        assert vl.sum_nll(windows) == pytest.approx(hf.sum_nll(windows), rel=1e-3)
    finally:
        vl.close()  # its engine core and worker processes go now, not when the suite ends
