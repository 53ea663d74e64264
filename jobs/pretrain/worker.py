"""One data-parallel training rank, run as a Ray actor.

The actor owns its part of the model (all of it with zero_stage 0, its FSDP2 shards with 1-3),
its optimizer and scheduler, a memory-mapped view of the token shards and a heartbeat thread.
The driver calls `step(n)` once per global step (pipelined: the next call is queued before the
previous one returns). Replicated, gradients and the loss travel in ONE flat all-reduce;
sharded, FSDP2 reduce-scatters the gradients (see `parallelize.py`). A collective that fails
because a peer died marks the rank `broken` (it drops the half-done gradient) until the driver
re-forms the process group with `join()`. Then a replicated run realigns every replica from a
survivor's memory (`sync_state()`); a sharded run rebuilds its model on the new mesh and every
rank reloads the newest verified checkpoint (`load_checkpoint()`).
Rank 0 serves the metrics. Checkpoints: replicated, rank 0 writes the full state (stage to host
buffers at the step boundary, copy and persist in a thread; the next optimizer step waits for
the copy only); sharded, every rank writes its own shards (`sharded.py`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import ray

from controlplane.rundir import FencedError, RunDir
from controlplane.spec import RunSpec, read_record
from jobs.pretrain.dataset import dataset_meta, open_train_data
from jobs.pretrain.events import EventLog
from jobs.pretrain.lazy import lazy
from jobs.pretrain.logs import capture as capture_output
from jobs.pretrain.saving import CheckpointMixin, Writer
from jobs.pretrain.schedule import advance_cursor, skip_forward

# Imported in the worker's process at first use: the driver defines this class without them.
torch = lazy("torch")
dist = lazy("torch.distributed")
F = lazy("torch.nn.functional")
pz = lazy("jobs.pretrain.parallelize")
sharded = lazy("jobs.pretrain.sharded")  # DCP: only a sharded run's ranks import it
st = lazy("jobs.pretrain.state")

HEARTBEAT_S = 1.0
CONTROL = "control"  # Ray concurrency group of the calls answered while a step blocks the actor


class TrainWorker(CheckpointMixin):
    def __init__(self, job: dict[str, Any]) -> None:
        capture_output(job["run_dir"], job["attempt"], f"worker-{os.getpid()}")  # ranks: in the start event
        self.job = job
        self.run = read_record(RunSpec, job["run"])
        self.attempt: int = job["attempt"]
        self.events = EventLog(RunDir(Path(job["run_dir"])), self.attempt)
        threads = max(1, int(self.run.workers.cpus_per_worker))
        torch.set_num_threads(threads)
        use_gpu = self.run.workers.gpus_per_worker > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
        precision = self.run.train.precision
        self.autocast = use_gpu and precision in ("auto", "bf16") or (not use_gpu and precision == "bf16")
        self.backend = "nccl" if use_gpu else "gloo"

        meta = dataset_meta(job)
        train = self.run.train
        self.skips: list[tuple[int, int]] = [tuple(s) for s in job.get("skips", [])]
        self.data = open_train_data(job, train.seq_len, train.global_batch_size, self.run.seed)
        dims = self.run.model.resolve(vocab_size=meta["vocab_size"], max_seq_len=train.seq_len)
        self.config = st.llama_config(dims, meta.get("bos_id"), meta.get("eos_id"))
        self.total_steps: int = job["total_steps"]
        self.par = self.run.parallelism
        self.sharded = self.par.zero_stage >= 1
        self.ckpt_group: Any = None
        self.pending_save: sharded.Pending | None = None
        self.group_tag = ""
        self.metric_loaded = False
        self.counters = st.Counters(cursor=skip_forward(0, self.skips))  # the heartbeat reads it from the start
        if not self.sharded:  # a sharded model is built on its mesh, in join()
            self._build(None)
        self.rank: int | None = None
        self.in_step: tuple[int, float] | None = None
        self.world = 0
        self.broken = False
        self.fenced = False
        self.drills = list(enumerate(self.run.faults)) if job.get("drills", True) else []
        self.drills = [(i, f) for i, f in self.drills if f.attempt == self.attempt]
        self.fired: set[int] = set()
        self.metrics = None
        self.writer = Writer()
        self.staging = st.HostStaging()
        self.ckpt_failures = 0
        self.last_ckpt: dict[str, Any] | None = None
        self.last_result: dict[str, Any] | None = None
        self.t_attempt = float(job.get("t_start", time.time()))
        self.productive_s = 0.0
        self.t_last_step: float | None = None
        self.node_id = _node_id()
        self.telemetry = self._start_telemetry()
        self._stop = threading.Event()
        self._hb = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        self._hb.start()

    def _build(self, mesh: Any) -> None:
        """The model (on the meta device, then this rank's part), optimizer, scheduler, counters."""
        self.mesh = mesh
        self.model = pz.build(self.config, self.run.seed, self.device, self.par, mesh, self.run.train.precision)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = st.build_optimizer(self.model, self.run, self.total_steps)
        self.counters = st.Counters(cursor=skip_forward(0, self.skips))

    def _start_telemetry(self) -> Any:
        """GPU claim, power policy and energy meter (no-ops on CPU); never fails the job."""
        try:
            from controlplane.spec import ClusterSpec
            from controlplane.telemetry.worker import start_worker_telemetry

            cluster = read_record(ClusterSpec, self.job.get("cluster_spec") or {})
            return start_worker_telemetry(
                self.run.power,
                self.job["run_dir"],
                self.attempt,
                cluster.storage_root(),
                measure=self._calibration_steps,
            )
        except Exception as exc:
            print(f"telemetry not started: {type(exc).__name__}: {exc}")
            return None

    def _calibration_steps(self) -> tuple[float, float]:
        """Power calibration: forward+backward on a fixed batch, no optimizer step (state unchanged)."""
        per_worker = self.data.global_batch // self.run.workers.num_workers
        batch = torch.from_numpy(self.data.batch(0, 0, 1)[:per_worker]).to(self.device)
        t0 = time.perf_counter()
        for _ in range(self.run.power.calibration_steps):
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                logits = self.model(input_ids=batch[:, :-1]).logits
            F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)).backward()
            self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return float(
            self.run.power.calibration_steps * batch.shape[0] * self.run.train.seq_len
        ), time.perf_counter() - t0

    # ------------------------------------------------------------------ control

    def info(self) -> dict[str, Any]:
        import ray

        return {"pid": os.getpid(), "node_id": self.node_id, "node_ip": ray.util.get_node_ip_address()}

    def free_port(self) -> tuple[str, int]:
        import ray

        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((ip, 0))
            return ip, s.getsockname()[1]

    @ray.method(concurrency_group=CONTROL)
    def probe(self) -> dict[str, Any]:
        """Answered on a thread of its own while a step (a stuck collective) holds the actor: a rank
        that does not answer is stopped or wedged in the process, not waiting on a peer."""
        step, since = self.in_step or (None, None)
        return {"pid": os.getpid(), "rank": self.rank, "step": self.counters.step, "in_step": step, "since": since}

    @ray.method(concurrency_group=CONTROL)
    def abort_group(self) -> bool:
        """On NCCL, from the control thread while a step may hold the actor: abort this rank's
        communicators, so that a collective a dead peer left pending raises in the step (which
        then answers "process group broken") instead of waiting out the group's timeout. gloo
        needs none: the dead peer's closed sockets fail the collective. True if it aborted."""
        if self.backend != "nccl" or not dist.is_initialized():
            return False
        with contextlib.suppress(Exception):
            dist.distributed_c10d._abort_process_group()
        self.broken = True
        return True

    def status(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "step": self.counters.step,
            "broken": self.broken,
            "pid": os.getpid(),
            "last": self.last_result,
        }

    def join(
        self, addr: str, port: int, rank: int, world: int, timeout_s: float, tag: str = "", keep: bool = False
    ) -> dict[str, Any]:
        """(Re-)form the process group: a fresh TCP store at addr:port, this replica as `rank`.

        Sharded: the model is (re)built on the new mesh from the seed; the driver then has every
        rank load the newest verified checkpoint, or (`keep`, HSDP) each rank keeps its own shards
        from memory and the replacements get theirs from a replica (`sync_replica`). `tag` names
        this group's checkpoint staging.
        """
        built = self.sharded and keep and self.rank is not None and hasattr(self, "model")
        snap = sharded.local_state(self.model, self.optimizer, self.scheduler, self.counters) if built else None
        self._drop_group()
        if self.backend == "nccl":
            # a collective that times out aborts its communicators and raises in the step (a
            # broken group the driver re-forms), rather than the watchdog killing the process
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
        if world > 1 or self.sharded:
            dist.init_process_group(
                self.backend,
                init_method=f"tcp://{addr}:{port}",
                rank=rank,
                world_size=world,
                timeout=timedelta(seconds=timeout_s),
            )
        self.rank, self.world, self.broken, self.group_tag = rank, world, False, tag
        if self.sharded:
            # A write still in flight belongs to the old group: abandoned (never committed).
            self.writer, self.pending_save = Writer(), None
            self.ckpt_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
            self._build(pz.data_mesh(world, self.par, self.device.type))
            if snap is not None:
                self.counters = sharded.restore_local(snap, self.model, self.optimizer, self.scheduler)
        self.optimizer.zero_grad(set_to_none=True)
        self._emit("heartbeat", rank=rank, step=self.counters.step, pid=os.getpid(), node_id=self.node_id)
        url = None
        if rank == 0 and self.run.metrics.enabled:
            if self.metrics is None:
                from jobs.pretrain.metrics import TrainMetrics

                m = self.run.metrics
                self.metrics = TrainMetrics(self.job["run_id"], self.job["cluster"], m.host, m.port)
            url = self.metrics.url
        return {"rank": rank, "metrics_url": url, "pid": os.getpid()}

    def load_checkpoint(self, path: str) -> int:
        if self.sharded:  # also in place after a failure: the token metric counts a reload once
            self.counters = sharded.load(Path(path), self.model, self.optimizer, self.scheduler)
            self.counters.cursor = skip_forward(self.counters.cursor, self.skips)
            if self.metrics is not None and not self.metric_loaded:
                self.metrics.tokens.inc(self.counters.tokens)
            self.metric_loaded = True
            return self.counters.step
        state = st.load(Path(path))
        self.staging.guard()
        self.counters = st.restore(state, self.model, self.optimizer, self.scheduler)
        self.counters.cursor = skip_forward(self.counters.cursor, self.skips)
        if self.metrics is not None:
            self.metrics.tokens.inc(self.counters.tokens)
        return self.counters.step

    def sync_state(self, src: int) -> int:
        """Broadcast the whole replica state from rank `src`'s memory to every other rank."""
        if self.world > 1:
            mine = st.capture(self.model, self.optimizer, self.scheduler, self.counters) if self.rank == src else None
            data = st.broadcast_bytes(st.to_bytes(mine) if mine else None, src, self._wire())
            if self.rank != src:
                state = st.from_bytes(data)
                self.staging.guard()
                old_tokens = self.counters.tokens
                self.counters = st.restore(state, self.model, self.optimizer, self.scheduler)
                if self.metrics is not None:
                    self.metrics.tokens.inc(max(0, self.counters.tokens - old_tokens))
        return self.counters.step

    def sync_replica(self, sources: list[int]) -> int:
        """HSDP tier 1: a rank whose shards died with it gets them from a healthy rank at the same
        mesh position in another replica group (a broadcast over the mesh's replicate dimension);
        groups whose members all survived send nothing."""
        group = self.mesh.get_group("replicate")
        members = dist.get_process_group_ranks(group)
        if all(m in sources for m in members):
            return self.counters.step
        src = next(m for m in members if m in sources)
        mine = (
            sharded.local_state(self.model, self.optimizer, self.scheduler, self.counters) if self.rank == src else None
        )
        data = st.broadcast_bytes(st.to_bytes(mine) if mine else None, src, self._wire(), group)
        if self.rank != src:
            self.counters = sharded.restore_local(st.from_bytes(data), self.model, self.optimizer, self.scheduler)
            self.counters.cursor = skip_forward(self.counters.cursor, self.skips)
        return self.counters.step

    def _wire(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def disarm(self, through_step: int) -> None:
        """Drills due at or before `through_step` had their chance in this attempt."""
        for i, f in self.drills:
            if f.at_step <= through_step and f.kind != "slow_worker":
                self.fired.add(i)

    def note_restart(self, cause: str) -> None:
        if self.metrics is not None:
            self.metrics.restart(cause)

    def shutdown(self) -> dict[str, Any]:
        """Finish any background checkpoint write; stop heartbeats and the metrics server."""
        self.flush()
        self._stop.set()
        if self.telemetry is not None:
            self.telemetry.stop()
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        self._drop_group()
        return {"ckpt_failures": self.ckpt_failures, "last_checkpoint": self.last_ckpt}

    def _drop_group(self) -> None:
        """Tear the process group down, also one a dead peer broke. NCCL's communicators are aborted
        first: destroying one with a collective still pending would wait on the dead peer."""
        if not dist.is_initialized():
            return
        if self.backend == "nccl":
            with contextlib.suppress(Exception):
                dist.distributed_c10d._abort_process_group()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()

    # ------------------------------------------------------------------ training

    def _armed(self, kind: str, step: int) -> Any:
        for i, f in self.drills:
            if f.kind == kind and f.rank == self.rank and step >= f.at_step and i not in self.fired:
                if kind != "slow_worker":
                    self.fired.add(i)
                return f
        return None

    def _fire_process_drills(self, step: int) -> None:
        for kind, sig in (("kill_worker", signal.SIGKILL), ("hang_worker", signal.SIGSTOP)):
            if self._armed(kind, step):
                self._emit("fault_injected", kind=kind, rank=self.rank, step=step, pid=os.getpid())
                os.kill(os.getpid(), sig)

    def step(self, step_no: int) -> dict[str, Any]:
        self.in_step = (step_no, time.time())
        try:
            return self._step(step_no)
        finally:
            self.in_step = None

    def _step(self, step_no: int) -> dict[str, Any]:
        if self.broken:
            return {"ok": False, "rank": self.rank, "error": "process group broken"}
        if step_no != self.counters.step + 1:
            return {"ok": False, "rank": self.rank, "error": f"asked for step {step_no} after {self.counters.step}"}
        self._fire_process_drills(step_no)
        t0 = time.perf_counter()
        per_rank = self.data.global_batch // self.world
        micro = self.run.train.micro_batch_size or per_rank
        n_micro = per_rank // micro
        batch = torch.from_numpy(self.data.batch(self.counters.cursor, self.rank, self.world))
        batch = batch.to(self.device, non_blocking=True)
        nan = self._armed("nan_loss", step_no) is not None
        local = torch.zeros((), device=self.device)
        autocast = self.autocast and not (self.sharded and self.device.type == "cuda")  # FSDP2 casts itself
        try:
            for i in range(n_micro):
                chunk = batch[i * micro : (i + 1) * micro]
                pz.set_gradient_sync(self.model, self.par.zero_stage, last_micro=i == n_micro - 1)
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=autocast):
                    logits = self.model(input_ids=chunk[:, :-1]).logits
                loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1))
                if nan:
                    loss = loss * float("nan")
                (loss / n_micro).backward()
                local += loss.detach() / n_micro
            slow = self._armed("slow_worker", step_no)
            if slow is not None:
                time.sleep(slow.seconds)
            compute_s = time.perf_counter() - t0
            if self.sharded:  # FSDP2 reduce-scattered the gradients in backward
                loss_value = float(pz.average(local, self.world).item())
                grad_norm = pz.clip_grad_norm(self.params, self.run.train.schedule.grad_clip)
        except RuntimeError as exc:  # a peer died inside a collective (gloo/nccl raise RuntimeError kinds)
            if self.world <= 1:
                raise
            self.broken = True
            self.optimizer.zero_grad(set_to_none=True)
            return {"ok": False, "rank": self.rank, "error": f"collective failed: {str(exc)[:200]}"}
        if not self.sharded and self.world > 1:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
            flat = torch.cat([g.reshape(-1) for g in grads] + [local.reshape(1).to(grads[0].dtype)])
            try:
                dist.all_reduce(flat)
            except Exception as exc:  # a peer died or the group was torn down
                self.broken = True
                self.optimizer.zero_grad(set_to_none=True)
                return {"ok": False, "rank": self.rank, "error": f"collective failed: {str(exc)[:200]}"}
            flat /= self.world
            offset = 0
            for g in grads:
                n = g.numel()
                g.copy_(flat[offset : offset + n].view_as(g))
                offset += n
            for p, g in zip(self.params, grads, strict=True):
                p.grad = g
            loss_value = float(flat[-1].item())
        elif not self.sharded:
            loss_value = float(local.item())
        if not self.sharded:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.run.train.schedule.grad_clip))
        lr = self.scheduler.get_last_lr()[0]
        self.staging.guard()  # a checkpoint's copy of the weights must be complete before they change
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        c = self.counters
        c.step, c.loss = step_no, loss_value
        c.tokens += self.run.train.tokens_per_step
        c.cursor = advance_cursor(c.cursor, self.skips)
        now = time.perf_counter()
        step_s = now - t0
        self.productive_s += step_s
        if self.metrics is not None:
            self._observe(step_no, loss_value, now, step_s)
        self.t_last_step = now
        self.last_result = {
            "ok": True,
            "rank": self.rank,
            "step": step_no,
            "loss": loss_value,
            "grad_norm": grad_norm,
            "lr": lr,
            "compute_s": compute_s,
            "step_s": step_s,
            "tokens": c.tokens,
            "ckpt_failures": self.ckpt_failures,
            "fenced": self.fenced,
        }
        return self.last_result

    def _observe(self, step: int, loss: float, now: float, step_s: float) -> None:
        from jobs.pretrain.metrics import peak_flops

        dt = now - self.t_last_step if self.t_last_step else step_s
        tps = self.run.train.tokens_per_step / max(dt, 1e-9)
        goodput = min(1.0, self.productive_s / max(1e-9, time.time() - self.t_attempt))
        peak = peak_flops(torch.cuda.get_device_name(0)) if self.device.type == "cuda" else None
        mfu = 6 * self.param_count * tps / (peak * max(1, self.world)) if peak else None
        if not np.isfinite(loss):
            loss = float("nan")
        self.metrics.observe(step, loss, self.run.train.tokens_per_step, tps, goodput, mfu)

    @property
    def param_count(self) -> int:
        return sum(p.numel() for p in self.params)

    # ------------------------------------------------------------------ heartbeats

    def _emit(self, type_: str, **fields: Any) -> None:
        try:
            self.events.emit(type_, **fields)
        except FencedError:
            self.fenced = True

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if self.rank is None:
                continue  # a warm spare has no rank yet
            try:
                self._emit("heartbeat", rank=self.rank, step=self.counters.step, pid=os.getpid(), node_id=self.node_id)
            except Exception:  # a silent rank is taken for a hung one: the thread must outlive any error
                traceback.print_exc()
            if self.fenced:
                return


def _node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:
        return None
