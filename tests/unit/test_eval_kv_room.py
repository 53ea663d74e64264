"""The in-place key/value cache: the tensors transformers' own cache would hold, without a copy a
step; the slab that prefill batches fill and decode shares."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("caches made of layers are transformers 5.x", allow_module_level=True)

from transformers import DynamicCache  # noqa: E402
from transformers.cache_utils import DynamicLayer  # noqa: E402

from jobs.evaluate import kv_room  # noqa: E402


def kv(rows, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 2, n, 8, generator=g), torch.randn(rows, 2, n, 8, generator=g)


def test_room_layer_holds_what_a_dynamic_layer_holds_and_appends_in_place():
    plain = DynamicLayer()
    room = kv_room._layer_class()(room=3)
    for step, n in enumerate([5, 1, 1, 1]):  # a prefill, then decode steps within the room
        k, v = kv(4, n, step)
        want, got = plain.update(k, v), room.update(k, v)
        assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
        if step == 1:
            buffer = room.keys.untyped_storage().data_ptr()
    assert room.keys.untyped_storage().data_ptr() == buffer  # the steps wrote into one buffer
    index = torch.tensor([0, 2])
    plain.batch_select_indices(index)
    room.batch_select_indices(index)
    assert torch.equal(plain.keys, room.keys) and torch.equal(plain.values, room.values)
    k, v = kv(2, 4, 9)  # past the room: moved into a larger buffer, contents kept
    want, got = plain.update(k, v), room.update(k, v)
    assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
    assert room.get_seq_length() == plain.get_seq_length() == 12


def test_prefill_batches_fill_their_rows_of_one_slab_and_decode_on_it_joined():
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2)
    slab = kv_room.Slab(rows=5, capacity=12)
    for layer in range(2):  # unwritten memory may hold anything: joined must not show it
        slab.view(layer, torch.zeros(1, 2, 1, 8), range(0, 5))[0].fill_(float("nan"))
    parts = [(range(0, 3), 7), (range(3, 5), 4)]
    written = {}
    for rows, width in parts:
        cache = kv_room.with_room(DynamicCache(config=config), room=5, slab=slab, rows=rows)
        for layer in range(2):
            k, v = kv(len(rows), width, layer + rows.start)
            cache.update(k, v, layer)
            written[rows.start, layer] = k
    joined = kv_room.joined(slab, config, 7, parts)
    assert joined.get_seq_length() == 7
    for (start, layer), k in written.items():
        keys = joined.layers[layer].keys[start : start + len(k)]
        assert torch.equal(keys[:, :, : k.shape[2]], k)
        assert torch.count_nonzero(keys[:, :, k.shape[2] :]) == 0  # the gap, zeroed
    step = kv(5, 1, 99)
    joined.update(*step, 0)
    assert torch.equal(joined.layers[0].keys[:, :, 7:8], step[0])


def test_a_slab_never_silently_lets_rows_outgrow_it():
    config = transformers.LlamaConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2)
    slab = kv_room.Slab(rows=2, capacity=6)
    cache = kv_room.with_room(DynamicCache(config=config), room=0, slab=slab, rows=range(0, 2))
    cache.update(*kv(2, 5, 0), 0)
    cache.update(*kv(2, 1, 1), 0)
    with pytest.raises(RuntimeError, match="hold 6 tokens, not 7"):
        cache.update(*kv(2, 1, 2), 0)
