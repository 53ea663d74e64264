"""Run the evaluation job by entrypoint and record its scores in the ledger.

The control plane never imports `jobs/`: it starts `python -m jobs.evaluate ...` as a
subprocess, which writes a JSON result file; this module reads it back and records it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import controlplane
from controlplane.errors import ConfigurationError, RetryableError, UserError
from controlplane.rollout import store
from controlplane.rollout.export import dataset_dir_of, resolve_model
from controlplane.rundir import RunDir
from controlplane.spec.rollout import DEFAULT_PROMPT_VERSION, EvalFiles

TASKS = ("heldout", "jcommonsenseqa", "jsquad")


TASK_FILES = ("jcommonsenseqa", "jcommonsenseqa_train", "jsquad", "jsquad_train")


@dataclass
class EvalRequest:
    tasks: list[str] | None = None
    jcommonsenseqa: str | None = None
    jcommonsenseqa_train: str | None = None
    jcommonsenseqa_k: int = 3
    jsquad: str | None = None
    jsquad_train: str | None = None
    jsquad_k: int = 2
    prompt_version: str = DEFAULT_PROMPT_VERSION
    seed: int = 42
    limit: int | None = None
    engine: str = "auto"
    timeout_s: float = 7200.0
    extra_env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, e: EvalFiles, tasks: list[str] | None = None) -> EvalRequest:
        """The request a rollout's gate makes from its spec's `eval` section."""
        fields = ("jcommonsenseqa_k", "jsquad_k", "prompt_version", "seed", "limit", "engine", "timeout_s")
        return cls(tasks=tasks, **{f: getattr(e, f) for f in (*TASK_FILES, *fields)})


def absolute(path: str | None) -> str | None:
    """A task file as recorded: absolute, `~` expanded (the gate compares these)."""
    return str(Path(path).expanduser().resolve()) if path else None


def same_setup(detail: dict[str, Any], req: EvalRequest, tasks: list[str]) -> bool:
    """Whether a recorded evaluation used the files, shots, prompts, seed and limit asked for."""
    if detail.get("limit") != req.limit:
        return False
    for task in ("jcommonsenseqa", "jsquad"):
        if task not in tasks:
            continue
        d = detail.get(task) or {}
        asked = (getattr(req, f"{task}_k"), req.prompt_version, req.seed, absolute(getattr(req, f"{task}_train")))
        if (d.get("k"), d.get("prompt_version"), d.get("seed"), d.get("train")) != asked:
            return False
        path = absolute(getattr(req, task))
        if path is not None and d.get("file") != path:
            return False
        if path is None and Path(d.get("file", "")).parent.name != "samples":  # the bundled sample
            return False
    return True


def project_root() -> Path:
    return Path(controlplane.__file__).resolve().parent.parent


def job_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a job subprocess: this checkout's packages first on the path."""
    env = dict(os.environ)
    root = project_root()
    if (root / "jobs").is_dir():
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def evaluate(ctx: Any, model_ref: str, run_ref: str | None = None, req: EvalRequest | None = None) -> dict[str, Any]:
    """Export if needed, run `python -m jobs.evaluate`, record and return the evaluation row."""
    req = req or EvalRequest()
    if req.tasks:
        unknown = set(req.tasks) - set(TASKS)
        if unknown:
            raise ConfigurationError(f"--tasks: unknown {', '.join(sorted(unknown))} (known: {', '.join(TASKS)})")
    exported = resolve_model(ctx, model_ref)
    run_id = run_ref or exported.run_id or None
    dataset_dir = None
    if run_id:
        row = ctx.ledger.find_run(run_id)
        run_id = row["run_id"]
        dataset_dir = dataset_dir_of(RunDir(Path(row["run_dir"])))
    argv = [sys.executable, "-m", "jobs.evaluate", "--model", str(exported.model_dir)]
    if dataset_dir is not None:
        argv += ["--dataset-dir", str(dataset_dir)]
    if req.tasks:
        argv += ["--tasks", ",".join(req.tasks)]
    for flag in TASK_FILES:
        path = absolute(getattr(req, flag))
        if path:
            if not Path(path).is_file():
                raise ConfigurationError(f"--{flag.replace('_', '-')}: {path}: no such file")
            argv += [f"--{flag.replace('_', '-')}", path]
    argv += ["--jcommonsenseqa-k", str(req.jcommonsenseqa_k), "--jsquad-k", str(req.jsquad_k)]
    argv += ["--prompt-version", req.prompt_version, "--seed", str(req.seed), "--engine", req.engine]
    if req.limit:
        argv += ["--limit", str(req.limit)]
    with tempfile.TemporaryDirectory(prefix="llmctl-eval-") as tmp:
        out = Path(tmp) / "result.json"
        try:
            proc = subprocess.run(
                [*argv, "--out", str(out)],
                env=job_env(req.extra_env),
                capture_output=True,
                text=True,
                timeout=req.timeout_s,
            )
        except subprocess.TimeoutExpired:
            raise RetryableError(
                f"evaluation of {exported.model_dir} timed out after {req.timeout_s:.0f}s "
                "(raise --timeout, or eval.timeout_s in the rollout spec)"
            ) from None
        if proc.returncode == 2:
            errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
            raise UserError(errors[-1].removeprefix("error: ") if errors else "bad input")
        if proc.returncode != 0 or not out.is_file():
            tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
            raise RetryableError(f"evaluation job failed (exit {proc.returncode}): {tail}")
        result = json.loads(out.read_text(encoding="utf-8"))
    detail = {**(result.get("detail") or {}), "notes": result.get("notes", [])}
    eval_id = store.record_evaluation(
        ctx.ledger,
        str(exported.model_dir),
        result["scores"],
        result["tasks"],
        run_id=run_id,
        step=exported.step if exported.run_id else None,
        detail=detail,
    )
    return store.get_evaluation(ctx.ledger, eval_id)
