"""The job driver: starts the worker actors, runs the step loop, recovers in-attempt.

Exit codes: 0 succeeded, 3 numerical fault, 75 fenced, anything else a crash (tier 2: the
supervisor resubmits). See README.md in this package for the recovery protocol.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from controlplane import checkpoint as ckpt
from controlplane.rundir import FencedError, RunDir
from controlplane.spec import RunSpec, read_record
from jobs.pretrain.events import EXIT_CRASH, EXIT_FENCED, EXIT_NUMERICAL, EXIT_OK, EventLog, JobExit
from jobs.pretrain.placement import PLACE_TIMEOUT_S, WorkerFactory
from jobs.pretrain.recovery import PROBE_S, Pending, RecoveryMixin, Slot
from jobs.pretrain.schedule import NumericGuard, StragglerDetector
from jobs.pretrain.world import WorldMixin

DEFAULT_INTERVAL = 25
PIPELINE_DEPTH = 2
HB_STALE_S = 6.0
POLL_S = 0.5
SPARE_START_S = 120.0


def checkpoint_interval(run: RunSpec, run_dir: RunDir) -> int:
    """The spec's interval, or for 'auto' the supervisor's `<run_dir>/checkpoint_interval`, else 25."""
    if isinstance(run.checkpoint.interval_steps, int):
        return run.checkpoint.interval_steps
    return run_dir.checkpoint_interval() or DEFAULT_INTERVAL


@dataclass
class Driver(RecoveryMixin, WorldMixin):
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
        self.growers: list[tuple[Any, Any]] = []  # workers of a shrunk world still waiting for a place
        self.step = 0
        self.tokens = 0
        self.loss: float | None = None
        self.pending: list[Pending] = []
        self.ckpt_call: tuple[int, Any] | None = None  # (step, reply) of the checkpoint call in flight
        self.hb: dict[int, float] = {}
        self.hb_offset = 0
        self.step_times: deque[float] = deque(maxlen=50)
        self.t_start = time.time()
        self.pg_timeout_s = ft.hang_timeout_max_s + 60
        self.ended = False
        self.injected: dict[tuple[int, int], tuple[float, int | None]] = {}
        self.hb_step: dict[int, int] = {}
        self.metrics_url: str | None = None
        self.sharded = self.run.parallelism.zero_stage >= 1
        self.groups = 0  # process groups formed in this attempt (names their checkpoint staging)
        self.workers = WorkerFactory(
            self.run,
            {
                "run": record["run"],
                "run_id": record.get("run_id", self.run_dir.run_id),
                "cluster": (record.get("cluster") or {}).get("name", "local"),
                "cluster_spec": record.get("cluster") or {},
                "dataset_dir": record["dataset_dir"],
                "datasets": record.get("datasets"),  # a mixture: [[dir, weight], ...]
                "run_dir": str(self.run_dir.path),
                "attempt": self.attempt,
                "total_steps": self.total_steps,
                "skips": self.skips,
                "t_start": self.t_start,
            },
        )

    # ------------------------------------------------------------------ actors

    def _form_group(self, keep: bool = False) -> dict[int, dict[str, Any]]:
        """(Re-)form the process group; `keep`: sharded ranks keep their shards from memory."""
        import ray

        addr, port = ray.get(self.slots[0].actor.free_port.remote(), timeout=60)
        self.groups += 1
        tag = f"g{self.groups}"
        refs = {
            r: s.actor.join.remote(addr, port, r, self.world, self.pg_timeout_s, tag, keep)
            for r, s in self.slots.items()
        }
        return {r: ray.get(ref, timeout=120) for r, ref in refs.items()}

    # ------------------------------------------------------------------ main

    def run_job(self) -> int:
        try:
            return self._run()
        except JobExit as exc:
            if exc.code != EXIT_FENCED:
                self._end("failed")
            return exc.code
        except FencedError:
            return EXIT_FENCED
        except Exception as exc:
            with contextlib.suppress(FencedError):
                self.events.emit("failure", kind="driver_error", step=self.step, detail=f"{type(exc).__name__}: {exc}")
                self._end("failed")
            raise
        finally:
            self._teardown()

    def _end(self, status: str) -> None:
        if not self.ended:
            self.ended = True
            self.events.emit("end", status=status, step=self.step, loss=self.loss)

    def _run(self) -> int:
        import ray

        self.events.check()
        root = self.run_dir.checkpoints
        ckpt.clean_staging(root)
        info, skipped = ckpt.newest_verified(root, max_step=self.max_resume_step)
        self.interval = checkpoint_interval(self.run, self.run_dir)
        started = [self.workers.spawn(drills=True) for _ in range(self.world)]
        for _ in range(self.run.workers.spare_workers):
            self.spares.append(self.workers.spawn(drills=False))
        started = self._elastic(started)
        for rank, (actor, ref) in enumerate(started):
            try:
                i = ray.get(ref, timeout=PLACE_TIMEOUT_S)
            except ray.exceptions.GetTimeoutError:
                raise RuntimeError(
                    f"worker {rank} could not be placed within {PLACE_TIMEOUT_S:.0f} s{self.workers.exclusions()}"
                ) from None
            self.slots[rank] = Slot(rank, actor, i["pid"], i["node_id"], i["node_ip"])
        self.metrics_url = self._form_group()[0].get("metrics_url")
        if self.spares:  # warm means ready: give the spares a bounded time to finish starting
            ray.wait([ref for _, ref in self.spares], num_returns=len(self.spares), timeout=SPARE_START_S)
        if info is not None:
            self._load(info)
        self.events.emit(
            "start",
            resume_step=self.step,
            world_size=self.world,
            workers=[
                {"rank": s.rank, "pid": s.pid, "node_id": s.node_id, "node_ip": s.node_ip} for s in self.slots.values()
            ],
            skipped_checkpoints=[[s, why] for s, why in skipped],
            driver_pid=os.getpid(),
            metrics_url=self.metrics_url,
            total_steps=self.total_steps,
            checkpoint_interval=self.interval,
            spare_workers=len(self.spares),
            excluded_nodes=sorted(self.workers.exclude),
            excluded_ray_nodes=sorted(self.workers.excluded),
        )
        code = self._loop()
        return self._finish(code)

    def _finish(self, code: int) -> int:
        import ray

        status = {EXIT_OK: "succeeded", EXIT_FENCED: "fenced"}.get(code, "failed")
        if code != EXIT_FENCED:
            self._reap_checkpoint(timeout=600)
            # Every worker finishes its work and stops its telemetry (power limits restored);
            # rank 0 first waits for its background checkpoint write.
            refs = {r: s.actor.shutdown.remote() for r, s in self.slots.items()}
            for actor, _ in self.spares + self.growers:  # no state; one may never have been scheduled
                with contextlib.suppress(Exception):
                    ray.kill(actor, no_restart=True)
            self.spares.clear()
            self.growers.clear()
            res: dict[str, Any] = {}
            for r, ref in refs.items():
                try:
                    out = ray.get(ref, timeout=600 if r == 0 else 60)
                    res = out if r == 0 else res
                except Exception:
                    pass
            if code == EXIT_OK and res.get("ckpt_failures"):
                self.events.emit("failure", kind="checkpoint_error", step=self.step, detail="final checkpoint failed")
                code, status = EXIT_CRASH, "failed"
            self._end(status)
        return code

    def _teardown(self) -> None:
        try:
            import ray

            for s in self.slots.values():
                ray.kill(s.actor, no_restart=True)
            for actor, _ in self.spares + self.growers:
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
                replaced, caught_up = self._recover(dead, t_detect)
                if caught_up:  # completed by the survivors, its results lost with the dead worker
                    code = self._complete(caught_up[0], caught_up[1], 0.0)
                    if code is not None:
                        return code
                self.pending.extend(replaced)
                inflight.clear()
                next_step = self.step + 1
                t_prev = time.perf_counter()
                continue
            inflight.popleft()
            now = time.perf_counter()
            code = self._complete(step_no, results, now - t_prev)
            t_prev = now
            if code is not None:
                return code
        return EXIT_OK

    def _complete(self, step_no: int, results: dict[int, dict[str, Any]], wall_s: float) -> int | None:
        """Account a completed step; fire the driver drill; checkpoint when due."""

        code = self._on_step(step_no, results, wall_s)
        if code is not None:
            return code
        if self._drill("exit_driver"):
            os._exit(1)
        self._reap_checkpoint(timeout=0)
        if self._due(step_no):
            # Not awaited: rank 0 runs it before its next step (actor calls run in order) and the
            # next steps are queued at once; the reply is collected on a later step.
            c = self.run.checkpoint
            savers = self.slots.values() if self.sharded else [self.slots[0]]  # sharded: every rank its shards
            refs = [s.actor.checkpoint.remote(step_no, self.guard.state(), c.async_save, c.keep_last) for s in savers]
            self.ckpt_call = (step_no, refs)
            self.interval = checkpoint_interval(self.run, self.run_dir)
            if step_no < self.total_steps:
                self._grow(step_no)
        return None

    def _reap_checkpoint(self, timeout: float) -> None:
        """Collect the last checkpoint call's reply once it is there (or wait up to `timeout`)."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        if self.ckpt_call is None:
            return
        step_no, refs = self.ckpt_call
        try:
            replies = ray.get(refs, timeout=timeout)
            res = next((r for r in replies if not r.get("ok")), replies[0])
        except GetTimeoutError:
            return
        except RayActorError as exc:
            # A saver died mid-checkpoint: this checkpoint never commits (its staging dir is never
            # loaded), and the next step finds the dead actor and replaces it in-attempt.
            res = {"ok": False, "error": f"a worker died while checkpointing: {type(exc).__name__}"}
        self.ckpt_call = None
        if not res.get("ok"):
            self.events.emit("checkpoint_failed", step=step_no, error=res.get("error"))

    def _on_step(self, step_no: int, results: dict[int, dict[str, Any]], wall_s: float) -> int | None:
        r0 = results[min(results)]
        self.step, self.tokens, self.loss = step_no, r0["tokens"], r0["loss"]
        times = [results[r]["compute_s"] for r in sorted(results)]
        step_s = max(results[r]["step_s"] for r in results)
        dt = wall_s if wall_s > 0 else step_s  # pipelined: completion to completion is the throughput
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
                metrics_url=self.metrics_url,
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
            if left and waited > max(HB_STALE_S, 3 * self._median_step()):
                stale = [r for r in self._stale_ranks(set(left)) if not self._answers(r)]
                if stale:
                    for r in stale:
                        dead[r] = ("hang", f"no heartbeat for {HB_STALE_S}s during step {step_no}")
                        ray.kill(self.slots[r].actor, no_restart=True)
                    return results, dead, time.time()
                if waited > hang_after:
                    self.events.emit("failure", kind="hang", step=self.step, rank=None, detail=f"step {step_no} stuck")
                    raise JobExit(EXIT_CRASH)
        return results, dead, time.time()

    def _answers(self, rank: int) -> bool:
        """Whether the rank's process answers a probe (its control thread, not behind the step): a
        silent heartbeat of a process that answers is a slow write, not a hang."""
        import ray

        try:
            ray.get(self.slots[rank].actor.probe.remote(), timeout=PROBE_S)
            return True
        except Exception:
            return False

    def _median_step(self) -> float:
        return statistics.median(self.step_times) if self.step_times else 1.0

    def _hang_timeout(self) -> float:
        ft = self.run.fault_tolerance
        return min(ft.hang_timeout_max_s, max(ft.hang_timeout_min_s, ft.hang_timeout_factor * self._median_step()))

    def _stale_ranks(self, ranks: set[int]) -> list[int]:
        for off, ev in self.run_dir.iter_events(self.hb_offset):
            self.hb_offset = off
            if ev.get("type") == "fault_injected":
                self.injected[(ev.get("rank"), ev.get("pid"))] = (ev["ts"], ev.get("step"))
            if ev.get("type") == "heartbeat" and ev.get("attempt") == self.attempt:
                slot = self.slots.get(ev.get("rank"))
                if slot is not None and ev.get("pid") == slot.pid:
                    self.hb[slot.rank] = ev["ts"]
                    self.hb_step[slot.rank] = ev.get("step", 0)
        now = time.time()
        return [r for r in sorted(ranks) if now - self.hb.get(r, self.t_start) > HB_STALE_S]
