"""How a training rank saves its state: the worker's checkpoint methods and the writer thread.

Replicated (zero_stage 0): rank 0 saves the full state, staged to host buffers at the step
boundary, copied and persisted in a thread (the next optimizer step waits for the copy only).
Sharded (zero_stage 1-3): every rank writes its own shards with DCP (`sharded.py`); rank 0
commits them with one manifest.
"""

from __future__ import annotations

import queue
import shutil
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from controlplane import checkpoint as ckpt
from controlplane.rundir import FencedError
from jobs.pretrain.lazy import lazy

sharded = lazy("jobs.pretrain.sharded")  # imported at first use (see lazy.py)
st = lazy("jobs.pretrain.state")


class CheckpointMixin:
    """The checkpoint methods of `TrainWorker` (it owns the attributes they use)."""

    def checkpoint(self, step_no: int, loss_history: list[float], async_save: bool, keep_last: int) -> dict[str, Any]:
        """Save the state at this step boundary.

        Async: record the RNG state and return; a thread copies the rest to host buffers while
        the next forward/backward runs (the optimizer step waits for it), then persists them.
        Sync: write from the live tensors before returning.
        """
        if self.counters.step != step_no or self.broken:
            return {"ok": False, "error": f"replica at step {self.counters.step}, asked to save {step_no}"}
        t0 = time.perf_counter()
        self.flush()  # one write at a time: a still-running previous write blocks here
        self.counters.loss_history = list(loss_history)
        parts = (self.model, self.optimizer, self.scheduler, self.counters)
        enospc = self._armed("checkpoint_enospc", step_no) is not None if self.rank is not None else False
        timing: dict[str, float] = {}
        if self.sharded:
            return self._checkpoint_sharded(step_no, t0, async_save, keep_last, enospc)
        if async_save:
            self.staging.stage(*parts)
            args = (None, step_no, timing, True, keep_last, enospc)
            self.writer.submit(self._persist, *args)
            timing["call_s"] = time.perf_counter() - t0  # read by the thread only after the guard
        else:
            state = st.live_state(*parts)
            timing["call_s"] = time.perf_counter() - t0
            self._persist(state, step_no, timing, False, keep_last, enospc)
        return {"ok": True, "call_s": timing["call_s"]}

    def _persist(self, state, step, timing, async_save, keep_last, enospc) -> None:
        root = self.events.run_dir.checkpoints
        t0 = time.perf_counter()
        staging = None
        try:
            if async_save:
                state = self.staging.fill()
            self.events.check()
            staging = ckpt.staging_dir(root, step)
            c = state["counters"]
            extra = {"seed": self.run.seed, "world_size": self.world, "attempt": self.attempt}
            st.persist(state, staging, config=self.config.to_dict(), extra=extra, fail_enospc=enospc)
            self.events.check()
            meta = {"loss": c["loss"], "tokens": c["tokens"], "attempt": self.attempt}
            info = ckpt.commit(staging, root, step, meta)
            staging = None
            ckpt.prune(root, keep_last)
            persist_s = time.perf_counter() - t0
            self.last_ckpt = {"step": step, "path": str(info.path)}
            # Blocked: the save call, plus (async) the optimizer step's wait for the copy, known
            # once training passed that point; (sync) the whole write.
            held = self.staging.wait_released() if async_save else persist_s
            blocking_s = timing["call_s"] + held
            if self.metrics is not None:
                self.metrics.ckpt.set(blocking_s)
            self._emit(
                "checkpoint",
                step=step,
                path=str(info.path),
                bytes=info.bytes,
                blocking_s=round(blocking_s, 6),
                persist_s=round(persist_s, 6),
                **({"copy_wait_s": round(held, 6)} if async_save else {}),
                **{"async": async_save},
            )
            self.ckpt_failures = 0
        except FencedError:
            self.fenced = True
        except Exception as exc:
            self.ckpt_failures += 1
            self._emit("checkpoint_failed", step=step, error=f"{type(exc).__name__}: {exc}")
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)

    def _checkpoint_sharded(self, step: int, t0: float, async_save: bool, keep_last: int, enospc: bool) -> dict:
        """Every rank: copy its shards to host memory now, write and commit them in the background."""
        root = self.events.run_dir.checkpoints
        staging = ckpt.staging_dir(root, step, tag=f"a{self.attempt}{self.group_tag}")
        rng = st.rng_state()
        small = (self.scheduler.state_dict(), rng, self.counters.as_dict()) if self.rank == 0 else None
        try:
            pending = sharded.start_save(
                staging,
                self.model,
                self.optimizer,
                self.ckpt_group,
                async_save=async_save,
                fail_enospc=enospc,
                step=step,
            )
            error = None
        except sharded.WriteFailed as exc:  # a synchronous write that failed (on any rank): nothing commits
            pending, error = sharded.Pending(step, staging, None), exc
        call_s = time.perf_counter() - t0
        if async_save:
            self.writer.submit(self._commit_sharded, pending, small, call_s, async_save, keep_last, None)
        else:
            self._commit_sharded(pending, small, call_s, async_save, keep_last, error)
        return {"ok": True, "call_s": call_s}

    def _commit_sharded(self, pending, small, call_s, async_save, keep_last, error) -> None:
        root = self.events.run_dir.checkpoints
        t0 = time.perf_counter()
        c = small[2] if small else None

        def sidecar(staging: Path) -> None:
            extra = {"seed": self.run.seed, "world_size": self.world, "attempt": self.attempt}
            sharded.write_sidecar(staging, small[0], small[1], c, self.config.to_dict(), extra)

        try:
            if error is not None:
                raise OSError(f"sharded checkpoint write failed: {sharded.cause(error)}")
            self.events.check()
            meta = {"loss": c["loss"], "tokens": c["tokens"], "attempt": self.attempt} if c else {}
            info = sharded.finish_save(pending, self.ckpt_group, root, meta, sidecar if small else None)
            self.ckpt_failures = 0
            if info is None:  # not rank 0: rank 0 committed and reports
                return
            ckpt.prune(root, keep_last)
            persist_s = time.perf_counter() - t0
            self.last_ckpt = {"step": pending.step, "path": str(info.path)}
            blocking_s = call_s if async_save else call_s + persist_s
            if self.metrics is not None:
                self.metrics.ckpt.set(blocking_s)
            self._emit(
                "checkpoint",
                step=pending.step,
                path=str(info.path),
                bytes=info.bytes,
                blocking_s=round(blocking_s, 6),
                persist_s=round(persist_s, 6),
                shards=self.world,
                **{"async": async_save},
            )
        except FencedError:
            self.fenced = True
        except Exception as exc:
            self.ckpt_failures += 1
            shutil.rmtree(pending.staging, ignore_errors=True)
            if self.rank == 0:
                self._emit("checkpoint_failed", step=pending.step, error=f"{type(exc).__name__}: {exc}")

    def flush(self) -> None:
        self.staging.release()  # the caller changes no state until the write below is done
        self.writer.wait()


class Writer:
    """One long-lived background thread for checkpoint writes, one at a time (starting a thread
    per save would cost the training loop more than the save call itself)."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = threading.Event()
        self._idle.set()
        threading.Thread(target=self._loop, name="checkpoint-writer", daemon=True).start()

    def submit(self, fn: Any, *args: Any) -> None:
        if not self._idle.is_set():
            raise RuntimeError("a checkpoint write is still running")
        self._idle.clear()
        self._jobs.put((fn, args))

    def wait(self) -> None:
        self._idle.wait()

    def _loop(self) -> None:
        while True:
            fn, args = self._jobs.get()
            try:
                fn(*args)
            except BaseException:  # the write reports its own failures; the thread must live on
                traceback.print_exc()
            finally:
                self._idle.set()
