"""FSDP2 in one process (a 1-rank gloo group): the build, activation checkpointing, and the
sharded DCP checkpoint that must restore model AND optimizer, and export without a cluster."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from controlplane import checkpoint as ckpt
from controlplane.procs import free_port
from controlplane.spec import ModelSpec, ParallelismSpec, RunSpec
from jobs.pretrain import parallelize as pz
from jobs.pretrain import sharded
from jobs.pretrain import state as st

VOCAB = 256


@pytest.fixture(scope="module")
def group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield dist.new_group(backend="gloo")
    dist.destroy_process_group()


def config(vocab: int = VOCAB):
    return st.llama_config(ModelSpec(preset="tiny").resolve(vocab_size=vocab, max_seq_len=32))


def build(par: ParallelismSpec, vocab: int = VOCAB):
    return pz.build(config(vocab), 0, torch.device("cpu"), par, pz.data_mesh(1, par, "cpu"))


def batch(seed: int = 1, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (4, 17), generator=torch.Generator().manual_seed(seed))


def loss_of(model, x: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=x[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def train(model, steps: int, vocab: int = VOCAB):
    run = RunSpec.model_validate({"train": {"max_steps": 10}})
    opt, sched = st.build_optimizer(model, run, 10)
    for i in range(steps):
        loss_of(model, batch(i, vocab)).backward()
        pz.clip_grad_norm([p for p in model.parameters()], 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return opt, sched


def test_initial_weights_do_not_depend_on_the_stage(group):
    plain = build(ParallelismSpec(zero_stage=0)).state_dict()
    for stage in (1, 3):
        shardedsd = build(ParallelismSpec(zero_stage=stage)).state_dict()
        assert plain.keys() == shardedsd.keys()
        assert all(torch.equal(plain[k], full(shardedsd[k])) for k in plain)
    assert torch.equal(plain["model.norm.weight"], torch.ones_like(plain["model.norm.weight"]))


@pytest.mark.parametrize("mode,wrapped", [("full", 2), ("selective", 1)])
def test_activation_checkpointing_wraps_layers_and_keeps_the_gradient(group, mode, wrapped):
    ref = build(ParallelismSpec(zero_stage=3))
    ac = build(ParallelismSpec(zero_stage=3, activation_checkpointing=mode))
    names = [type(layer).__name__ for layer in pz.decoder_layers(ac)]
    assert sum("CheckpointWrapper" in n for n in names) == wrapped
    loss_of(ref, batch()).backward()
    loss_of(ac, batch()).backward()
    ref_grads = {n.replace(pz._WRAPPED, ""): full(p.grad) for n, p in ref.named_parameters()}
    for n, p in ac.named_parameters():
        torch.testing.assert_close(full(p.grad), ref_grads[n.replace(pz._WRAPPED, "")], rtol=1e-5, atol=1e-7)


def save(tmp_path, model, opt, sched, group, step=3, vocab=VOCAB):
    staging = ckpt.staging_dir(tmp_path, step, tag="t")
    pending = sharded.start_save(staging, model, opt, group, async_save=True, fail_enospc=False, step=step)
    counters = st.Counters(step=step, tokens=step * 64, cursor=step, loss=4.0).as_dict()

    def sidecar(path):
        sharded.write_sidecar(path, sched.state_dict(), st.rng_state(), counters, config(vocab).to_dict(), {})

    return sharded.finish_save(pending, group, tmp_path, {"loss": 4.0}, sidecar)


def fresh_zero3():
    """A new zero_stage 3 build with its optimizer and scheduler, to restore state into."""
    fresh = build(ParallelismSpec(zero_stage=3))
    fopt, fsched = st.build_optimizer(fresh, RunSpec.model_validate({"train": {"max_steps": 10}}), 10)
    return fresh, fopt, fsched


def assert_same_next_step(model, opt, fresh, fopt) -> None:
    """One more step on the same batch leaves both models with the same parameters."""
    x = batch(7)
    for m, o in ((model, opt), (fresh, fopt)):
        loss_of(m, x).backward()
        o.step()
    assert all(torch.equal(full(a), full(b)) for a, b in zip(model.parameters(), fresh.parameters(), strict=True))


def test_sharded_checkpoint_restores_model_and_optimizer(group, tmp_path):
    model = build(ParallelismSpec(zero_stage=3))
    opt, sched = train(model, 3)
    info = save(tmp_path, model, opt, sched, group)
    assert ckpt.verify(info.path).step == 3
    assert {".metadata", "__0_0.distcp", "trainer_state.json", "scheduler.pt"} <= set(info.manifest["files"])

    fresh, fopt, fsched = fresh_zero3()
    counters = sharded.load(info.path, fresh, fopt, fsched)
    assert (counters.step, counters.cursor, counters.loss) == (3, 3, 4.0)
    assert fsched.last_epoch == sched.last_epoch
    want, got = model.state_dict(), fresh.state_dict()
    assert all(torch.equal(full(want[k]), full(got[k])) for k in want)
    by_name = dict(model.named_parameters())
    for name, p in fresh.named_parameters():
        mine, theirs = fopt.state[p], opt.state[by_name[name]]
        assert float(mine["step"]) == 3.0
        assert full(mine["exp_avg"]).abs().sum() > 0  # a real moment, not a freshly zeroed one
        assert torch.equal(full(mine["exp_avg"]), full(theirs["exp_avg"]))
        assert torch.equal(full(mine["exp_avg_sq"]), full(theirs["exp_avg_sq"]))
    assert_same_next_step(model, opt, fresh, fopt)  # training on from it takes the original's step


def test_local_shards_move_to_a_model_rebuilt_on_a_new_mesh_without_disk(group):
    """What an HSDP survivor keeps and a replacement receives: local shards, AdamW moments, the
    param groups' lr, scheduler and counters, through bytes, into a fresh build; training on
    from it takes the same step as the original."""
    model = build(ParallelismSpec(zero_stage=3))
    opt, sched = train(model, 3)
    counters = st.Counters(step=3, tokens=96, cursor=3, loss=4.0, loss_history=[5.0, 4.0])
    data = st.to_bytes(sharded.local_state(model, opt, sched, counters))

    fresh, fopt, fsched = fresh_zero3()
    got = sharded.restore_local(st.from_bytes(data), fresh, fopt, fsched)
    assert got == counters and fsched.last_epoch == sched.last_epoch
    assert fopt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    by_name = dict(model.named_parameters())
    for name, p in fresh.named_parameters():
        assert torch.equal(full(p), full(by_name[name]))
        mine, theirs = fopt.state[p], opt.state[by_name[name]]
        assert float(mine["step"]) == 3.0 and full(mine["exp_avg"]).abs().sum() > 0
        assert torch.equal(full(mine["exp_avg_sq"]), full(theirs["exp_avg_sq"]))
    assert_same_next_step(model, opt, fresh, fopt)


def test_a_failed_shard_write_commits_nothing(group, tmp_path):
    model = build(ParallelismSpec(zero_stage=3))
    opt, sched = train(model, 1)
    staging = ckpt.staging_dir(tmp_path, 1, tag="t")
    pending = sharded.start_save(staging, model, opt, group, async_save=True, fail_enospc=True, step=1)
    with pytest.raises(OSError, match="No space left on device"):
        sharded.finish_save(pending, group, tmp_path, {}, None)
    assert ckpt.committed_steps(tmp_path) == [] and not staging.exists()


def test_export_of_a_sharded_checkpoint_loads_with_transformers(group, tmp_path):
    from transformers import AutoModelForCausalLM

    from controlplane.context import Context
    from controlplane.rollout.export import export_checkpoint
    from controlplane.rundir import RunDir
    from tests.serving_factory import make_run

    ctx = Context.load()
    rd = RunDir(make_run(ctx, "sharded", steps=()))
    dataset = rd.read_spec()["dataset_dir"]
    vocab = json.loads((ctx.storage / dataset / "meta.json").read_text())["vocab_size"]
    model = build(ParallelismSpec(zero_stage=3), vocab)
    opt, sched = train(model, 2, vocab)
    save(rd.checkpoints, model, opt, sched, group, step=2, vocab=vocab)
    out = export_checkpoint(rd)
    assert out.step == 2 and not out.reused
    hf = AutoModelForCausalLM.from_pretrained(out.model_dir)
    x = batch(3, vocab)
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=x).logits, model(input_ids=x).logits, rtol=1e-5, atol=1e-5)
    assert export_checkpoint(rd).reused
