"""The planner's formulas against hand-computed cases: the 13B reference model on 928 A100s."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from controlplane.errors import ConfigurationError, UserError
from controlplane.planning.failures import LLAMA3
from controlplane.planning.gpus import CATALOG, gpu
from controlplane.planning.plan import (
    Assumptions,
    WontFitError,
    flops_per_token,
    make_plan,
    matmul_params,
    memory_per_gpu,
    require_fit,
)
from controlplane.spec import ClusterSpec, ModelSpec, ParallelismSpec, RunSpec, load_spec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

# Llama-2-13B shape, vocabulary 32,000, untied embeddings, by hand:
#   per layer: q,k,v,o 4*5120^2 = 104,857,600; SwiGLU 3*5120*13824 = 212,336,640; 2 norms 10,240
#   40 layers: 12,688,179,200; embeddings in + out 2*32000*5120 = 327,680,000; final norm 5,120
P_13B = 40 * (4 * 5120**2 + 3 * 5120 * 13824 + 2 * 5120) + 2 * 32000 * 5120 + 5120
MATMUL_13B = P_13B - 32000 * 5120  # the input embedding is a lookup, not a matmul
PER_TOKEN_13B = 6 * MATMUL_13B + 12 * 40 * 4096 * 5120  # 6N + 12 L s h


def reference() -> tuple[ClusterSpec, RunSpec]:
    return load_spec(ClusterSpec, Path(__file__).parent / "data" / "cluster-a100-928.yaml"), load_spec(
        RunSpec, EXAMPLES / "run-13b.yaml"
    )


def plan13b(**kw):
    cluster, run = reference()
    return make_plan(cluster, run, Assumptions(**kw), per_gpu_mtbf_hours=LLAMA3.per_gpu_mtbf_hours())


def test_hand_computed_parameter_and_flop_counts():
    dims = ModelSpec(preset="13b").resolve(vocab_size=32000, max_seq_len=4096)
    assert P_13B == 13_015_864_320
    assert dims.param_count() == P_13B
    assert matmul_params(dims) == 12_852_024_320
    assert flops_per_token(dims, 4096) == PER_TOKEN_13B == 87_178_475_520
    tied = ModelSpec(preset="13b", tie_embeddings=True).resolve(vocab_size=32000)
    assert matmul_params(tied) == tied.param_count()  # the shared table is the output matmul


def test_time_energy_and_co2_for_two_trillion_tokens():
    p = plan13b()
    assert p.gpus == 928 and p.gpu_model == "A100-80GB"
    steps = math.ceil(2e12 / (928 * 4096))  # whole steps of 928 x 4096 tokens
    assert p.steps == steps == 526_166 and p.tokens == steps * 928 * 4096
    flops = steps * 928 * 4096 * PER_TOKEN_13B
    seconds = flops / (928 * 312e12 * 0.40)
    assert p.total_flops == pytest.approx(flops)
    assert p.train_seconds == pytest.approx(seconds)
    assert p.train_days == pytest.approx(17.42, abs=0.01)
    assert p.gpu_hours == pytest.approx(928 * seconds / 3600)
    gpu_kwh = 928 * seconds / 3600 * 0.400  # at the A100's 400 W TDP
    assert p.gpu_energy_mwh == pytest.approx(gpu_kwh / 1000)
    assert p.facility_energy_mwh == pytest.approx(gpu_kwh * 1.2 / 1000)
    assert p.co2e_tonnes == pytest.approx(gpu_kwh * 1.2 * 0.45 / 1000)
    assert p.peak_pflops == pytest.approx(289.536)
    # one month at 40% MFU buys about 3.44 trillion tokens
    assert p.tokens_in_window == pytest.approx(30 * 86400 * 928 * 312e12 * 0.4 / PER_TOKEN_13B)
    assert 3.43e12 < p.tokens_in_window < 3.45e12
    # 3.8M-token steps at 1.33M tokens/s
    assert p.step_seconds == pytest.approx(928 * 4096 * PER_TOKEN_13B / (928 * 312e12 * 0.4))


def test_measured_power_and_mfu_override_the_assumptions():
    p = plan13b(mfu=0.5, gpu_power_watts=300.0, tokens=1e12)
    seconds = 1e12 * PER_TOKEN_13B / (928 * 312e12 * 0.5)  # --tokens is taken as given
    assert p.train_seconds == pytest.approx(seconds)
    assert p.gpu_energy_mwh == pytest.approx(928 * seconds / 3600 * 0.3 / 1000)


def test_memory_per_gpu_zero2_by_hand():
    p = plan13b()
    gb = p.memory_gb
    # fp32 weight shard + the unsharded bf16 weights held from forward to backward
    assert gb["weights"] == pytest.approx((4 * P_13B / 928 + 2 * P_13B) / 1e9)
    assert gb["gradients"] == pytest.approx(4 * P_13B / 928 / 1e9)
    assert gb["optimizer"] == pytest.approx(8 * P_13B / 928 / 1e9)
    assert gb["activations"] == pytest.approx(34 * 4096 * 5120 * 40 / 1e9)  # (10 + 24/1) s b h per layer
    assert gb["logits"] == pytest.approx(6 * 4096 * 32000 / 1e9)
    assert p.memory_total_gb == pytest.approx(sum(gb.values()))
    assert p.fits and 57 < p.memory_total_gb < 58


def test_memory_components_follow_parallelism():
    dims = ModelSpec(preset="13b").resolve(vocab_size=32000)
    base = dict(gpus=64, seq_len=4096, micro_batch=1, micro_batches_per_step=8)
    z0 = memory_per_gpu(dims, ParallelismSpec(zero_stage=0), **base)
    assert z0["optimizer"] == pytest.approx(8 * P_13B)
    assert z0["weights"] == z0["gradients"] == pytest.approx(4 * P_13B)
    z3 = memory_per_gpu(dims, ParallelismSpec(zero_stage=3), **base)
    layer = (P_13B - 2 * 32000 * 5120) / 40
    assert z3["weights"] == pytest.approx(4 * P_13B / 64 + 2 * 2 * layer)  # + two layers unsharded
    assert z3["gradients"] == pytest.approx(4 * P_13B / 64)
    tp = memory_per_gpu(dims, ParallelismSpec(tensor=8, pipeline=2, zero_stage=0), **base)
    assert tp["weights"] == pytest.approx(4 * P_13B / 16)
    # 1F1B: the first of 2 stages holds 2 micro-batches of its 20 layers = 40 layer-activations
    assert tp["activations"] == pytest.approx(4096 * 5120 * (10 + 24 / 8) * 40)
    full = memory_per_gpu(dims, ParallelismSpec(zero_stage=0, activation_checkpointing="full"), **base)
    assert full["activations"] == pytest.approx(2 * 4096 * 5120 * 40 + 34 * 4096 * 5120)


def test_wont_fit_is_one_clear_line():
    cluster, run = reference()
    run = run.model_copy(update={"parallelism": ParallelismSpec(zero_stage=0)})  # 16 B/param replicated
    p = make_plan(cluster, run, per_gpu_mtbf_hours=LLAMA3.per_gpu_mtbf_hours())
    assert not p.fits and p.memory_total_gb > 200
    with pytest.raises(WontFitError) as exc:
        require_fit(p)
    msg = str(exc.value)
    assert "\n" not in msg and "does not fit" in msg and "A100-80GB" in msg and "zero_stage 1" in msg
    assert isinstance(exc.value, UserError)


def test_checkpoint_size_save_time_and_young_daly():
    p = plan13b()
    assert p.checkpoint_gb == pytest.approx(12 * P_13B / 1e9)
    assert p.checkpoint_persist_seconds == pytest.approx(12 * P_13B / 50e9)
    assert p.checkpoint_stall_seconds == pytest.approx(1.0 + 12 * P_13B / (928 * 10e9))
    mtbf_h = 16384 * 54 * 24 / 419 / 928
    assert p.cluster_mtbf_hours == pytest.approx(mtbf_h)
    young = math.sqrt(2 * p.checkpoint_stall_seconds * mtbf_h * 3600)
    assert p.checkpoint_interval_seconds == pytest.approx(young)
    assert p.checkpoint_interval_steps == math.ceil(young / p.step_seconds)
    # a measured stall replaces the model; a sync save blocks for the whole persist
    assert plan13b(checkpoint_stall_s=8.0).checkpoint_interval_seconds == pytest.approx(
        math.sqrt(2 * 8.0 * mtbf_h * 3600)
    )


def test_gpu_catalog_dense_not_sparse():
    a100 = gpu("A100-80GB")
    assert a100.peak_bf16_tflops == 312 and a100.sparse_bf16_tflops == 624
    assert a100.sparse_bf16_tflops * 928 / 1000 == pytest.approx(579, abs=1)  # "~580 PFLOPS" is the sparse peak
    assert plan13b().peak_pflops == pytest.approx(312 * 928 / 1000)  # the plan uses the dense one
    assert gpu("NVIDIA-A100-SXM4-80GB") is a100 and gpu("a100 80gb") is a100
    assert gpu("H100-SXM5-80GB").peak_bf16_tflops == 989
    assert gpu("H200").memory_gb == 141
    assert {"A100-40GB", "A100-80GB", "H100-80GB", "H200", "L4", "A10G"} <= set(CATALOG)
    with pytest.raises(ConfigurationError, match="not in the catalog"):
        gpu("Voodoo-5")


def test_bad_inputs_are_configuration_errors():
    cluster, run = reference()
    with pytest.raises(ConfigurationError, match="--mfu"):
        make_plan(cluster, run, Assumptions(mfu=1.5), per_gpu_mtbf_hours=1e5)
    bad = run.model_copy(update={"parallelism": ParallelismSpec(pipeline=3)})
    with pytest.raises(ConfigurationError, match="pipeline"):
        make_plan(cluster, bad, per_gpu_mtbf_hours=1e5)
    small = ClusterSpec.model_validate(
        {"node_groups": [{"name": "g", "gpu_model": "A100-80GB", "gpus_per_node": 8, "node_count": 2}]}
    )
    with pytest.raises(ConfigurationError, match="asks for 928 GPUs"):
        make_plan(small, run, per_gpu_mtbf_hours=1e5)


def test_parallelism_spec_is_strict_and_checked_against_gpus():
    with pytest.raises(ValueError, match="unknown|Extra"):
        ParallelismSpec.model_validate({"tensor": 2, "data": 4})
    with pytest.raises(ValueError, match="tensor x pipeline"):
        RunSpec.model_validate(
            {
                "workers": {"num_workers": 6, "gpus_per_worker": 1},
                "train": {"max_steps": 1, "global_batch_size": 6},
                "parallelism": {"tensor": 4},
            }
        )


def test_failure_model_is_llama3_table():
    assert LLAMA3.total == 419
    assert LLAMA3.observed_gpus == 16384 and LLAMA3.observed_days == 54
    counts = {c.name: c.count for c in LLAMA3.causes}
    assert counts["faulty GPU"] == 148 and counts["GPU HBM3 memory"] == 72 and counts["software bug"] == 54
    assert LLAMA3.cluster_mtbf_hours(928) == pytest.approx(16384 * 54 * 24 / 419 / 928)
    assert LLAMA3.cluster_mtbf_hours(928, scale=2.0) == pytest.approx(LLAMA3.cluster_mtbf_hours(928) / 2)
