"""Export a verified checkpoint as a Hugging Face model directory.

    <out>/
        model.safetensors        the checkpoint's weights, byte for byte
        config.json              LlamaConfig with architectures = [LlamaForCausalLM] (vLLM needs it)
        generation_config.json   bos/eos ids, greedy by default
        tokenizer.json           the dataset's byte-level BPE tokenizer
        tokenizer_config.json    PreTrainedTokenizerFast + special tokens + CHAT_TEMPLATE
        chat_template.jinja      the same chat template, where transformers 5 looks for it
        special_tokens_map.json
        llmctl_export.json       provenance: run, step, checkpoint checksum

`transformers` (AutoModelForCausalLM / AutoTokenizer) and vLLM load the directory as is.
A replicated checkpoint (zero_stage 0) is torch-free to export: its weights file is copied and
the JSON written. A sharded one (zero_stage 1-3: DCP shards of every rank) is read on this
machine without a cluster or a process group: the model's tensors are gathered from the shards
by their global offsets (torch, lazily imported) and written as one safetensors file. The
export is written to a staging directory and renamed into place, and reused when the same
checkpoint was exported before.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controlplane import checkpoint as ckpt
from controlplane.errors import CorruptFileError, NotFoundError, UserError
from controlplane.rundir import RunDir, fsync_dir

EXPORT_MARKER = "llmctl_export.json"
_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
# A plain chat layout for a base model (it has no chat tokens of its own): one "role: text" turn
# per line, each ended by the end-of-text token, and the assistant's turn opened.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
_SPECIAL_CANDIDATES = {
    "bos": ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>", "<|endoftext|>"),
    "eos": ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>"),
    "unk": ("<unk>", "<|unk|>"),
    "pad": ("<pad>", "<|pad|>"),
}


@dataclass(frozen=True)
class Exported:
    model_dir: Path
    run_id: str
    step: int
    version: str
    reused: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_dir": str(self.model_dir),
            "run_id": self.run_id,
            "step": self.step,
            "version": self.version,
            "reused": self.reused,
        }


def version_name(run_id: str, step: int) -> str:
    """Serving version label of a run's checkpoint (DNS-label safe)."""
    return f"{run_id}-s{step}"[:63].strip("-")


def dataset_dir_of(run_dir: RunDir) -> Path:
    record = run_dir.read_spec()
    path = record.get("dataset_dir")
    if not path:
        raise CorruptFileError(f"{run_dir.spec_file}: no dataset_dir in the frozen spec")
    return Path(path)


def safetensors_dtype(path: Path) -> str | None:
    """The dtype of the first tensor in a safetensors file (read from its JSON header)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(min(n, 100_000_000)))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError):
        raise CorruptFileError(f"{path}: not a safetensors file") from None
    for key, entry in header.items():
        if key != "__metadata__" and isinstance(entry, dict):
            return _DTYPES.get(entry.get("dtype", ""))
    return None


def _special_tokens(tokenizer_json: dict[str, Any], meta: dict[str, Any]) -> dict[str, str]:
    """Names of bos/eos/unk/pad: from the dataset's ids where given, else the usual spellings."""
    by_id: dict[int, str] = {}
    vocab = (tokenizer_json.get("model") or {}).get("vocab") or {}
    if isinstance(vocab, dict):
        by_id.update({v: k for k, v in vocab.items() if isinstance(v, int)})
    added = {t.get("content"): t.get("id") for t in tokenizer_json.get("added_tokens") or [] if isinstance(t, dict)}
    by_id.update({v: k for k, v in added.items() if isinstance(v, int)})
    names = {}
    for role in ("bos", "eos"):
        tid = meta.get(f"{role}_id")
        if isinstance(tid, int) and tid in by_id:
            names[role] = by_id[tid]
    for role, candidates in _SPECIAL_CANDIDATES.items():
        if role not in names:
            found = next((c for c in candidates if c in added), None)
            if found:
                names[role] = found
    if "pad" not in names and "eos" in names:
        names["pad"] = names["eos"]
    return names


def _token_id(tokenizer_json: dict[str, Any], token: str) -> int | None:
    for t in tokenizer_json.get("added_tokens") or []:
        if isinstance(t, dict) and t.get("content") == token:
            return t.get("id")
    vocab = (tokenizer_json.get("model") or {}).get("vocab") or {}
    return vocab.get(token) if isinstance(vocab, dict) else None


def select_checkpoint(run_dir: RunDir, step: int | None) -> ckpt.CheckpointInfo:
    if step is None:
        info, skipped = ckpt.newest_verified(run_dir.checkpoints)
        if info is None:
            why = f" (skipped: {'; '.join(f'{s}: {w}' for s, w in skipped)})" if skipped else ""
            raise NotFoundError(f"run {run_dir.run_id}: no verified checkpoint{why}")
        return info
    path = run_dir.checkpoints / ckpt.step_dirname(step)
    if not path.is_dir():
        have = ", ".join(map(str, ckpt.committed_steps(run_dir.checkpoints))) or "none"
        raise NotFoundError(f"run {run_dir.run_id}: no checkpoint at step {step} (have: {have})")
    try:
        return ckpt.verify(path)
    except ckpt.CheckpointCorrupt as exc:
        raise CorruptFileError(f"run {run_dir.run_id}: checkpoint {exc}") from None


def export_checkpoint(run_dir: RunDir, step: int | None = None, out: Path | None = None) -> Exported:
    """Write the newest (or the chosen) verified checkpoint as a Hugging Face model directory."""
    info = select_checkpoint(run_dir, step)
    out = Path(out) if out else run_dir.artifacts / f"export-{ckpt.step_dirname(info.step)}"
    weights_sha = weights_key(info)
    if weights_sha is None:
        raise CorruptFileError(f"run {run_dir.run_id}: checkpoint {info.step} has no model.safetensors nor DCP shards")
    marker = out / EXPORT_MARKER
    if marker.is_file():
        try:
            prior = json.loads(marker.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            prior = {}
        if prior.get("weights_sha256") == weights_sha:
            return Exported(out, run_dir.run_id, info.step, version_name(run_dir.run_id, info.step), reused=True)
    if out.exists() and any(out.iterdir()) and not marker.is_file():
        raise UserError(f"{out}: exists and is not an llmctl export; choose another --out")

    dataset = dataset_dir_of(run_dir)
    tok_path = dataset / "tokenizer.json"
    if not tok_path.is_file():
        raise NotFoundError(f"{tok_path}: the run's tokenizer is missing")
    try:
        tokenizer_json = json.loads(tok_path.read_text(encoding="utf-8"))
        meta = json.loads((dataset / "meta.json").read_text()) if (dataset / "meta.json").is_file() else {}
        config = json.loads((info.path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"run {run_dir.run_id}: unreadable tokenizer, meta or config ({exc})") from None

    specials = _special_tokens(tokenizer_json, meta)
    ids = {role: _token_id(tokenizer_json, tok) for role, tok in specials.items()}
    config["architectures"] = ["LlamaForCausalLM"]
    config["model_type"] = "llama"
    dtype = None if is_sharded(info) else safetensors_dtype(info.path / "model.safetensors")
    if dtype:
        config["torch_dtype"] = dtype
    for role in ("bos", "eos", "pad"):
        if ids.get(role) is not None:
            config[f"{role}_token_id"] = ids[role]
    generation = {"do_sample": False, "bos_token_id": ids.get("bos"), "eos_token_id": ids.get("eos")}
    if ids.get("pad") is not None:
        generation["pad_token_id"] = ids["pad"]
    special_map = {f"{role}_token": tok for role, tok in specials.items()}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": int(config.get("max_position_embeddings") or 2048),
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
        **special_map,
    }
    provenance = {
        "run_id": run_dir.run_id,
        "step": info.step,
        "weights_sha256": weights_sha,
        "checkpoint_meta": info.manifest.get("meta", {}),
        "dataset_dir": str(dataset),
        "exported_at": time.time(),
    }

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.staging-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        if is_sharded(info):
            config["torch_dtype"] = gather_sharded_weights(info.path, staging / "model.safetensors")
        else:
            shutil.copyfile(info.path / "model.safetensors", staging / "model.safetensors")
        shutil.copyfile(tok_path, staging / "tokenizer.json")
        (staging / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
        files = {
            "config.json": config,
            "generation_config.json": generation,
            "tokenizer_config.json": tokenizer_config,
            "special_tokens_map.json": special_map,
            EXPORT_MARKER: provenance,
        }
        for name, data in files.items():
            (staging / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        fsync_dir(staging)
        if out.exists():
            shutil.rmtree(out)
        os.rename(staging, out)
        fsync_dir(out.parent)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return Exported(out, run_dir.run_id, info.step, version_name(run_dir.run_id, info.step), reused=False)


def is_sharded(info: ckpt.CheckpointInfo) -> bool:
    return ".metadata" in info.manifest.get("files", {})


def weights_key(info: ckpt.CheckpointInfo) -> str | None:
    """What identifies a checkpoint's weights: the weights file's sha256, or for a sharded
    checkpoint one sha256 over its shards' (they and the index fix the tensors)."""
    import hashlib

    files = info.manifest.get("files", {})
    if "model.safetensors" in files:
        return files["model.safetensors"].get("sha256")
    if not is_sharded(info):
        return None
    shards = sorted((n, e.get("sha256", "")) for n, e in files.items() if n.endswith(".distcp") or n == ".metadata")
    return hashlib.sha256(json.dumps(shards).encode()).hexdigest()


def gather_sharded_weights(path: Path, out_file: Path) -> str:
    """The model's full tensors from a verified DCP checkpoint, as one safetensors file; its dtype.

    No process group: DCP reads every tensor's pieces from all ranks' shards by their offsets."""
    try:
        import torch
        import torch.distributed.checkpoint as dcp
        from safetensors.torch import save_file
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    except ImportError as exc:
        from controlplane.errors import MissingDependencyError

        raise MissingDependencyError(f"exporting a sharded checkpoint needs torch and safetensors ({exc})") from None
    reader = dcp.FileSystemReader(str(path))
    try:
        metadata = reader.read_metadata()
    except Exception as exc:
        raise CorruptFileError(f"{path}: unreadable DCP index ({type(exc).__name__})") from None
    prefix = "model."
    state = {
        key: torch.empty(tuple(m.size), dtype=m.properties.dtype)
        for key, m in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(m, TensorStorageMetadata)
    }
    if not state:
        raise CorruptFileError(f"{path}: the DCP checkpoint holds no model tensors")
    dcp.load(state, storage_reader=reader, no_dist=True)
    tensors = {key[len(prefix) :]: t.contiguous() for key, t in state.items()}
    save_file(tensors, str(out_file))
    dtype = next(iter(tensors.values())).dtype
    return str(dtype).removeprefix("torch.")


def read_provenance(model_dir: Path) -> dict[str, Any]:
    """What an export says about itself (empty for a model directory llmctl did not write)."""
    try:
        return json.loads((Path(model_dir) / EXPORT_MARKER).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}


def _dir_version(path: Path) -> str:
    import hashlib
    import re

    stem = re.sub(r"[^a-z0-9-]+", "-", path.name.lower()).strip("-")[:40] or "model"
    return f"{stem}-{hashlib.sha256(str(path).encode()).hexdigest()[:6]}"


def resolve_model(ctx: Any, ref: str) -> Exported:
    """A model reference, RUN_ID[@STEP] (exported on demand) or a model directory, as an export."""
    path = Path(ref).expanduser()
    if path.is_dir():
        path = path.resolve()
        if not (path / "config.json").is_file():
            raise UserError(f"{ref}: not a model directory (no config.json)")
        prov = read_provenance(path)
        if prov.get("run_id") and isinstance(prov.get("step"), int):
            return Exported(path, prov["run_id"], prov["step"], version_name(prov["run_id"], prov["step"]), True)
        return Exported(path, "", 0, _dir_version(path), reused=True)
    run, sep, step_text = ref.partition("@")
    step = None
    if sep:
        try:
            step = int(step_text)
        except ValueError:
            raise UserError(f"{ref}: expected RUN_ID@STEP with an integer step") from None
    row = ctx.ledger.find_run(run)
    return export_checkpoint(RunDir(Path(row["run_dir"])), step)
