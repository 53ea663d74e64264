"""The rank's Llama is transformers' LlamaForCausalLM: same names, same config.json, same numbers."""

from __future__ import annotations

import pytest
import torch
import transformers

from jobs.pretrain import llama

MHA = dict(
    vocab_size=128, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=1,
    num_key_value_heads=1, max_position_embeddings=256, bos_token_id=1, eos_token_id=0, pad_token_id=0,
)  # fmt: skip
GQA_TIED = dict(
    vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=1,
    eos_token_id=2, pad_token_id=2,
)  # fmt: skip


@pytest.mark.parametrize("kw", [MHA, GQA_TIED], ids=["mha", "gqa-tied"])
def test_config_json_is_transformers_own(kw):
    assert llama.LlamaConfig(**kw).to_dict() == transformers.LlamaConfig(**kw, attention_dropout=0.0).to_dict()


@pytest.mark.parametrize("kw", [MHA, GQA_TIED], ids=["mha", "gqa-tied"])
def test_logits_and_gradients_are_transformers_own(kw):
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw, attention_dropout=0.0))
    ours = llama.LlamaForCausalLM(llama.LlamaConfig(**kw))
    ours.load_state_dict(hf.state_dict(), strict=True)  # every name and shape is transformers'
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in hf.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in hf.named_buffers()]
    assert torch.equal(ours.model.rotary_emb.inv_freq, hf.model.rotary_emb.inv_freq)

    ids = torch.randint(0, kw["vocab_size"], (3, 17), generator=torch.Generator().manual_seed(1))
    ids[0, 3] = kw["pad_token_id"]  # the padding row of the embedding gets no gradient in either
    hf_logits, our_logits = hf(input_ids=ids).logits, ours(input_ids=ids).logits
    assert torch.equal(our_logits, hf_logits)
    loss = torch.nn.functional.cross_entropy
    target = ids.roll(-1, dims=1)
    loss(hf_logits.flatten(0, 1), target.flatten()).backward()
    loss(our_logits.flatten(0, 1), target.flatten()).backward()
    for (name, p), (_, q) in zip(hf.named_parameters(), ours.named_parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name
    if not kw.get("tie_word_embeddings"):
        assert not ours.model.embed_tokens.weight.grad[kw["pad_token_id"]].any()


def test_transformers_loads_what_a_rank_trained():
    ours = llama.LlamaForCausalLM(llama.LlamaConfig(**MHA))
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**ours.config.to_dict()))
    hf.load_state_dict(ours.state_dict(), strict=True)
    ids = torch.arange(20).reshape(2, 10)
    assert torch.equal(hf(input_ids=ids).logits, ours(input_ids=ids).logits)
