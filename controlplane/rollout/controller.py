"""The rollout controller: gate, deploy, canary steps, promote or roll back. Does the I/O.

    pending -> gating --(scores miss a minimum)--> rejected        (never receives traffic)
                 |
                 v
             deploying --(not ready)--> failed                    (stable untouched)
                 |  (no stable version yet: straight to 100%) --> promoted
                 v
              canary: for each traffic step, analyze() the window
                 |-- rollback / operator abort --> rolled_back / aborted (stable gets 100%)
                 `-- last step passed / operator promote --> promoted (old stable removed)

Every decision (gate, each step, the end) is written to the ledger with its figures. The
decisions themselves come from the pure functions in `analysis.py`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from controlplane.rollout import store
from controlplane.rollout.analysis import Action, Decision, Thresholds, Window, analyze, gate, required_tasks
from controlplane.rollout.backend import DeployError, ServingBackend
from controlplane.rollout.engine_check import check_model_dir
from controlplane.rollout.evaluation import EvalRequest, evaluate, same_setup
from controlplane.rollout.export import resolve_model
from controlplane.spec import RolloutSpec


class RolloutController:
    def __init__(
        self,
        ctx: Any,
        backend: ServingBackend,
        *,
        poll_s: float = 0.5,
        on_decision: Callable[[str, Decision], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.ctx = ctx
        self.backend = backend
        self.poll_s = poll_s
        self.on_decision = on_decision or (lambda rid, d: None)
        self.clock = clock
        self.sleep = sleep

    @property
    def ledger(self):
        return self.ctx.ledger

    def _decide(self, rid: str, d: Decision, step: int | None = None, pct: int | None = None) -> None:
        store.record_decision(self.ledger, rid, str(d.action), d.reason, d.figures, step, pct)
        self.on_decision(rid, d)

    # ------------------------------------------------------------ entry point

    def start(self, spec: RolloutSpec) -> dict[str, Any]:
        """Run one rollout to its end; returns the final ledger row."""
        svc = store.get_service(self.ledger, spec.name)
        stable = svc["stable_version"] if svc else None
        if stable and not self.backend.has_version(spec, stable):
            stable = None  # recorded but no longer deployed: nothing to compare with
        rid = store.create_rollout(self.ledger, spec.name, self.backend.kind, spec.model_dump(mode="json"), stable)
        try:
            self._run(rid, spec, stable)
        except BaseException as exc:
            row = store.get_rollout(self.ledger, rid)
            if row["state"] not in store.TERMINAL:
                reason = f"{type(exc).__name__}: {exc}"[:500]
                self._safe_rollback(rid, spec, stable, row.get("candidate_version"), reason)
                state = store.ABORTED if isinstance(exc, KeyboardInterrupt) else store.FAILED
                store.update_rollout(self.ledger, rid, state=state, reason=reason)
            raise
        return store.get_rollout(self.ledger, rid)

    def _run(self, rid: str, spec: RolloutSpec, stable: str | None) -> None:
        ledger = self.ledger
        store.update_rollout(ledger, rid, state=store.GATING)
        exported = resolve_model(self.ctx, spec.model)
        check_model_dir(exported.model_dir, spec.serve.engine)  # one line, exit 2: before the gate and any replica
        cand = exported.version
        store.update_rollout(ledger, rid, candidate_version=cand, candidate_model=str(exported.model_dir))
        if cand == stable:
            self._end(rid, store.REJECTED, Decision(Action.REJECT, f"{cand} is already the stable version"))
            return

        minimums = spec.min_eval.model_dump()
        tasks = required_tasks(minimums)
        if tasks:
            row = self._evaluation(spec, exported, tasks)
            store.update_rollout(ledger, rid, evaluation_id=row["id"])
            result = gate(minimums, row["scores"])
            figures = {**result.figures, "evaluation_id": row["id"]}
            if not result.passed:
                self._end(rid, store.REJECTED, Decision(Action.REJECT, "; ".join(result.failures), figures))
                return
            self._decide(rid, Decision(Action.ADVANCE, "evaluation gate passed", figures))

        store.update_rollout(ledger, rid, state=store.DEPLOYING)
        info = self.backend.ensure_service(spec, stable, rid)
        try:
            self.backend.deploy_version(spec, cand, str(exported.model_dir), spec.replicas, spec.drill)
        except DeployError as exc:
            self._end(rid, store.FAILED, Decision(Action.ROLLBACK, f"candidate did not become ready: {exc}"))
            return
        if stable is None:
            self.backend.set_traffic(spec, {cand: 1.0}, rid)
            store.update_rollout(ledger, rid, traffic_percent=100)
            store.set_service(ledger, spec.name, self.backend.kind, cand, str(exported.model_dir), info)
            self._end(rid, store.PROMOTED, Decision(Action.PROMOTE, "first version of the service: no canary"))
            return

        store.update_rollout(ledger, rid, state=store.CANARY)
        th = Thresholds.of(spec)
        steps = spec.traffic_steps
        for i, pct in enumerate(steps):
            since = self.backend.set_traffic(spec, {stable: 1 - pct / 100, cand: pct / 100}, rid)
            store.update_rollout(ledger, rid, traffic_percent=pct)
            t0 = self.clock()
            while True:
                self.sleep(self.poll_s)
                req = store.get_rollout(ledger, rid).get("request")
                if req == store.REQUEST_ABORT:
                    d = Decision(Action.ROLLBACK, "aborted by operator")
                    self._rollback(rid, spec, stable, cand, d, i, pct, state=store.ABORTED)
                    return
                if req == store.REQUEST_PROMOTE:
                    self._promote(
                        rid,
                        spec,
                        stable,
                        cand,
                        exported,
                        info,
                        Decision(Action.PROMOTE, "promoted by operator"),
                        i,
                        pct,
                    )
                    return
                cw = Window.of(self.backend.window(spec, cand, since))
                sw = Window.of(self.backend.window(spec, stable, since))
                d = analyze(th, cw, sw, self.clock() - t0, i, len(steps))
                if d.action != Action.WAIT:
                    break
            if d.action == Action.ROLLBACK:
                self._rollback(rid, spec, stable, cand, d, i, pct)
                return
            if d.action == Action.PROMOTE:
                self._promote(rid, spec, stable, cand, exported, info, d, i, pct)
                return
            self._decide(rid, d, i, pct)

    # ------------------------------------------------------------ steps

    def _evaluation(self, spec: RolloutSpec, exported: Any, tasks: list[str]) -> dict[str, Any]:
        """The newest evaluation of this model that has every needed score, or a fresh one."""
        needed = {
            "heldout": "heldout_perplexity",
            "jcommonsenseqa": "jcommonsenseqa_accuracy",
            "jsquad": "jsquad_exact_match",
        }
        req = EvalRequest.of(spec.eval, tasks)
        for row in store.evaluations(self.ledger, str(exported.model_dir), limit=20):
            if all(needed[t] in (row.get("scores") or {}) for t in tasks) and same_setup(
                row.get("detail") or {}, req, tasks
            ):
                return row
        return evaluate(self.ctx, str(exported.model_dir), exported.run_id or None, req)

    def _end(self, rid: str, state: str, d: Decision, step: int | None = None, pct: int | None = None) -> None:
        self._decide(rid, d, step, pct)
        store.update_rollout(self.ledger, rid, state=state, reason=d.reason)

    def _rollback(self, rid, spec, stable, cand, d: Decision, step, pct, state: str = store.ROLLED_BACK) -> None:
        self.backend.set_traffic(spec, {stable: 1.0}, rid)
        store.update_rollout(self.ledger, rid, traffic_percent=0)
        self.backend.wait_idle(spec, cand, spec.drain_s)
        self.backend.remove_version(spec, cand)
        self._end(rid, state, d, step, pct)

    def _promote(self, rid, spec, stable, cand, exported, info, d: Decision, step, pct) -> None:
        self.backend.set_traffic(spec, {cand: 1.0}, rid)
        store.update_rollout(self.ledger, rid, traffic_percent=100)
        store.set_service(self.ledger, spec.name, self.backend.kind, cand, str(exported.model_dir), info)
        self.backend.wait_idle(spec, stable, spec.drain_s)
        self.backend.remove_version(spec, stable)
        self._end(rid, store.PROMOTED, d, step, pct)

    def _safe_rollback(self, rid: str, spec: RolloutSpec, stable: str | None, cand: str | None, reason: str) -> None:
        """Best effort after an unexpected error: stable keeps (or regains) all traffic."""
        try:
            if stable:
                self.backend.set_traffic(spec, {stable: 1.0}, rid)
            if cand and cand != stable and stable:
                self.backend.remove_version(spec, cand)
            store.record_decision(self.ledger, rid, str(Action.ROLLBACK), reason)
        except Exception:  # the backend itself is down: the ledger row still says what happened
            pass
