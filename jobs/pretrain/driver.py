"""The job driver: starts the worker actors, runs the step loop, recovers in-attempt.

    python -m jobs.pretrain --run-dir DIR --attempt N [--max-resume-step S] [--skip-steps A:B ...]

Exit codes: 0 succeeded, 3 numerical fault, 75 fenced, anything else a crash (tier 2: the
supervisor resubmits). See README.md in this package for the recovery protocol.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controlplane import checkpoint as ckpt
from controlplane.rundir import FencedError, RunDir
from controlplane.spec import RunSpec, read_record
from jobs.pretrain.events import EXIT_CRASH, EXIT_FENCED, EXIT_NUMERICAL, EXIT_OK, EventLog
from jobs.pretrain.schedule import NumericGuard, StragglerDetector, parse_skip

DEFAULT_INTERVAL = 25
PIPELINE_DEPTH = 2
HB_STALE_S = 6.0
POLL_S = 0.5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.pretrain", description="Pretrain a Llama model on Ray.")
    p.add_argument("--run-dir", required=True, help="The run directory (spec.json inside).")
    p.add_argument("--attempt", type=int, required=True, help="Attempt number (fencing, fault drills).")
    p.add_argument("--max-resume-step", type=int, default=None, help="Resume from a checkpoint at or below S.")
    p.add_argument("--skip-steps", action="append", default=[], help="A:B: skip the batches of steps A..B-1.")
    return p.parse_args(argv)


def checkpoint_interval(run: RunSpec, run_dir: RunDir) -> int:
    """The spec's interval, or for 'auto' the supervisor's `<run_dir>/checkpoint_interval`, else 25."""
    if isinstance(run.checkpoint.interval_steps, int):
        return run.checkpoint.interval_steps
    try:
        value = int((run_dir.path / "checkpoint_interval").read_text().strip())
        return value if value > 0 else DEFAULT_INTERVAL
    except (OSError, ValueError):
        return DEFAULT_INTERVAL


class JobExit(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


@dataclass
class Slot:
    rank: int
    actor: Any
    pid: int
    node_id: str | None
    node_ip: str


@dataclass
class Pending:
    """A replacement whose recovery time is reported at the first step completed after it."""

    rank: int
    old_pid: int
    new_pid: int
    source: str
    t_fail: float
    t_detect: float
    cause: str


@dataclass
class Driver:
    run_dir: RunDir
    attempt: int
    max_resume_step: int | None = None
    skips: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        record = self.run_dir.read_spec()
        self.record = record
        self.run = read_record(RunSpec, record["run"])
        self.events = EventLog(self.run_dir, self.attempt)
        self.world = self.run.workers.num_workers
        self.total_steps = self.run.train.steps
        ft = self.run.fault_tolerance
        self.guard = NumericGuard(ft.loss_spike_factor, ft.loss_window)
        self.stragglers = StragglerDetector()
        self.slots: dict[int, Slot] = {}
        self.spares: list[tuple[Any, Any]] = []  # (actor, ready ref)
        self.step = 0
        self.tokens = 0
        self.loss: float | None = None
        self.pending: list[Pending] = []
        self.hb: dict[int, float] = {}
        self.hb_offset = 0
        self.step_times: deque[float] = deque(maxlen=50)
        self.t_start = time.time()
        self.pg_timeout_s = ft.hang_timeout_max_s + 60

    # ------------------------------------------------------------------ actors

    def _worker_cls(self):
        import ray

        from jobs.pretrain.worker import TrainWorker

        w = self.run.workers
        return ray.remote(TrainWorker).options(
            num_cpus=w.cpus_per_worker, num_gpus=w.gpus_per_worker, max_restarts=0, max_task_retries=0
        )

    def _job_cfg(self, drills: bool) -> dict[str, Any]:
        return {
            "run": self.record["run"],
            "run_id": self.record.get("run_id", self.run_dir.run_id),
            "cluster": (self.record.get("cluster") or {}).get("name", "local"),
            "dataset_dir": self.record["dataset_dir"],
            "run_dir": str(self.run_dir.path),
            "attempt": self.attempt,
            "total_steps": self.total_steps,
            "skips": self.skips,
            "drills": drills,
            "t_start": self.t_start,
        }

    def _spawn(self, drills: bool) -> tuple[Any, Any]:
        actor = self._worker_cls().remote(self._job_cfg(drills))
        return actor, actor.info.remote()

    def _form_group(self) -> dict[int, dict[str, Any]]:
        import ray

        addr, port = ray.get(self.slots[0].actor.free_port.remote(), timeout=60)
        refs = {r: s.actor.join.remote(addr, port, r, self.world, self.pg_timeout_s) for r, s in self.slots.items()}
        return {r: ray.get(ref, timeout=120) for r, ref in refs.items()}

    # ------------------------------------------------------------------ main

    def run_job(self) -> int:
        try:
            return self._run()
        except JobExit as exc:
            return exc.code
        except FencedError:
            return EXIT_FENCED
        finally:
            self._teardown()

    def _run(self) -> int:
        import ray

        self.events.check()
        root = self.run_dir.checkpoints
        ckpt.clean_staging(root)
        info, skipped = ckpt.newest_verified(root, max_step=self.max_resume_step)
        self.interval = checkpoint_interval(self.run, self.run_dir)
        started = [self._spawn(drills=True) for _ in range(self.world)]
        for _ in range(self.run.workers.spare_workers):
            self.spares.append(self._spawn(drills=False))
        for rank, (actor, ref) in enumerate(started):
            i = ray.get(ref, timeout=600)
            self.slots[rank] = Slot(rank, actor, i["pid"], i["node_id"], i["node_ip"])
        joined = self._form_group()
        if info is not None:
            ray.get([s.actor.load_checkpoint.remote(str(info.path)) for s in self.slots.values()], timeout=600)
            trainer = _read_json(info.path / "trainer_state.json")
            self.step, self.tokens, self.loss = trainer["step"], trainer["tokens"], trainer.get("loss")
            self.guard.load(trainer.get("loss_history", []))
        self.events.emit(
            "start",
            resume_step=self.step,
            world_size=self.world,
            workers=[
                {"rank": s.rank, "pid": s.pid, "node_id": s.node_id, "node_ip": s.node_ip} for s in self.slots.values()
            ],
            skipped_checkpoints=[[s, why] for s, why in skipped],
            driver_pid=os.getpid(),
            metrics_url=joined[0].get("metrics_url"),
            total_steps=self.total_steps,
            checkpoint_interval=self.interval,
            spare_workers=len(self.spares),
        )
        code = self._loop()
        return self._finish(code)

    def _finish(self, code: int) -> int:
        import ray

        status = {EXIT_OK: "succeeded", EXIT_FENCED: "fenced"}.get(code, "failed")
        if code != EXIT_FENCED:
            try:
                res = ray.get(self.slots[0].actor.shutdown.remote(), timeout=600) if 0 in self.slots else {}
            except Exception:
                res = {}
            if code == EXIT_OK and res.get("ckpt_failures"):
                self.events.emit("failure", kind="checkpoint_error", step=self.step, detail="final checkpoint failed")
                code, status = EXIT_CRASH, "failed"
            self.events.emit("end", status=status, step=self.step, loss=self.loss)
        return code

    def _teardown(self) -> None:
        try:
            import ray

            for s in self.slots.values():
                ray.kill(s.actor, no_restart=True)
            for actor, _ in self.spares:
                ray.kill(actor, no_restart=True)
        except Exception:
            pass

    # ------------------------------------------------------------------ step loop

    def _due(self, step: int) -> bool:
        return step % self.interval == 0 or step == self.total_steps

    def _drill(self, kind: str) -> Any:
        for f in self.run.faults:
            if f.kind == kind and f.attempt == self.attempt and self.step >= f.at_step:
                return f
        return None

    def _loop(self) -> int:
        ckpt_cfg = self.run.checkpoint
        inflight: deque[tuple[int, dict[int, Any]]] = deque()
        next_step = self.step + 1
        t_prev = time.perf_counter()
        while self.step < self.total_steps:
            while (
                len(inflight) < PIPELINE_DEPTH
                and next_step <= self.total_steps
                and not (inflight and self._due(inflight[-1][0]))
            ):
                inflight.append((next_step, {r: s.actor.step.remote(next_step) for r, s in self.slots.items()}))
                next_step += 1
            step_no, refs = inflight[0]
            results, dead, t_detect = self._wait(step_no, refs)
            if dead or any(not r.get("ok") for r in results.values()):
                if any(r.get("fenced") for r in results.values()):
                    raise JobExit(EXIT_FENCED)
                self._recover(dead, results, t_detect)
                inflight.clear()
                next_step = self.step + 1
                t_prev = time.perf_counter()
                continue
            inflight.popleft()
            now = time.perf_counter()
            code = self._on_step(step_no, results, now - t_prev)
            t_prev = now
            if code is not None:
                return code
            if self._drill("exit_driver"):
                os._exit(1)
            if self._due(step_no):
                import ray

                res = ray.get(
                    self.slots[0].actor.checkpoint.remote(
                        step_no, self.guard.state(), ckpt_cfg.async_save, ckpt_cfg.keep_last
                    )
                )
                if not res.get("ok"):
                    self.events.emit("checkpoint_failed", step=step_no, error=res.get("error"))
                self.interval = checkpoint_interval(self.run, self.run_dir)
        return EXIT_OK

    def _on_step(self, step_no: int, results: dict[int, dict[str, Any]], wall_s: float) -> int | None:
        r0 = results[0]
        self.step, self.tokens, self.loss = step_no, r0["tokens"], r0["loss"]
        times = [results[r]["compute_s"] for r in sorted(results)]
        step_s = max(results[r]["step_s"] for r in results)
        dt = min(wall_s, step_s * 3) if wall_s > 0 else step_s
        self.step_times.append(step_s)
        if step_no % self.run.train.log_every == 0 or step_no == self.total_steps:
            self.events.emit(
                "step",
                step=step_no,
                loss=r0["loss"],
                lr=r0["lr"],
                grad_norm=r0["grad_norm"],
                tokens=r0["tokens"],
                tokens_per_s=round(self.run.train.tokens_per_step / max(dt, 1e-9), 3),
                step_time_s=round(step_s, 6),
                rank_step_times=[round(t, 6) for t in times],
            )
        for p in self.pending:
            self.events.emit(
                "worker_replaced",
                rank=p.rank,
                old_pid=p.old_pid,
                new_pid=p.new_pid,
                recovery_s=round(time.time() - p.t_fail, 3),
                detect_s=round(p.t_detect - p.t_fail, 3),
                cause=p.cause,
                step=step_no,
                **{"from": p.source},
            )
        if self.pending:
            self.pending.clear()
            self._refill_spares()
        for rank, t, med in self.stragglers.observe(times):
            self.events.emit("straggler", rank=rank, step=step_no, step_time_s=round(t, 6), median_s=round(med, 6))
        kind = self.guard.check(r0["loss"])
        if kind:
            self.events.emit("failure", kind=kind, step=step_no, rank=None, detail=f"loss {r0['loss']}")
            return EXIT_NUMERICAL
        if r0.get("ckpt_failures", 0) >= 3:
            self.events.emit("failure", kind="checkpoint_error", step=step_no, detail="3 checkpoint writes failed")
            return EXIT_CRASH
        return None

    # ------------------------------------------------------------------ failure detection

    def _wait(self, step_no: int, refs: dict[int, Any]) -> tuple[dict[int, dict], dict[int, tuple[str, str]], float]:
        """Results of one step; ranks that died (rank -> (kind, detail)); when the failure was seen."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        results: dict[int, dict] = {}
        dead: dict[int, tuple[str, str]] = {}
        left = dict(refs)
        t0 = time.monotonic()
        hang_after = self._hang_timeout()
        while left:
            ready, _ = ray.wait(list(left.values()), num_returns=len(left), timeout=POLL_S)
            for ref in ready:
                rank = next(r for r, x in left.items() if x == ref)
                del left[rank]
                try:
                    results[rank] = ray.get(ref)
                except (RayActorError, RayTaskError) as exc:
                    dead[rank] = ("worker_died", f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            if dead or any(not r.get("ok") for r in results.values()):
                return results, dead, time.time()
            waited = time.monotonic() - t0
            if left and waited > max(2 * HB_STALE_S, 3 * self._median_step()):
                stale = self._stale_ranks(set(left))
                if stale:
                    for r in stale:
                        dead[r] = ("hang", f"no heartbeat for {HB_STALE_S}s during step {step_no}")
                        ray.kill(self.slots[r].actor, no_restart=True)
                    return results, dead, time.time()
                if waited > hang_after:
                    self.events.emit("failure", kind="hang", step=self.step, rank=None, detail=f"step {step_no} stuck")
                    raise JobExit(EXIT_CRASH)
        return results, dead, time.time()

    def _median_step(self) -> float:
        return statistics.median(self.step_times) if self.step_times else 1.0

    def _hang_timeout(self) -> float:
        ft = self.run.fault_tolerance
        return min(ft.hang_timeout_max_s, max(ft.hang_timeout_min_s, ft.hang_timeout_factor * self._median_step()))

    def _stale_ranks(self, ranks: set[int]) -> list[int]:
        for off, ev in self.run_dir.iter_events(self.hb_offset):
            self.hb_offset = off
            if ev.get("type") == "heartbeat" and ev.get("attempt") == self.attempt:
                slot = self.slots.get(ev.get("rank"))
                if slot is not None and ev.get("pid") == slot.pid:
                    self.hb[slot.rank] = ev["ts"]
        now = time.time()
        return [r for r in sorted(ranks) if now - self.hb.get(r, self.t_start) > HB_STALE_S]

    def _injected_at(self, rank: int, pid: int) -> float | None:
        when = None
        for _, ev in self.run_dir.iter_events(self.hb_offset):
            if ev.get("type") == "fault_injected" and ev.get("rank") == rank and ev.get("pid") == pid:
                when = ev["ts"]
        return when

    # ------------------------------------------------------------------ tier-1 recovery

    def _recover(self, dead: dict[int, tuple[str, str]], results: dict[int, dict], t_detect: float) -> None:
        import ray

        for rank, (kind, detail) in dead.items():
            self.events.emit("failure", kind=kind, rank=rank, step=self.step + 1, detail=detail)
        while True:
            if len(dead) >= self.world:
                self.events.emit("end", status="failed", step=self.step, loss=self.loss)
                raise JobExit(EXIT_CRASH)
            replaced: list[Pending] = []
            for rank, (kind, _) in dead.items():
                old = self.slots[rank]
                ray.kill(old.actor, no_restart=True)
                t_fail = self._injected_at(rank, old.pid) or t_detect
                actor, source = self._take_spare()
                i = ray.get(actor.info.remote(), timeout=600)
                self.slots[rank] = Slot(rank, actor, i["pid"], i["node_id"], i["node_ip"])
                replaced.append(Pending(rank, old.pid, i["pid"], source, t_fail, t_detect, kind))
            survivors = [r for r in self.slots if r not in dead]
            status, newly_dead = {}, {}
            for r in survivors:
                try:
                    status[r] = ray.get(self.slots[r].actor.status.remote(), timeout=self.pg_timeout_s)
                except Exception as exc:
                    newly_dead[r] = ("worker_died", f"{type(exc).__name__}")
            if newly_dead:
                for r, (kind, detail) in newly_dead.items():
                    self.events.emit("failure", kind=kind, rank=r, step=self.step + 1, detail=detail)
                dead = {**{p.rank: (p.cause, "") for p in replaced}, **newly_dead}
                dead = newly_dead  # the replacements above stay; only the newly dead need replacing
                continue
            break
        src = max(survivors, key=lambda r: status[r]["step"])
        self._form_group()
        steps = ray.get([s.actor.sync_state.remote(src) for s in self.slots.values()], timeout=600)
        self.step = steps[0]
        ray.get([s.actor.disarm.remote(self.step + 1) for s in self.slots.values()], timeout=60)
        for p in replaced:
            self.slots[0].actor.note_restart.remote(p.cause)
        self.pending.extend(replaced)

    def _take_spare(self) -> tuple[Any, str]:
        import ray

        while self.spares:
            actor, ref = self.spares.pop(0)
            ready, _ = ray.wait([ref], timeout=0)
            if ready:
                try:
                    ray.get(ref)
                    return actor, "spare"
                except Exception:
                    ray.kill(actor, no_restart=True)
                    continue
            self.spares.append((actor, ref))  # still starting: a new worker is no slower
            break
        actor, _ = self._spawn(drills=False)
        return actor, "new"

    def _refill_spares(self) -> None:
        while len(self.spares) < self.run.workers.spare_workers:
            self.spares.append(self._spawn(drills=False))


def _read_json(path: Path) -> dict[str, Any]:
    import json

    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run_dir = RunDir(Path(args.run_dir).resolve())
    try:
        skips = sorted(parse_skip(s) for s in args.skip_steps)
    except ValueError as exc:
        print(f"error: {exc}")
        return 2
    try:
        run_dir.check_fence(args.attempt)
    except FencedError as exc:
        print(f"fenced: {exc}")
        return EXIT_FENCED
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or "auto", log_to_driver=True)
    driver = Driver(run_dir, args.attempt, args.max_resume_step, skips)
    return driver.run_job()
