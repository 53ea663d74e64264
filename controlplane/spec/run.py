"""RunSpec: the model, data, training loop, workers and the policies of one pretraining run."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, model_validator

from controlplane.spec.base import NAME_PATTERN, PositiveInt, StrictModel

# --------------------------------------------------------------------------- run


class LlamaDims(StrictModel):
    """Resolved Llama architecture dimensions."""

    hidden_size: PositiveInt
    num_layers: PositiveInt
    num_heads: PositiveInt
    num_kv_heads: PositiveInt
    ffn_size: PositiveInt
    vocab_size: PositiveInt
    max_seq_len: PositiveInt = 2048
    tie_embeddings: bool = False

    @model_validator(mode="after")
    def _heads_divide(self) -> LlamaDims:
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be divisible by num_heads")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be divisible by num_kv_heads")
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def param_count(self) -> int:
        h, f, v = self.hidden_size, self.ffn_size, self.vocab_size
        kv = self.num_kv_heads * self.head_dim
        attn = h * h + 2 * h * kv + h * h  # q, k, v, o
        mlp = 3 * h * f  # gate, up, down
        per_layer = attn + mlp + 2 * h  # two RMSNorms
        embeddings = v * h * (1 if self.tie_embeddings else 2)
        return self.num_layers * per_layer + embeddings + h  # final norm


# Head dimension (hidden_size / num_heads) 64 in tiny and small: one that vLLM's CPU and GPU
# attention both serve (its CPU backend refuses 16); the parameter counts are unchanged.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=1, num_kv_heads=1, ffn_size=176, max_seq_len=256),
    "small": dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4, ffn_size=688, max_seq_len=512),
    # Llama-2-13B shape.
    "13b": dict(hidden_size=5120, num_layers=40, num_heads=40, num_kv_heads=40, ffn_size=13824, max_seq_len=4096),
}
PRESET_DEFAULT_VOCAB = {"tiny": 4096, "small": 8192, "13b": 32000}


class ModelSpec(StrictModel):
    preset: Literal["tiny", "small", "13b"] | None = Field(
        "tiny", description="Named Llama shape; explicit dimensions below override it."
    )
    hidden_size: PositiveInt | None = Field(None, description="Model width.")
    num_layers: PositiveInt | None = Field(None, description="Transformer blocks.")
    num_heads: PositiveInt | None = Field(None, description="Attention heads.")
    num_kv_heads: PositiveInt | None = Field(None, description="Key/value heads (GQA); default num_heads.")
    ffn_size: PositiveInt | None = Field(None, description="SwiGLU intermediate size.")
    vocab_size: PositiveInt | None = Field(
        None, description="Vocabulary size; null takes it from the dataset's tokenizer."
    )
    tie_embeddings: bool = Field(False, description="Share input and output embeddings.")

    @model_validator(mode="after")
    def _explicit_or_preset(self) -> ModelSpec:
        if self.preset is None:
            missing = [k for k in ("hidden_size", "num_layers", "num_heads", "ffn_size") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"without a preset, set {', '.join(missing)}")
        return self

    def resolve(self, vocab_size: int | None = None, max_seq_len: int | None = None) -> LlamaDims:
        """Dimensions with preset defaults filled in; `vocab_size` comes from the tokenizer."""
        base: dict[str, Any] = dict(PRESETS[self.preset]) if self.preset else {}
        for key in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_size"):
            if getattr(self, key) is not None:
                base[key] = getattr(self, key)
        if self.num_kv_heads is None and (self.num_heads is not None or "num_kv_heads" not in base):
            base["num_kv_heads"] = base["num_heads"]
        base["vocab_size"] = self.vocab_size or vocab_size or PRESET_DEFAULT_VOCAB.get(self.preset or "", 32000)
        if max_seq_len:
            base["max_seq_len"] = max(max_seq_len, base.get("max_seq_len", 0))
        base["tie_embeddings"] = self.tie_embeddings
        return LlamaDims(**base)


DEFAULT_DATA_PATH = "datasets/manpages-ja"


class MixtureEntry(StrictModel):
    path: str = Field(description="Prepared dataset directory; relative paths are under the cluster's storage root.")
    weight: float = Field(gt=0, description="Relative share of the training samples drawn from it.")


class DataSpec(StrictModel):
    path: str = Field(
        DEFAULT_DATA_PATH,
        description="Prepared dataset directory (tokenizer.json, shards); relative paths are "
        "under the cluster's storage root.",
    )
    mixture: list[MixtureEntry] | None = Field(
        None,
        description="Several prepared datasets sampled in these proportions (weights are normalized); "
        "they must share one tokenizer. Replaces `path`.",
    )
    source: str = Field(
        "manpages-ja",
        description="What `data prepare` reads: 'manpages-ja' (Debian's Japanese manual pages) "
        "or a directory of .txt/.jsonl files.",
    )
    vocab_size: int = Field(4096, ge=256, le=262144, description="Byte-level BPE vocabulary size.")
    heldout_fraction: float = Field(0.02, gt=0, lt=0.5, description="Share of documents held out for evaluation.")

    @model_validator(mode="after")
    def _path_or_mixture(self) -> DataSpec:
        if self.mixture is not None:
            if self.path != DEFAULT_DATA_PATH:
                raise ValueError("set data.path or data.mixture, not both")
            if not self.mixture:
                raise ValueError("data.mixture: expected at least one dataset")
            paths = [m.path for m in self.mixture]
            if len(set(paths)) != len(paths):
                raise ValueError("data.mixture: a dataset is named twice")
        return self

    def datasets(self) -> list[tuple[str, float]]:
        """(path, normalized weight) of every dataset the run trains on."""
        if not self.mixture:
            return [(self.path, 1.0)]
        total = sum(m.weight for m in self.mixture)
        return [(m.path, m.weight / total) for m in self.mixture]


class ScheduleSpec(StrictModel):
    lr: float = Field(3e-3, gt=0, le=1.0, description="Peak learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final LR as a fraction of the peak.")
    warmup_steps: int = Field(20, ge=0, description="Linear warmup steps.")
    decay: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    grad_clip: float = Field(1.0, gt=0, description="Global gradient-norm clip.")


class TrainSpec(StrictModel):
    max_steps: PositiveInt | None = Field(None, description="Optimizer steps; or give total_tokens.")
    total_tokens: PositiveInt | None = Field(None, description="Token budget; steps = tokens / (batch x seq).")
    global_batch_size: PositiveInt = Field(8, description="Sequences per optimizer step, all workers together.")
    micro_batch_size: PositiveInt | None = Field(
        None, description="Sequences per worker forward pass; null for global/workers (no accumulation)."
    )
    seq_len: PositiveInt = Field(128, description="Tokens per sequence.")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="'auto': bf16 on GPU, fp32 on CPU.")
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec, description="Optimizer and LR schedule.")
    log_every: PositiveInt = Field(1, description="Write a step event every N steps.")

    @model_validator(mode="after")
    def _steps_or_tokens(self) -> TrainSpec:
        if (self.max_steps is None) == (self.total_tokens is None):
            raise ValueError("set exactly one of max_steps and total_tokens")
        return self

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len

    @property
    def steps(self) -> int:
        if self.max_steps is not None:
            return self.max_steps
        return max(1, math.ceil(self.total_tokens / self.tokens_per_step))


class WorkersSpec(StrictModel):
    num_workers: PositiveInt = Field(2, description="Data-parallel training workers (Ray actors).")
    gpus_per_worker: float = Field(0, ge=0, le=8, description="GPUs per worker; 0 trains on CPU.")
    cpus_per_worker: float = Field(1, gt=0, le=256, description="CPUs per worker.")
    spare_workers: int = Field(
        0, ge=0, le=8, description="Warm spare workers kept alive to replace a failed one quickly."
    )
    min_workers: PositiveInt | None = Field(
        None,
        description="Fewest data-parallel workers an attempt may run on when excluded nodes or busy CPUs/GPUs "
        "leave too few places: after elastic_wait_s it starts on the largest world placed that keeps the "
        "global batch (more accumulation per worker; a sharded checkpoint reshards), and grows back to "
        "num_workers at a later checkpoint once the missing workers are placed; null means num_workers.",
    )
    elastic_wait_s: float = Field(
        60.0,
        gt=0,
        le=3600,
        description="With min_workers: how long after its first worker is up an attempt waits for the rest.",
    )

    @property
    def floor(self) -> int:
        """The fewest workers an attempt may run with."""
        return self.min_workers or self.num_workers

    @model_validator(mode="after")
    def _min_not_above(self) -> WorkersSpec:
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError(f"min_workers ({self.min_workers}) must not exceed num_workers ({self.num_workers})")
        return self


class CheckpointSpec(StrictModel):
    interval_steps: PositiveInt | Literal["auto"] = Field(
        25, description="Steps between checkpoints, or 'auto' for the Young/Daly interval."
    )
    keep_last: PositiveInt = Field(3, description="Verified checkpoints to retain.")
    async_save: bool = Field(True, description="Persist in the background after a copy to host memory.")
    mtbf_hours: float | None = Field(
        None, gt=0, description="Assumed mean time between failures for 'auto' until one is observed."
    )


class ParallelismSpec(StrictModel):
    """How the model is split across GPUs. The data-parallel degree is derived:
    GPUs / (tensor x pipeline). The pretraining job implements data parallelism (zero_stage,
    replicate, activation_checkpointing); `run submit` refuses tensor or pipeline > 1, which
    `llmctl plan` and `simulate` accept for what-if planning."""

    tensor: PositiveInt = Field(
        1,
        le=64,
        description="Tensor-parallel degree (GPUs sharing each layer). Planning only: `run submit` refuses > 1.",
    )
    pipeline: PositiveInt = Field(
        1,
        le=256,
        description="Pipeline-parallel stages (num_layers must divide). Planning only: `run submit` refuses > 1.",
    )
    zero_stage: Literal[0, 1, 2, 3] = Field(
        0,
        description="Sharding over the data-parallel group (FSDP2 in the job): 0 replicates weights, gradients "
        "and Adam state on every worker (one all-reduce per step); 1 shards Adam state and gradients, keeps "
        "the unsharded weights from forward to backward and defers the gradient reduce-scatter to the last "
        "micro-batch; 2 is 1 with a reduce-scatter per micro-batch (gradients stay sharded while "
        "accumulating); 3 also shards the weights (all-gathered per layer, freed after use). Stages 1-3 "
        "write sharded (DCP) checkpoints that resume on any number of workers.",
    )
    replicate: PositiveInt = Field(
        1,
        description="HSDP: replica groups. Stages 1-3 shard over num_workers / replicate workers and "
        "replicate across the groups (e.g. shard within a node, replicate across nodes); must divide "
        "num_workers; 1 shards over all workers. With 2 or more, a replaced worker gets its shards from "
        "its mesh position in a healthy replica group instead of every rank reloading the checkpoint.",
    )
    activation_checkpointing: Literal["none", "selective", "full"] = Field(
        "none",
        description="'none' keeps every activation; 'full' recomputes every decoder layer in backward (keeps "
        "only each layer's input); 'selective' recomputes every second decoder layer.",
    )

    @property
    def model_parallel(self) -> int:
        return self.tensor * self.pipeline

    @model_validator(mode="after")
    def _replicate_needs_sharding(self) -> ParallelismSpec:
        if self.replicate > 1 and self.zero_stage == 0:
            raise ValueError("replicate > 1 (HSDP) needs zero_stage 1, 2 or 3; zero_stage 0 replicates already")
        return self


class FaultToleranceSpec(StrictModel):
    max_restarts: int = Field(20, ge=0, description="Attempts beyond the first before the run fails.")
    backoff_initial_s: float = Field(1.0, ge=0, description="First restart delay, doubled each time.")
    backoff_max_s: float = Field(60.0, ge=0, description="Cap on the restart delay.")
    crash_loop_restarts: PositiveInt = Field(
        3, description="Restarts in a row without step progress that end the run as failed."
    )
    hang_timeout_factor: float = Field(20.0, gt=1, description="A hang is no step for this many median step times...")
    hang_timeout_min_s: float = Field(30.0, gt=0, description="...but never sooner than this...")
    hang_timeout_max_s: float = Field(900.0, gt=0, description="...and always by this hard cap.")
    loss_spike_factor: float = Field(
        3.0, gt=1, description="A loss above this multiple of the recent median is a spike."
    )
    loss_window: PositiveInt = Field(20, description="Steps in the recent-loss window.")
    max_rollbacks: int = Field(3, ge=0, description="Numerical-fault rollbacks allowed per run.")
    node_failure_threshold: PositiveInt = Field(2, description="Failures on one node after which it is excluded.")

    @model_validator(mode="after")
    def _bounds(self) -> FaultToleranceSpec:
        if self.hang_timeout_min_s > self.hang_timeout_max_s:
            raise ValueError("hang_timeout_min_s must not exceed hang_timeout_max_s")
        return self


class PowerSpec(StrictModel):
    cap_watts: float | Literal["auto"] | None = Field(
        None, description="Power limit per GPU in W; 'auto' calibrates; null leaves limits alone."
    )
    max_slowdown: float = Field(0.03, ge=0, le=0.5, description="'auto': largest slowdown accepted.")
    calibration_steps: PositiveInt = Field(10, description="'auto': steps measured per candidate limit.")

    @model_validator(mode="after")
    def _positive_cap(self) -> PowerSpec:
        if isinstance(self.cap_watts, float) and self.cap_watts <= 0:
            raise ValueError("cap_watts must be positive")
        return self


class MetricsSpec(StrictModel):
    enabled: bool = Field(True, description="Expose llmctl_train_* metrics from rank 0.")
    port: int = Field(0, ge=0, le=65535, description="Port of the metrics endpoint; 0 picks a free one.")
    host: str = Field(
        "127.0.0.1", description="Bind address of the metrics endpoint; loopback unless a scraper needs more."
    )


class FaultInjection(StrictModel):
    """A real fault the job injects into itself: for drills, chaos tests and the quickstart."""

    kind: Literal["kill_worker", "hang_worker", "nan_loss", "checkpoint_enospc", "slow_worker", "exit_driver"] = Field(
        description="kill_worker: SIGKILL the rank's process; hang_worker: SIGSTOP it; nan_loss: the loss "
        "becomes NaN; checkpoint_enospc: the checkpoint write fails with ENOSPC; slow_worker: the rank "
        "sleeps `seconds` each step; exit_driver: the job driver exits abruptly."
    )
    at_step: int = Field(ge=0, description="Global step at which the fault fires.")
    rank: int = Field(0, ge=0, description="Worker rank that suffers it.")
    attempt: PositiveInt = Field(1, description="Only in this attempt (so the resume does not repeat it).")
    seconds: float = Field(0.5, ge=0, description="slow_worker: extra seconds per step.")


class RunSpec(StrictModel):
    name: str = Field("quickstart", pattern=NAME_PATTERN, description="Run name; run ids derive from it.")
    model: ModelSpec = Field(default_factory=ModelSpec, description="Model architecture.")
    data: DataSpec = Field(default_factory=DataSpec, description="Training data.")
    train: TrainSpec = Field(default_factory=lambda: TrainSpec(max_steps=200), description="Training loop.")
    workers: WorkersSpec = Field(default_factory=WorkersSpec, description="Workers and resources.")
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec, description="Checkpoint policy.")
    fault_tolerance: FaultToleranceSpec = Field(
        default_factory=FaultToleranceSpec, description="Restart, hang and numerical-fault policy."
    )
    power: PowerSpec = Field(default_factory=PowerSpec, description="GPU power policy.")
    parallelism: ParallelismSpec = Field(
        default_factory=ParallelismSpec, description="Model and data parallelism (sizes memory per GPU)."
    )
    metrics: MetricsSpec = Field(default_factory=MetricsSpec, description="Metrics endpoint.")
    seed: int = Field(0, ge=0, description="Seed for model init, data order and dropout.")
    faults: list[FaultInjection] = Field(
        default_factory=list, description="Faults to inject on purpose (drills, tests); empty in production."
    )

    @model_validator(mode="after")
    def _batch_divides(self) -> RunSpec:
        train, n = self.train, self.workers.num_workers
        if train.global_batch_size % n:
            raise ValueError(
                f"train.global_batch_size ({train.global_batch_size}) must be divisible by workers.num_workers ({n})"
            )
        per_worker = train.global_batch_size // n
        if train.micro_batch_size is not None and per_worker % train.micro_batch_size:
            raise ValueError(
                f"train.micro_batch_size ({train.micro_batch_size}) must divide the per-worker batch ({per_worker})"
            )
        gpus = self.world_gpus
        mp = self.parallelism.model_parallel
        if mp > 1 and gpus % mp:
            raise ValueError(f"parallelism: tensor x pipeline ({mp}) must divide the GPUs of the run ({gpus})")
        if n % self.parallelism.replicate:
            raise ValueError(
                f"parallelism.replicate ({self.parallelism.replicate}) must divide workers.num_workers ({n})"
            )
        for fault in self.faults:
            if fault.rank >= n:
                raise ValueError(f"faults: rank {fault.rank} does not exist with {n} workers")
        return self

    @property
    def world_gpus(self) -> int:
        """GPUs the run trains on: workers x GPUs per worker (0 for a CPU run)."""
        return int(self.workers.num_workers * self.workers.gpus_per_worker)


def elastic_world(placed: int, run: RunSpec) -> int | None:
    """Pure: the largest world of at most `placed` workers, and at least `workers.min_workers`,
    that keeps the global batch (it divides it, the micro-batch divides each share, and the HSDP
    replicate degree divides the world); None when there is none."""
    t, w = run.train, run.workers
    for n in range(min(placed, w.num_workers), w.floor - 1, -1):
        share, rem = divmod(t.global_batch_size, n)
        if rem or (t.micro_batch_size and share % t.micro_batch_size) or n % run.parallelism.replicate:
            continue
        return n
    return None


def job_refusals(run: RunSpec) -> list[str]:
    """What the pretraining job does not implement, one line each naming the field (empty: runnable).

    `run submit` refuses such a spec; `llmctl plan` and `simulate` accept it for what-if planning."""
    out = []
    par, w = run.parallelism, run.workers
    for name in ("tensor", "pipeline"):
        if getattr(par, name) > 1:
            out.append(
                f"parallelism.{name}: {getattr(par, name)} is not implemented by the pretraining job (only 1); "
                "`llmctl plan` and `simulate` accept it for what-if planning"
            )
    if run.power.cap_watts == "auto" and par.zero_stage >= 1:
        out.append(
            "power.cap_watts: 'auto' calibrates on a whole model before the process group forms, which a "
            "sharded run (zero_stage >= 1) does not have; give a limit in W or null"
        )
    if w.floor < w.num_workers and elastic_world(w.num_workers - 1, run) is None:
        out.append(
            f"workers.min_workers: no world of {w.floor} to {w.num_workers - 1} workers keeps the global batch "
            f"({run.train.global_batch_size}: it must split evenly, in whole micro-batches, over a multiple of "
            "parallelism.replicate); raise min_workers to num_workers or change the batch"
        )
    if w.gpus_per_worker > 1:
        out.append(
            f"workers.gpus_per_worker: {w.gpus_per_worker:g} is not supported: the job runs one worker per GPU "
            "(set 1 and raise num_workers)"
        )
    return out
