"""Checkpoint manifests: commit is atomic; truncated, corrupted or missing files are refused."""

from __future__ import annotations

import os

import pytest

from controlplane import checkpoint as ck


def write_ckpt(root, step, payload=b"weights" * 100):
    stage = ck.staging_dir(root, step)
    (stage / "model.safetensors").write_bytes(payload)
    (stage / "trainer_state.json").write_text(f'{{"step": {step}}}')
    return ck.commit(stage, root, step, {"loss": 1.0})


def test_commit_and_verify(tmp_path):
    info = write_ckpt(tmp_path, 10)
    assert info.path.name == "step_000000010"
    assert ck.verify(info.path).step == 10
    assert info.bytes == 700 + len('{"step": 10}')
    assert not list(tmp_path.glob(".staging-*"))


@pytest.mark.parametrize("damage", ["truncate", "corrupt", "missing", "manifest", "no_manifest"])
def test_damaged_newest_is_skipped(tmp_path, damage):
    write_ckpt(tmp_path, 10)
    newest = write_ckpt(tmp_path, 20)
    target = newest.path / "model.safetensors"
    if damage == "truncate":
        with open(target, "r+b") as f:
            f.truncate(10)
    elif damage == "corrupt":
        data = bytearray(target.read_bytes())
        data[5] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "missing":
        os.remove(target)
    elif damage == "manifest":
        (newest.path / ck.MANIFEST).write_text("{not json")
    else:
        os.remove(newest.path / ck.MANIFEST)
    with pytest.raises(ck.CheckpointCorrupt):
        ck.verify(newest.path)
    info, skipped = ck.newest_verified(tmp_path)
    assert info.step == 10
    assert skipped and skipped[0][0] == 20


def test_staging_dirs_are_never_loaded(tmp_path):
    write_ckpt(tmp_path, 10)
    stage = ck.staging_dir(tmp_path, 30)
    (stage / "model.safetensors").write_bytes(b"half")
    info, _ = ck.newest_verified(tmp_path)
    assert info.step == 10
    assert ck.clean_staging(tmp_path) == 1


def test_max_step_and_prune(tmp_path):
    for s in (10, 20, 30, 40):
        write_ckpt(tmp_path, s)
    info, _ = ck.newest_verified(tmp_path, max_step=25)
    assert info.step == 20
    assert ck.prune(tmp_path, keep_last=2) == [10, 20]
    assert ck.committed_steps(tmp_path) == [30, 40]
    assert ck.prune(tmp_path, keep_last=1, protect={30}) == []


def test_per_rank_hashes_are_merged_and_the_rest_hashed_at_commit(tmp_path):
    stage = ck.staging_dir(tmp_path, 5, tag="a1g1")
    assert ck.staging_dir(tmp_path, 5, tag="a1g1") == stage  # every rank derives the same directory
    for rank in (0, 1):
        (stage / f"__{rank}_0.distcp").write_bytes(bytes([rank]) * 1000)
    (stage / ".metadata").write_bytes(b"index")
    hashed = {}
    for rank in (0, 1):  # as each rank hashes its own shard where it wrote it
        hashed.update(ck.hash_files(stage, [stage / f"__{rank}_0.distcp"]))
    info = ck.commit(stage, tmp_path, 5, hashed=hashed)
    assert set(info.manifest["files"]) == {"__0_0.distcp", "__1_0.distcp", ".metadata"}
    assert ck.verify(info.path).step == 5
    shard = info.path / "__1_0.distcp"
    shard.write_bytes(b"\x07" + shard.read_bytes()[1:])
    with pytest.raises(ck.CheckpointCorrupt, match="__1_0.distcp checksum mismatch"):
        ck.verify(info.path)


def test_commit_refuses_hashes_of_files_that_are_not_staged(tmp_path):
    stage = ck.staging_dir(tmp_path, 6, tag="t")
    (stage / "a").write_bytes(b"x")
    with pytest.raises(ck.CheckpointCorrupt, match="not staged"):
        ck.commit(stage, tmp_path, 6, hashed={"b": {"bytes": 1, "sha256": "0"}})
    assert ck.committed_steps(tmp_path) == []
