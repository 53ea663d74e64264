"""A key/value cache that grows in place, and one that several prefill batches fill.

transformers' `DynamicLayer` appends each new token with `torch.cat`, which copies the whole
cache of every layer at every step: for a batch of 30 prompts of 540 tokens that is 4 MB a
tensor, four tensors a step on a two-layer model, to add 30 columns. `RoomLayer` keeps its keys
and values as views of a buffer with room for more tokens, so a step (or a prefill chunk)
writes its columns in place; dropping finished rows (`batch_select_indices`) indexes the buffer
once, room and all. Anything else that replaces the tensors (a repeat, a reorder) is taken as
it is, and the next update moves them into a new buffer.

A `Slab` is one such buffer a layer for many rows. Prefill batches write into their own row
ranges of it (`with_room(..., slab=, rows=)`), and `joined` then gives one cache over all the
rows, so that they decode together: a decode step costs about the same for 30 rows as for 200.
A row's columns past its own prompt (its batch's padding, or zeros) are hidden by the decode
mask.

transformers 5.x only (`layered_caches`); `supported` says whether a cache is one this handles.
"""

from __future__ import annotations

import functools

import torch


def layered_caches() -> bool:
    """Whether this transformers makes its caches of layers (5.x), as everything here needs."""
    import transformers

    return int(transformers.__version__.split(".")[0]) >= 5


def supported(cache) -> bool:
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", [None]))


class Slab:
    """Per layer, key and value buffers of `rows` x `capacity` tokens, made on first use."""

    def __init__(self, rows: int, capacity: int) -> None:
        self.rows, self.capacity = rows, capacity
        self.buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def view(self, layer: int, like: torch.Tensor, rows: range) -> tuple[torch.Tensor, torch.Tensor]:
        """The buffers of `layer` (made like `like`: batch, heads, tokens, head_dim) for `rows`."""
        if layer not in self.buffers:
            shape = (self.rows, like.shape[1], self.capacity, like.shape[-1])
            self.buffers[layer] = (like.new_empty(shape), like.new_empty(shape))
        k, v = self.buffers[layer]
        return k[rows.start : rows.stop], v[rows.start : rows.stop]


@functools.cache
def _layer_class():
    from transformers.cache_utils import DynamicLayer

    class RoomLayer(DynamicLayer):
        """A `DynamicLayer` whose keys and values are the filled part of a larger buffer: its own,
        or rows of a `Slab`."""

        def __init__(self, room: int, slab: Slab | None = None, index: int = 0, rows: range | None = None) -> None:
            super().__init__()
            self.room = room
            self.slab, self.index, self.rows = slab, index, rows
            self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

        def _place(self, keys: torch.Tensor, values: torch.Tensor, extra: int) -> None:
            """A buffer holding `keys`/`values` with room for `extra` more tokens; with a slab,
            the slab's rows, whose capacity the caller sized for everything they will hold."""
            n = keys.shape[-2]
            if self.slab is not None:
                if n > self.slab.capacity:
                    raise RuntimeError(f"a slab's rows hold {self.slab.capacity} tokens, not {n}")
                bufs = self.slab.view(self.index, keys, self.rows)
            else:
                bufs = tuple(t.new_empty((*t.shape[:-2], n + extra, t.shape[-1])) for t in (keys, values))
            bufs[0][..., :n, :].copy_(keys)
            bufs[1][..., :n, :].copy_(values)
            self._buffers = (bufs[0], bufs[1])
            self._show(n)

        def _show(self, n: int) -> None:
            self.keys = self._buffers[0][..., :n, :]
            self.values = self._buffers[1][..., :n, :]
            self._shown = self.keys

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n, m = self.get_seq_length(), key_states.shape[-2]
            if n == 0:
                self._place(key_states, value_states, self.room)
                return self.keys, self.values
            fresh = self._buffers is not None and self.keys is self._shown
            if not fresh or n + m > self._buffers[0].shape[-2]:
                if self.slab is not None:  # a new buffer would leave the slab: the joined cache would miss it
                    raise RuntimeError(f"a slab's rows hold {self.slab.capacity} tokens, not {n + m}")
                self._place(self.keys, self.values, m + self.room)
            self._buffers[0][..., n : n + m, :].copy_(key_states)
            self._buffers[1][..., n : n + m, :].copy_(value_states)
            self._show(n + m)
            return self.keys, self.values

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if self._buffers is None or self.keys is not self._shown:
                return super().batch_select_indices(indices)
            n = self.get_seq_length()
            self._buffers = (self._buffers[0][indices], self._buffers[1][indices])
            self._show(n)

    return RoomLayer


def with_room(cache, room: int, slab: Slab | None = None, rows: range | None = None):
    """`cache` with each layer moved into a buffer with room for `room` more tokens: the
    `rows` of `slab` when given (each row's own tokens, then zeros to the slab's capacity)."""
    cls = _layer_class()
    for i, layer in enumerate(cache.layers):
        new = cls(room, slab, i, rows)
        if layer.is_initialized and layer.get_seq_length() > 0:
            new.lazy_initialization(layer.keys, layer.values)
            new._place(layer.keys, layer.values, room)
        cache.layers[i] = new
    return cache


def joined(slab: Slab, config, tokens: int, filled: list[tuple[range, int]]):
    """One cache over all the slab's rows, showing its first `tokens` columns. `filled` says how
    many columns each run of rows was written to; the rest, up to `tokens`, are zeroed (never
    attended to, but unwritten memory may hold NaN bit patterns, which a mask does not cancel)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    cls = _layer_class()
    for i in range(len(cache.layers)):
        layer = cls(0)
        k, v = slab.buffers[i]
        for rows, width in filled:
            k[rows.start : rows.stop, :, width:tokens].zero_()
            v[rows.start : rows.stop, :, width:tokens].zero_()
        layer.lazy_initialization(k, v)
        layer._buffers = (k, v)
        layer._show(tokens)
        cache.layers[i] = layer
    return cache
