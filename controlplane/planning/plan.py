"""The planner: what a run costs before a GPU is spent. Pure functions of the specs.

Conventions (stated once, used everywhere):

- Training FLOPs per token = 6 * N + 12 * n_layers * seq_len * hidden (PaLM, Chowdhery et al.
  2022, appendix B: the convention MFU is quoted in). N is the number of parameters that take
  part in matrix multiplies: every parameter except the input-embedding table (a lookup), so the
  output projection counts, and a tied embedding counts once. The attention term counts QK^T and
  AV, forward and backward, without halving for the causal mask. Training FLOPs = that x tokens.
- Time = FLOPs / (GPUs x peak dense bf16 FLOP/s x MFU).
- Energy: GPU energy = GPU-hours x average board power (TDP unless a measured figure is given);
  facility energy = GPU energy x PUE; CO2e = facility energy x grid intensity. Host CPUs, NICs
  and switches are not in the GPU figure; they are inside PUE only if the operator counts them so.
- Memory per GPU, as the job lays it out (jobs/pretrain/parallelize.py, FSDP2 with bf16 compute
  and fp32 reduction): fp32 weights 4 B/param, fp32 gradients 4 B/param, AdamW moments 8 B/param.
  zero_stage 0 keeps all of them on every worker. Stages 1-3 shard all three over the
  data-parallel group; stages 1 and 2 also hold the unsharded bf16 weights (2 B/param) from
  forward to backward, stage 1 with accumulation holds unsharded gradients between micro-batches
  (the reduce-scatter waits for the last one), and stage 3 holds two decoder layers unsharded at a
  time (the one computing and the one prefetched). On a CPU the compute copy is fp32
  (`compute_bytes=4`). `benchmarks/train_memory.py` measures this against the job. Weights are
  split evenly over tensor x pipeline. Activations per layer per micro-batch (Korthikanti et al.
  2022, "Reducing Activation Recomputation in Large Transformer Models", with flash attention so
  no seq^2 score term): s*b*h*(10 + 24/t) bytes with no checkpointing, 34*s*b*h/t with selective
  recomputation (sequence parallel), 2*s*b*h/t per layer plus one layer's working set with full
  checkpointing. The first pipeline stage holds min(pipeline, micro-batches) micro-batches in
  flight (1F1B), so activations scale with n_layers/pipeline x that. The last stage adds logits
  (bf16 + fp32 for the loss: 6*s*b*V/t bytes), and a fixed reserve covers the CUDA context and
  allocator fragmentation.
- Checkpoint = fp32 weights + Adam moments = 12 B/param. Persisting it takes size / storage write
  bandwidth; with async_save a step blocks only for the device-to-host copy, spread over all GPUs,
  plus a fixed second for the barrier and state-dict gathering (measure it: `--checkpoint-stall-s`
  or `llmctl simulate --calibrate RUN`).
- Checkpoint interval: the supervisor's Young/Daly sqrt(2 x blocking cost x cluster MTBF)
  (the cost is the time the step is blocked; the background persist does not stop training)
  (`controlplane.supervisor.rules.young_daly_interval`), never shorter than the time to persist
  one checkpoint (saves would queue up otherwise).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from controlplane.errors import ConfigurationError, UserError
from controlplane.planning.gpus import GpuModel, gpu
from controlplane.spec import ClusterSpec, LlamaDims, ParallelismSpec, RunSpec
from controlplane.supervisor.rules import young_daly_interval

BYTES_WEIGHT = 2  # bf16 compute copy of the weights
BYTES_MASTER = 4  # fp32 weights and fp32 gradients (each)
BYTES_ADAM = 8  # AdamW m + v, fp32
BYTES_CHECKPOINT = 12  # fp32 weights + Adam m + v (the bf16 weights are a cast of them)
SECONDS_PER_DAY = 86400.0


class WontFitError(UserError):
    """The chosen parallelism does not fit the GPU's memory."""


# --------------------------------------------------------------------------- FLOPs and time


def matmul_params(dims: LlamaDims) -> int:
    """Parameters that take part in matrix multiplies: all but the input-embedding lookup table."""
    total = dims.param_count()
    return total if dims.tie_embeddings else total - dims.vocab_size * dims.hidden_size


def flops_per_token(dims: LlamaDims, seq_len: int) -> float:
    """Training FLOPs per token: 6 N + 12 L s h (forward and backward)."""
    return 6.0 * matmul_params(dims) + 12.0 * dims.num_layers * seq_len * dims.hidden_size


def train_seconds(total_flops: float, gpus: int, peak_flops: float, mfu: float) -> float:
    return total_flops / (gpus * peak_flops * mfu)


def tokens_in(seconds: float, per_token_flops: float, gpus: int, peak_flops: float, mfu: float) -> float:
    return seconds * gpus * peak_flops * mfu / per_token_flops


# --------------------------------------------------------------------------- memory


def memory_per_gpu(
    dims: LlamaDims,
    par: ParallelismSpec,
    gpus: int,
    seq_len: int,
    micro_batch: int,
    micro_batches_per_step: int,
    reserve_bytes: float = 2e9,
    compute_bytes: int = BYTES_WEIGHT,
) -> dict[str, float]:
    """Bytes per GPU by component (see the module docstring for the model)."""
    t, p = par.tensor, par.pipeline
    dp = max(1, gpus // (t * p))
    params = dims.param_count() / (t * p)
    shard = dp if par.zero_stage >= 1 else 1
    layer = (params - dims.vocab_size * dims.hidden_size * (1 if dims.tie_embeddings else 2)) / max(1, dims.num_layers)
    if par.zero_stage == 0:
        unsharded = 0.0
    elif par.zero_stage <= 2:
        unsharded = compute_bytes * params
    else:
        unsharded = compute_bytes * 2 * layer
    grads = BYTES_MASTER * params / (1 if par.zero_stage == 0 else dp)
    if par.zero_stage == 1 and micro_batches_per_step > 1:
        grads += compute_bytes * params  # accumulated unsharded until the last micro-batch
    s, b, h, L, V = seq_len, micro_batch, dims.hidden_size, dims.num_layers, dims.vocab_size
    sbh = float(s * b * h)
    layers_held = (L / p) * min(p, max(1, micro_batches_per_step))
    if par.activation_checkpointing == "none":
        per_layer, working = sbh * (10 + 24 / t), 0.0
    elif par.activation_checkpointing == "selective":  # every second layer recomputed
        per_layer, working = (sbh * (10 + 24 / t) + 2 * sbh / t) / 2, sbh * (10 + 24 / t)
    else:  # full: keep each layer's input, recompute one layer at a time in backward
        per_layer, working = 2 * sbh / t, sbh * 34 / t
    return {
        "weights": BYTES_MASTER * params / shard + unsharded,
        "gradients": grads,
        "optimizer": BYTES_ADAM * params / shard,
        "activations": per_layer * layers_held + working,
        "logits": 6.0 * s * b * V / t,
        "reserve": reserve_bytes,
    }


# --------------------------------------------------------------------------- checkpoint interval


def checkpoint_interval_s(stall_s: float, mtbf_s: float, persist_s: float, step_s: float) -> float:
    """The supervisor's Young/Daly interval, but never shorter than one persist or one step."""
    if not math.isfinite(mtbf_s):
        return math.inf
    young = young_daly_interval(stall_s, mtbf_s) if stall_s > 0 else 0.0
    return max(young, persist_s, step_s)


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Assumptions:
    mfu: float = 0.40
    gpu_power_watts: float | None = None  # None: the GPU's TDP
    mtbf_hours: float | None = None  # cluster MTBF; None: the failure model scaled to the GPUs
    host_copy_gbps: float = 10.0  # device-to-host copy per GPU for an async checkpoint, GB/s
    checkpoint_sync_s: float = 1.0  # fixed part of a blocking save: barrier, state-dict gather, metadata
    checkpoint_stall_s: float | None = None  # measured blocking time per checkpoint; overrides the model
    reserve_gb: float = 2.0  # CUDA context and allocator fragmentation per GPU
    days: float = 30.0  # the window for "tokens one month buys"
    tokens: float | None = None  # token budget; None: the run spec's


@dataclass
class Plan:
    gpu_model: str
    gpus: int
    parameters: int
    matmul_parameters: int
    seq_len: int
    tokens: float
    flops_per_token: float
    attention_flops_fraction: float
    total_flops: float
    mfu: float
    peak_pflops: float
    achieved_pflops: float
    train_seconds: float
    train_days: float
    gpu_hours: float
    tokens_per_second: float
    window_days: float
    tokens_in_window: float
    step_seconds: float
    steps: int
    gpu_power_watts: float
    gpu_energy_mwh: float
    pue: float
    facility_energy_mwh: float
    carbon_intensity_kg_per_kwh: float
    co2e_tonnes: float
    parallelism: dict[str, Any]
    memory_gb: dict[str, float]
    memory_total_gb: float
    memory_capacity_gb: float
    fits: bool
    checkpoint_gb: float
    checkpoint_persist_seconds: float
    checkpoint_stall_seconds: float
    cluster_mtbf_hours: float
    checkpoint_interval_seconds: float
    checkpoint_interval_steps: int
    assumptions: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cluster_gpu(cluster: ClusterSpec) -> tuple[GpuModel, int]:
    """The train groups' GPU model and GPU count; one model per plan."""
    groups = [g for g in cluster.node_groups if g.role == "train" and g.gpus_per_node > 0]
    if not groups:
        raise ConfigurationError("cluster: no train node group with GPUs to plan for")
    models = {gpu(g.gpu_model or "").name for g in groups}
    if len(models) > 1:
        raise ConfigurationError(f"cluster: train groups mix GPU models ({', '.join(sorted(models))}); plan one")
    return gpu(groups[0].gpu_model or ""), sum(g.total_gpus for g in groups)


def run_gpus(run: RunSpec, cluster_gpus: int) -> int:
    """GPUs the run uses: workers x GPUs per worker, or the whole train pool for a CPU spec."""
    wanted = run.world_gpus
    if wanted <= 0:
        return cluster_gpus
    if wanted > cluster_gpus:
        raise ConfigurationError(
            f"workers: the run asks for {wanted} GPUs, the cluster's train groups have {cluster_gpus}"
        )
    return wanted


def make_plan(cluster: ClusterSpec, run: RunSpec, a: Assumptions | None = None, *, per_gpu_mtbf_hours: float) -> Plan:
    """Everything `llmctl plan` prints. `per_gpu_mtbf_hours` comes from the failure model."""
    a = a or Assumptions()
    if not 0 < a.mfu <= 1:
        raise ConfigurationError(f"--mfu: expected a fraction in (0, 1], got {a.mfu}")
    model, pool = cluster_gpu(cluster)
    gpus = run_gpus(run, pool)
    par = run.parallelism
    mp = par.model_parallel
    if gpus % mp:
        raise ConfigurationError(f"parallelism: tensor x pipeline ({mp}) must divide the {gpus} GPUs")
    dims = run.model.resolve(vocab_size=run.data.vocab_size, max_seq_len=run.train.seq_len)
    if dims.num_layers % par.pipeline:
        raise ConfigurationError(
            f"parallelism.pipeline: {par.pipeline} stages do not divide num_layers ({dims.num_layers})"
        )
    if dims.num_heads % par.tensor:
        raise ConfigurationError(f"parallelism.tensor: {par.tensor} does not divide num_heads ({dims.num_heads})")
    dp = gpus // mp
    train = run.train
    seq = train.seq_len
    tokens = float(a.tokens) if a.tokens else float(train.steps * train.tokens_per_step)
    per_token = flops_per_token(dims, seq)
    attn = 12.0 * dims.num_layers * seq * dims.hidden_size
    total = per_token * tokens
    peak = model.peak_flops
    secs = train_seconds(total, gpus, peak, a.mfu)
    tok_s = gpus * peak * a.mfu / per_token
    step_s = train.tokens_per_step / tok_s
    watts = a.gpu_power_watts if a.gpu_power_watts is not None else model.tdp_watts
    gpu_hours = gpus * secs / 3600.0
    gpu_kwh = gpu_hours * watts / 1000.0
    fac_kwh = gpu_kwh * cluster.pue

    if train.global_batch_size % dp:
        raise ConfigurationError(
            f"train.global_batch_size ({train.global_batch_size}) must be divisible by the data-parallel degree ({dp})"
        )
    per_rank = train.global_batch_size // dp
    micro = min(train.micro_batch_size or per_rank, per_rank)
    mem = memory_per_gpu(dims, par, gpus, seq, micro, max(1, per_rank // micro), a.reserve_gb * 1e9)
    mem_total = sum(mem.values())

    ckpt_bytes = BYTES_CHECKPOINT * dims.param_count()
    persist = ckpt_bytes / (cluster.storage.write_bandwidth_gbps * 1e9)
    if a.checkpoint_stall_s is not None:
        stall = a.checkpoint_stall_s
    elif run.checkpoint.async_save:
        stall = a.checkpoint_sync_s + ckpt_bytes / (gpus * a.host_copy_gbps * 1e9)
    else:
        stall = a.checkpoint_sync_s + persist
    if a.mtbf_hours is not None:
        mtbf_h = a.mtbf_hours
    elif run.checkpoint.mtbf_hours is not None:
        mtbf_h = run.checkpoint.mtbf_hours
    else:
        mtbf_h = per_gpu_mtbf_hours / gpus
    steps = math.ceil(tokens / train.tokens_per_step)
    interval = checkpoint_interval_s(stall, mtbf_h * 3600.0, persist, step_s)
    return Plan(
        gpu_model=model.name,
        gpus=gpus,
        parameters=dims.param_count(),
        matmul_parameters=matmul_params(dims),
        seq_len=seq,
        tokens=tokens,
        flops_per_token=per_token,
        attention_flops_fraction=attn / per_token,
        total_flops=total,
        mfu=a.mfu,
        peak_pflops=gpus * peak / 1e15,
        achieved_pflops=gpus * peak * a.mfu / 1e15,
        train_seconds=secs,
        train_days=secs / SECONDS_PER_DAY,
        gpu_hours=gpu_hours,
        tokens_per_second=tok_s,
        window_days=a.days,
        tokens_in_window=tokens_in(a.days * SECONDS_PER_DAY, per_token, gpus, peak, a.mfu),
        step_seconds=step_s,
        steps=steps,
        gpu_power_watts=watts,
        gpu_energy_mwh=gpu_kwh / 1000.0,
        pue=cluster.pue,
        facility_energy_mwh=fac_kwh / 1000.0,
        carbon_intensity_kg_per_kwh=cluster.carbon_intensity_kg_per_kwh,
        co2e_tonnes=fac_kwh * cluster.carbon_intensity_kg_per_kwh / 1000.0,
        parallelism={**par.model_dump(), "data": dp, "micro_batch": micro},
        memory_gb={k: v / 1e9 for k, v in mem.items()},
        memory_total_gb=mem_total / 1e9,
        memory_capacity_gb=model.memory_gb,
        fits=mem_total <= model.memory_bytes,
        checkpoint_gb=ckpt_bytes / 1e9,
        checkpoint_persist_seconds=persist,
        checkpoint_stall_seconds=stall,
        cluster_mtbf_hours=mtbf_h,
        checkpoint_interval_seconds=interval,
        checkpoint_interval_steps=steps if math.isinf(interval) else max(1, min(steps, math.ceil(interval / step_s))),
        assumptions=asdict(a),
    )


def require_fit(plan: Plan) -> None:
    """Raise a one-line WontFitError naming the biggest components and what to try."""
    if plan.fits:
        return
    parts = sorted(plan.memory_gb.items(), key=lambda kv: -kv[1])
    detail = ", ".join(f"{k} {v:.1f}" for k, v in parts if v >= 0.05)
    par = plan.parallelism
    hints = []
    if par["zero_stage"] < 3:
        hints.append(f"zero_stage {par['zero_stage'] + 1}")
    if par["activation_checkpointing"] != "full":
        hints.append("activation_checkpointing full")
    hints.append(f"tensor {par['tensor'] * 2}")
    raise WontFitError(
        f"does not fit: {plan.memory_total_gb:.1f} GB per GPU needed ({detail}) > "
        f"{plan.memory_capacity_gb:.0f} GB on {plan.gpu_model}; try {' or '.join(hints)}"
    )
