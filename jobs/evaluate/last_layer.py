"""A prefill that runs the model's last decoder layer in full only where a token is read.

A prompt's prefill exists for two things: the key/value cache of every position (what the
choices or the generated tokens attend to) and the hidden state at each row's last real
position (what predicts the next token). The last layer's keys and values are all that later
passes read of its other positions, so those positions need only their keys and values: their
queries, attention, output projection and MLP feed nothing. `LastPositionsOnly` stands in for
the last layer during one forward and computes exactly that, which on a two-layer model is about
45% of the prefill's arithmetic and on a 40-layer one about 1%; the model's own layers do the
rest.

It is used only for the layer it is written against (Llama's, transformers 5.x: a decoder
layer that returns its hidden states and an attention with q/k/v/o projections and rotary
embeddings); for any other model `supported` is false and the full forward runs.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch

SUPPORTED_ATTENTION = frozenset({"LlamaAttention"})


def supported(model) -> bool:
    """Whether the model's last decoder layer is one `LastPositionsOnly` can stand in for."""
    from jobs.evaluate.kv_room import layered_caches

    if not layered_caches():  # 4.x: decoder layers return tuples, caches are lists
        return False
    layers = getattr(model.base_model, "layers", None)
    if not layers:
        return False
    attn = getattr(layers[-1], "self_attn", None)
    config = model.config
    return (
        type(attn).__name__ in SUPPORTED_ATTENTION
        and getattr(config, "sliding_window", None) is None
        and all(hasattr(layers[-1], m) for m in ("input_layernorm", "post_attention_layernorm", "mlp"))
    )


class LastPositionsOnly(torch.nn.Module):
    """The last decoder layer, computed in full at one position per row (`last[b]`, an index
    into this forward's tokens) and as keys and values only everywhere else.

    Returns hidden states of shape (rows, 1, hidden): the model's final norm applies to them as
    to the full output. The row's query attends to the cached keys of its own prefix and tokens
    (columns `< past + last[b] + 1`), never to the right padding after it.
    """

    def __init__(self, layer: torch.nn.Module, last: torch.Tensor) -> None:
        super().__init__()
        self.layer = layer
        self.last = last
        self.rotate_half = sys.modules[type(layer.self_attn).__module__].rotate_half

    def _rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Llama's rotary embedding (its `apply_rotary_pos_emb`) of one of queries or keys."""
        return x * cos[:, None] + self.rotate_half(x) * sin[:, None]

    def forward(self, hidden_states, position_embeddings=None, past_key_values=None, **_kwargs):
        layer, attn = self.layer, self.layer.self_attn
        rows, t = hidden_states.shape[:2]
        index = torch.arange(rows, device=hidden_states.device)
        last = self.last.to(hidden_states.device)
        x = layer.input_layernorm(hidden_states)
        k = attn.k_proj(x).view(rows, t, -1, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(rows, t, -1, attn.head_dim).transpose(1, 2)
        cos, sin = position_embeddings  # (1 or rows, tokens, head_dim)
        k = self._rotary(k, cos, sin)
        q = attn.q_proj(x[index, last][:, None]).view(rows, 1, -1, attn.head_dim).transpose(1, 2)
        at = (index, last)
        q = self._rotary(q, cos.expand(rows, -1, -1)[at][:, None], sin.expand(rows, -1, -1)[at][:, None])
        past = 0
        if past_key_values is not None:
            past = past_key_values.get_seq_length(attn.layer_idx)
            k, v = past_key_values.update(k, v, attn.layer_idx)
        columns = torch.arange(k.shape[2], device=k.device)
        mask = (columns[None, :] <= (past + last)[:, None])[:, None, None, :]
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=attn.scaling, enable_gqa=q.shape[1] != k.shape[1]
        )
        h = hidden_states[index, last][:, None] + attn.o_proj(out.transpose(1, 2).reshape(rows, 1, -1))
        return h + layer.mlp(layer.post_attention_layernorm(h))


@contextmanager
def last_positions_only(model, last: torch.Tensor) -> Iterator[None]:
    """For the forwards inside: the model's last layer is `LastPositionsOnly(last)`."""
    layers = model.base_model.layers
    full = layers[-1]
    layers[-1] = LastPositionsOnly(full, last)
    try:
        yield
    finally:
        layers[-1] = full
