"""Checkpoint roundtrip: save, commit, verify, load, restore -> bitwise the same state and the same next step."""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from controlplane import checkpoint as ckpt
from controlplane.spec import RunSpec
from jobs.pretrain import state as st


def _replica(seed=0):
    run = RunSpec.model_validate(
        {"train": {"max_steps": 10, "seq_len": 16, "schedule": {"warmup_steps": 2}}, "seed": seed}
    )
    dims = run.model.resolve(vocab_size=128, max_seq_len=16)
    config = st.llama_config(dims, 1, 0)
    model = st.build_model(config, run.seed, torch.device("cpu"))
    opt, sched = st.build_optimizer(model, run, 10)
    return model, opt, sched, config


def _train_step(model, opt, sched, batch, before_update=lambda: None):
    logits = model(input_ids=batch[:, :-1]).logits
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    before_update()
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def test_same_seed_same_init():
    a, b = _replica(0)[0], _replica(0)[0]
    c = _replica(1)[0]
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_checkpoint_roundtrip_restores_exactly(tmp_path):
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 128, (4, 17), generator=gen) for _ in range(5)]
    model, opt, sched, config = _replica()
    for b in batches[:3]:
        _train_step(model, opt, sched, b)
    torch.manual_seed(123)
    np.random.seed(5)
    random.seed(9)
    counters = st.Counters(step=3, tokens=192, cursor=3, loss=4.2, loss_history=[4.5, 4.3, 4.2])
    snap = st.capture(model, opt, sched, counters)
    root = tmp_path / "checkpoints"
    staging = ckpt.staging_dir(root, 3)
    st.persist(snap, staging, config=config.to_dict(), extra={"seed": 0, "world_size": 1, "attempt": 1})
    info = ckpt.commit(staging, root, 3, {"loss": 4.2, "tokens": 192, "attempt": 1})
    ckpt.verify(info.path)
    assert sorted(info.manifest["files"]) == sorted(
        [st.MODEL_FILE, st.CONFIG_FILE, st.OPTIMIZER_FILE, st.TRAINER_FILE, st.RNG_FILE]
    )
    expected_next = [_train_step(model, opt, sched, b) for b in batches[3:]]
    expected_rand = (torch.rand(3), np.random.rand(), random.random())

    fresh, fopt, fsched, _ = _replica(seed=7)  # a different init, all overwritten by the restore
    restored = st.restore(st.load(info.path), fresh, fopt, fsched)
    assert restored.as_dict() == counters.as_dict()
    got_rand = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(got_rand[0], expected_rand[0]) and got_rand[1:] == expected_rand[1:]
    assert fsched.last_epoch == 3 and fsched.get_last_lr() == pytest.approx(sched_lrs_after(3))
    assert [_train_step(fresh, fopt, fsched, b) for b in batches[3:]] == expected_next
    ref = model.state_dict()
    assert all(torch.equal(ref[k], v) for k, v in fresh.state_dict().items())


def sched_lrs_after(n):
    model, opt, sched, _ = _replica()
    for _ in range(n):
        opt.step()
        sched.step()
    return sched.get_last_lr()


def test_bytes_roundtrip_for_replica_sync():
    model, opt, sched, _ = _replica()
    _train_step(model, opt, sched, torch.randint(0, 128, (2, 17)))
    snap = st.capture(model, opt, sched, st.Counters(step=1, tokens=32, cursor=1, loss=4.0))
    other, oopt, osched, _ = _replica(seed=3)
    counters = st.restore(st.from_bytes(st.to_bytes(snap)), other, oopt, osched)
    assert counters.step == 1
    assert all(torch.equal(model.state_dict()[k], v) for k, v in other.state_dict().items())
    assert oopt.state_dict()["state"].keys() == opt.state_dict()["state"].keys()


def test_capture_is_a_deep_copy():
    model, opt, sched, _ = _replica()
    _train_step(model, opt, sched, torch.randint(0, 128, (2, 17)))
    snap = st.capture(model, opt, sched, st.Counters())
    before = {k: v.clone() for k, v in snap["model"].items()}
    exp_avg = snap["optimizer"]["state"][0]["exp_avg"].clone()
    _train_step(model, opt, sched, torch.randint(0, 128, (2, 17)))
    assert all(torch.equal(before[k], snap["model"][k]) for k in before)
    assert torch.equal(exp_avg, snap["optimizer"]["state"][0]["exp_avg"])


def _same(a, b):
    """Two state_dict-like structures hold equal tensors and equal everything else."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    return a == b


def test_staged_snapshot_is_the_step_boundary_state_while_training_goes_on(tmp_path):
    """Stage at the boundary, copy while the next step runs, guard before its update: the
    checkpoint holds the boundary state, and resuming from it replays the same steps."""
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 128, (4, 17), generator=gen) for _ in range(5)]
    model, opt, sched, config = _replica()
    for b in batches[:2]:
        _train_step(model, opt, sched, b)
    counters = st.Counters(step=2, tokens=128, cursor=2, loss=4.4, loss_history=[4.5, 4.4])
    reference = st.capture(model, opt, sched, counters)
    staging = st.HostStaging()
    staging.stage(model, opt, sched, counters)
    out: dict = {}
    writer = threading.Thread(target=lambda: out.update(snap=staging.fill()))
    writer.start()  # the copy runs while the next step's forward/backward does
    expected_next = [_train_step(model, opt, sched, batches[2], before_update=staging.guard)]
    writer.join(timeout=30)
    assert staging.wait_released() >= 0.0
    snap = out["snap"]
    expected_next += [_train_step(model, opt, sched, b) for b in batches[3:]]
    assert _same(snap["model"], reference["model"]) and _same(snap["optimizer"], reference["optimizer"])
    assert snap["counters"] == reference["counters"] and snap["scheduler"] == reference["scheduler"]

    root = tmp_path / "checkpoints"
    d = ckpt.staging_dir(root, 2)
    st.persist(snap, d, config=config.to_dict(), extra={"seed": 0, "world_size": 1, "attempt": 1})
    info = ckpt.commit(d, root, 2)
    fresh, fopt, fsched, _ = _replica(seed=7)
    assert st.restore(st.load(info.path), fresh, fopt, fsched).step == 2
    assert [_train_step(fresh, fopt, fsched, b) for b in batches[2:]] == expected_next


def test_guard_holds_the_update_until_the_copy_is_done():
    model, opt, sched, _ = _replica()
    _train_step(model, opt, sched, torch.randint(0, 128, (2, 17)))
    staging = st.HostStaging()
    staging.stage(model, opt, sched, st.Counters(step=1))
    guard = threading.Thread(target=staging.guard)
    guard.start()
    guard.join(timeout=0.3)
    assert guard.is_alive(), "the guard let the update through before the copy was done"
    staging.fill()
    guard.join(timeout=10)
    assert not guard.is_alive()
    assert staging.wait_released() >= 0.25  # the stall is what training waited
    assert staging.guard() == 0.0  # released: later updates do not wait


def test_staging_reuses_its_buffers_and_takes_one_snapshot_at_a_time():
    model, opt, sched, _ = _replica()
    _train_step(model, opt, sched, torch.randint(0, 128, (2, 17)))
    staging = st.HostStaging()
    staging.stage(model, opt, sched, st.Counters(step=1))
    with pytest.raises(RuntimeError, match="still being staged"):
        staging.stage(model, opt, sched, st.Counters(step=1))
    first = staging.fill()
    staging.release()
    weights = {k: v.clone() for k, v in first["model"].items()}
    _train_step(model, opt, sched, torch.randint(0, 128, (2, 17)))
    assert all(torch.equal(weights[k], v) for k, v in first["model"].items())  # the live weights moved on
    staging.stage(model, opt, sched, st.Counters(step=2))
    second = staging.fill()
    staging.release()
    assert all(first["model"][k] is second["model"][k] for k in first["model"])  # same buffers, no new memory
    live = model.state_dict()
    assert all(torch.equal(live[k], v) and live[k].data_ptr() != v.data_ptr() for k, v in second["model"].items())


def test_failed_copy_releases_the_guard():
    model, opt, sched, _ = _replica()
    _train_step(model, opt, sched, torch.randint(0, 128, (2, 17)))
    staging = st.HostStaging()
    staging.stage(model, opt, sched, st.Counters(step=1))
    snap = staging.fill()
    staging.release()
    staging.stage(model, opt, sched, st.Counters(step=1))
    key = ("model", next(iter(snap["model"])))
    buf = staging._buffers[key]  # same shape and dtype, but one element: the next copy into it fails
    staging._buffers[key] = torch.zeros(1, dtype=buf.dtype).expand(buf.shape)
    with pytest.raises(RuntimeError):
        staging.fill()
    t0 = time.perf_counter()
    staging.guard()
    assert time.perf_counter() - t0 < 5 and staging.error is not None


def test_sync_save_from_live_tied_weights(tmp_path):
    """A synchronous save writes the live tensors; tied embeddings share memory, which
    safetensors refuses unless the writer unshares them."""
    run = RunSpec.model_validate({"model": {"preset": "tiny", "tie_embeddings": True}, "train": {"max_steps": 4}})
    config = st.llama_config(run.model.resolve(vocab_size=128, max_seq_len=16), 1, 0)
    model = st.build_model(config, 0, torch.device("cpu"))
    opt, sched = st.build_optimizer(model, run, 4)
    _train_step(model, opt, sched, torch.randint(0, 128, (2, 17)))
    state = st.live_state(model, opt, sched, st.Counters(step=1))
    assert state["model"]["lm_head.weight"].data_ptr() == model.lm_head.weight.data_ptr()  # no copy
    root = tmp_path / "checkpoints"
    d = ckpt.staging_dir(root, 1)
    st.persist(state, d, config=config.to_dict(), extra={})
    loaded = st.load(ckpt.commit(d, root, 1).path)
    assert all(torch.equal(loaded["model"][k], v) for k, v in model.state_dict().items())
