"""The Ray Data engine of `data prepare`: one `map_batches` over an actor pool on the cluster.

The dataset is the list of pending units (one row, one block each); every actor loads the
tokenizer once, with one tokenizer thread (the pool is the parallelism: one actor per CPU),
and turns each row into its shards on the shared storage with `tokenize_unit`. What comes back
through Ray is only each unit's small completion record, streamed as units finish, so the
driver's memory is bounded too. Shard files are the same as the local engine's, byte for byte.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from controlplane.data.text import Unit


class TokenizeUnits:
    """Ray Data callable class: a batch of serialized units -> their completion records."""

    def __init__(self, job: dict[str, Any]) -> None:
        os.environ["RAYON_NUM_THREADS"] = "1"
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        self.job = job

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from controlplane.data.tokenize import tokenize_unit

        out = []
        for raw in batch["unit"]:
            d = json.loads(raw)
            rec = tokenize_unit(Unit.from_json(d["unit"]), self.job, d.get("force"))
            out.append(json.dumps(rec))
        return {"record": out}


@contextlib.contextmanager
def connected(address: str | None, env: dict[str, str] | None = None) -> Iterator[None]:
    """This process connected to the cluster for the block (unless it already was).

    `env` (the local cluster's token auth) is set only while connected and put back after, so
    that nothing else this process later starts or joins inherits it. A GCS on a loopback
    address is joined from that address (the local cluster's node address)."""
    import sys

    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        yield
        return
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})  # before Ray is imported: it reads its auth mode once
    import ray

    host = (address or "").rpartition(":")[0]
    kwargs = {"_node_ip_address": host} if host.startswith("127.") and host != "127.0.0.1" else {}
    try:
        try:
            ray.init(
                address=address or "auto", logging_level="ERROR", log_to_driver=False, configure_logging=False, **kwargs
            )
        except (ConnectionError, RuntimeError, ValueError) as exc:
            from controlplane.errors import UserError

            raise UserError(
                f"Ray at {address or 'auto'}: cannot connect ({str(exc).splitlines()[0][:160]}); run the prepare on "
                "a node of the cluster or give --engine local"
            ) from None
        try:
            yield
        finally:
            ray.shutdown()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def ray_engine(address: str | None, workers: int, env: dict[str, str] | None = None):
    """An engine (see prepare.Engine) that runs on the Ray cluster at `address`."""

    def run(units: list[Unit], job: dict[str, Any], forced: dict[int, str]) -> Iterator[dict[str, Any]]:
        if not units:
            return
        with connected(address, env):  # before Ray is imported here: it reads its auth mode once
            import ray
            import ray.data

            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False
            ctx.print_on_execution_start = False
            ctx.execution_options.preserve_order = False
            cpus = int(ray.cluster_resources().get("CPU", 1))
            n = max(1, min(workers or cpus, cpus, len(units)))
            rows = [{"unit": json.dumps({"unit": u.to_json(), "force": forced.get(u.index)})} for u in units]
            ds = ray.data.from_items(rows, override_num_blocks=len(rows))
            ds = ds.map_batches(
                TokenizeUnits,
                fn_constructor_kwargs={"job": job},
                batch_size=1,
                num_cpus=1,
                compute=ray.data.ActorPoolStrategy(size=n),
                batch_format="default",
            )
            for row in ds.iter_rows():
                yield json.loads(row["record"])

    return run


def choose_engine(cluster: Any, engine: str) -> tuple[str, str | None, dict[str, str] | None]:
    """'ray' with the GCS address of the local cluster when it is up (or asked for), else 'local'.

    A Ray start costs seconds, more than a small corpus takes to tokenize here, so `auto` never
    starts one: it uses the cluster when it is already up. On a remote cluster, run the prepare
    on one of its nodes (`RAY_ADDRESS` set, or `auto` finds it) so the paths are its shared storage.
    """
    from controlplane import ray_cluster
    from controlplane.errors import UserError

    if engine == "local":
        return "local", None, None
    if cluster.kind != "local":
        return "ray", os.environ.get("RAY_ADDRESS") or "auto", None
    state = ray_cluster.read_state(cluster)
    up = state is not None and ray_cluster.status(cluster).get("up")
    if not up:
        if engine == "ray":
            raise UserError("--engine ray: the local Ray cluster is not up: run `llmctl cluster up`")
        return "local", None, None
    return "ray", state.gcs_address, ray_cluster.ray_env(Path(state.token_file), only_ray=True)
