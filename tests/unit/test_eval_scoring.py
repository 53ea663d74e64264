"""The transformers scorer: choices on one prompt pass, shared-prefix cache and batched generation give
the answers of the straightforward computation (one row per choice, one question at a time)."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.evaluate import hf_scorer
from jobs.evaluate.files import load_jcommonsenseqa, load_jsquad
from jobs.evaluate.harness import plan, template
from jobs.evaluate.hf_scorer import PREFIX_WORTH, batches, common_prefix, default_batch_tokens
from tests.serving_factory import make_model_dir

DATA = Path(__file__).parent / "data" / "jglue"


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    import torch

    from jobs.evaluate.hf_scorer import HFScorer

    root = make_model_dir(tmp_path_factory.mktemp("model"), torch.bfloat16, max_position_embeddings=4096)
    return HFScorer(root, "cpu", batch_tokens=3000)


def reference_logprobs(scorer, ctx, cont):
    torch = scorer.torch
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        lp = torch.log_softmax(scorer.model(input_ids=ids).logits.float(), -1)[0]
    return float(sum(lp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


def test_model_loads_in_its_saved_dtype(scorer):
    assert scorer.dtype == "bfloat16"


def test_batched_choices_equal_one_row_per_choice(scorer, monkeypatch):
    items, train = (
        load_jcommonsenseqa(DATA / "jcommonsenseqa-valid.json"),
        load_jcommonsenseqa(DATA / "jcommonsenseqa-train.json"),
    )
    tpl = template("jcommonsenseqa", "0.3")
    reqs = [(scorer.encode(tpl.prompt(i, s)), [scorer.encode(c) for c in i.choices]) for i, s in plan(items, train, 3)]
    got = scorer.choice_logprobs(reqs)
    assert len(batches([len(p) for p, _ in reqs], scorer.batch_tokens)) > 1  # several batches, several rows each
    assert common_prefix([p for p, _ in reqs]) > 10  # the description is shared...
    monkeypatch.setattr(hf_scorer, "PREFIX_WORTH", 10**9)  # ...and, forced, cached: the same scores
    for cached, plain in zip(scorer.choice_logprobs(reqs), got, strict=True):  # bf16: close, not equal
        assert cached == pytest.approx(plain, abs=0.05 + 0.01 * max(abs(v) for v in plain))
    monkeypatch.undo()
    for (ctx, conts), scores in zip(reqs, got, strict=True):
        ref = [reference_logprobs(scorer, ctx, c) for c in conts]
        assert scores == pytest.approx(ref, abs=0.05 + 0.01 * max(abs(r) for r in ref))
        assert max(range(5), key=scores.__getitem__) == max(range(5), key=ref.__getitem__)


def test_batched_generation_equals_one_at_a_time(scorer):
    items, train = load_jsquad(DATA / "jsquad-valid.json"), load_jsquad(DATA / "jsquad-train.json")
    tpl = template("jsquad", "0.2")
    reqs = [(scorer.encode(tpl.prompt(i, s)), 6) for i, s in plan(items, train, 2)]
    batched = scorer.generate(reqs)
    single = [scorer.generate([r])[0] for r in reqs]
    # batched: a short shared prefix, so one plain causal prefill; alone: a row's own prompt is
    # its whole "shared prefix", so the cached-prefix path. Both give the same answers.
    mean = sum(len(p) for p, _ in reqs) / len(reqs)
    assert common_prefix([p for p, _ in reqs]) * PREFIX_WORTH < mean
    assert batched == single
    assert all(text.count("\n") <= 1 and (text.endswith("\n") or "\n" not in text) for text in batched)
    one = scorer.generate([(ctx, 1) for ctx, _ in reqs])
    assert all(len(a) <= len(b) for a, b in zip(one, batched, strict=True))


def test_sum_nll_equals_cross_entropy(scorer):
    torch = scorer.torch
    windows = [list(range(5, 40)), list(range(7, 30))]
    got = scorer.sum_nll(windows)
    ref = 0.0
    for w in windows:
        with torch.no_grad():
            logits = scorer.model(input_ids=torch.tensor([w[:-1]])).logits[0].float()
        ref += float(torch.nn.functional.cross_entropy(logits, torch.tensor(w[1:]), reduction="sum"))
    assert got == pytest.approx(ref, rel=1e-2)


def test_batches_sort_by_length_and_respect_the_budget():
    lengths = [5, 50, 20, 30, 10]
    out = batches(lengths, 60)
    assert [i for b in out for i in b] == [1, 3, 2, 4, 0]
    assert all(lengths[b[0]] * len(b) <= 60 for b in out)
    assert common_prefix([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2


def test_default_batch_budget_follows_the_key_value_cache_size():
    from transformers import LlamaConfig

    tiny = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=1, intermediate_size=176)
    big = LlamaConfig(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, intermediate_size=13824)
    assert default_batch_tokens(tiny, 4) == 262144  # 1 KiB of cache a token: hundreds of questions a batch
    assert default_batch_tokens(tiny, 4, "cpu") == default_batch_tokens(big, 2, "cpu") == 16384
    assert default_batch_tokens(big, 2) == 16384  # 800 KiB a token: the floor, 13 GB of cache
    gqa = LlamaConfig(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2)
    assert default_batch_tokens(gqa, 2) == (1 << 30) // (2 * 8 * 2 * 64 * 2)


def test_vllm_runs_the_saved_dtype(tmp_path):
    import json

    from jobs.evaluate.vllm_scorer import saved_dtype

    (tmp_path / "config.json").write_text(json.dumps({"dtype": "float32"}))
    assert saved_dtype(tmp_path) == "float32"
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    assert saved_dtype(tmp_path) == "bfloat16"
    (tmp_path / "config.json").write_text("{}")
    assert saved_dtype(tmp_path) == "auto"


def jsquad_requests(scorer, cap=6):
    items, train = load_jsquad(DATA / "jsquad-valid.json"), load_jsquad(DATA / "jsquad-train.json")
    tpl = template("jsquad", "0.2")
    return [(scorer.encode(tpl.prompt(i, s)), cap) for i, s in plan(items, train, 2)]


def test_generation_equals_transformers_generate_one_question_at_a_time(scorer):
    """The chunked prefill, the last-layer pass, the slab two prefill batches share and the
    grouped decode give the answers of `generate` at batch 1 (stop at a newline token, cap)."""
    torch = scorer.torch
    assert scorer._last_layer is not None and scorer._kv_room is not None  # the fast paths are on here
    reqs = jsquad_requests(scorer)
    assert len(batches([len(p) for p, _ in reqs], scorer.batch_tokens)) > 1  # two prefill batches, one slab
    assert max(len(p) for p, _ in reqs) - min(len(p) for p, _ in reqs) > scorer.prefill_chunk  # ends in other chunks
    stops = sorted(scorer.newline_ids())
    ref = []
    for ids, cap in reqs:
        x = torch.tensor([ids])
        with torch.no_grad():
            gen = scorer.model.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=cap, do_sample=False, eos_token_id=stops
            )
        ref.append(scorer.tok.decode(gen[0, x.shape[1] :]))
    assert scorer.generate(reqs) == ref


def test_chunked_prefill_equals_one_pass(scorer, monkeypatch):
    """Chunks of 64 tokens (rows whose last tokens fall in different chunks) after the cached
    description, and the last-layer pass, give the cache and last hidden states of one full pass
    over the padded rows."""
    torch = scorer.torch
    prompts = [p for p, _ in jsquad_requests(scorer)][:3]
    prompts = [prompts[0][:300], prompts[1][:100], prompts[2][:60]]
    with torch.no_grad():
        shared, own, cache, last = scorer._prefill(prompts, room=4)
        monkeypatch.setattr(scorer, "prefill_chunk", 64)
        c_shared, c_own, c_cache, c_last = scorer._prefill(prompts, room=4)
        monkeypatch.setattr(scorer, "_last_layer", None)
        monkeypatch.setattr(scorer, "_kv_room", None)
        p_shared, p_own, p_cache, p_last = scorer._prefill(prompts)
    assert shared == c_shared == p_shared > 0 and own == c_own == p_own  # the description, cached
    assert own[0] - own[2] > 64
    for got in (last, c_last):
        assert torch.allclose(got.float(), p_last.float(), atol=0.05, rtol=0.02)
    for got in (cache, c_cache):
        for layer, plain in zip(got.layers, p_cache.layers, strict=True):
            assert layer.keys.shape[2] == plain.keys.shape[2] == shared + max(own)
            for b, n in enumerate(own):  # a row's real tokens (after them, padding)
                for name in ("keys", "values"):
                    a, p = getattr(layer, name)[b, :, : shared + n], getattr(plain, name)[b, :, : shared + n]
                    assert torch.allclose(a.float(), p.float(), atol=0.05)


def test_plain_paths_give_the_same_answers(scorer, monkeypatch):
    """Without the last-layer pass and the in-place cache (a model or transformers release they
    do not support), every batch runs in one pass and decodes alone: the same answers."""
    reqs = jsquad_requests(scorer)
    fast = scorer.generate(reqs)
    monkeypatch.setattr(scorer, "_last_layer", None)
    monkeypatch.setattr(scorer, "_kv_room", None)
    monkeypatch.setattr(scorer, "decode_tokens", scorer.batch_tokens)
    assert scorer.generate(reqs) == fast


def test_the_evaluation_process_keeps_freed_memory():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert hf_scorer.keep_freed_memory() is True
