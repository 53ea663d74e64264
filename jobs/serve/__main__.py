"""`python -m jobs.serve`: deploy serving applications onto a running Ray cluster.

    python -m jobs.serve deploy --address GCS_ADDRESS --config FILE.json
    python -m jobs.serve status --address GCS_ADDRESS          {"apps": {app: status}, "gpus": N} as JSON
    python -m jobs.serve delete --address GCS_ADDRESS [--app NAME]... [--prefix SERVICE]
    python -m jobs.serve standalone --model-dir DIR --version V [--host H] [--port P] [--cluster C]
        [--engine auto|vllm|transformers] [--max-num-seqs N] [--kv-cache-gib G] [--enforce-eager]
        [--load-format dummy]   (vLLM's random weights: for benchmarks of a shape, not for serving)

`deploy` reads one JSON config:
    {"kind": "router" | "version", "app_name": ..., "route_prefix": "/svc" | null,
     "http": {"host": "127.0.0.1", "port": 8000},
     "token_env": "LLMCTL_SERVE_TOKEN",
     "deployment": {...},                      # the Router or ModelServer config
     "num_replicas": 2, "num_cpus": 0.5, "num_gpus": 0}
It starts Serve's HTTP proxy if needed, runs the application (waiting until it is healthy)
and exits; the application outlives this process. A router that listens beyond loopback is
refused without a token; the token is read from the environment and only its SHA-256
digest is handed to the router. So is the admin token ($LLMCTL_SERVE_ADMIN_TOKEN) that
guards the router's /admin routes. Exit 2: bad config; 1: the application failed to start.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from jobs.serve.openai import LOOPBACK, token_digest


def deploy(cfg: dict, address: str) -> dict:
    import ray
    from ray import serve

    from jobs.serve.app import router_app, version_app

    http = cfg.get("http") or {}
    host = http.get("host", "127.0.0.1")
    if cfg["kind"] == "router":
        token = os.environ.get(cfg.get("token_env") or "LLMCTL_SERVE_TOKEN")
        if host not in LOOPBACK and not token:
            raise ValueError(f"serving on {host} (beyond loopback) requires a token in ${cfg.get('token_env')}")
        dep = dict(cfg["deployment"])
        dep["token_sha256"] = token_digest(token) if token else None
        admin = os.environ.get("LLMCTL_SERVE_ADMIN_TOKEN")
        dep["admin_token_sha256"] = token_digest(admin) if admin else None
        app = router_app(dep)
    elif cfg["kind"] == "version":
        app = version_app(
            cfg["deployment"],
            int(cfg.get("num_replicas", 1)),
            float(cfg.get("num_cpus", 1)),
            float(cfg.get("num_gpus", 0)),
        )
    else:
        raise ValueError(f"kind: expected router or version, got {cfg['kind']!r}")
    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    serve.start(http_options={"host": host, "port": int(http.get("port", 8000))})
    serve.run(app, name=cfg["app_name"], route_prefix=cfg.get("route_prefix"), blocking=False)
    return {"app_name": cfg["app_name"], "status": "running"}


def status(address: str) -> dict:
    import ray
    from ray import serve

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    apps = serve.status().applications
    return {
        "apps": {name: str(getattr(app.status, "value", app.status)) for name, app in apps.items()},
        "gpus": ray.cluster_resources().get("GPU", 0),
    }


def delete(address: str, names: list[str], prefix: str | None) -> dict:
    import ray
    from ray import serve

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    apps = set(serve.status().applications)
    chosen = [n for n in apps if n in names or (prefix and (n == prefix or n.startswith(f"{prefix}--")))]
    for name in chosen:
        serve.delete(name, _blocking=True)
    return {"deleted": sorted(chosen)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.serve")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("deploy")
    d.add_argument("--address", required=True)
    d.add_argument("--config", required=True, type=Path)
    d.add_argument("--out", type=Path, default=None)
    st = sub.add_parser("status")
    st.add_argument("--address", required=True)
    de = sub.add_parser("delete")
    de.add_argument("--address", required=True)
    de.add_argument("--app", action="append", default=[])
    de.add_argument("--prefix", default=None)
    s = sub.add_parser("standalone")
    s.add_argument("--model-dir", required=True)
    s.add_argument("--version", required=True)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--engine", default="auto")
    s.add_argument("--cluster", default="local", help="The `cluster` label of the metrics.")
    s.add_argument("--max-num-seqs", type=int, default=None, help="Sequences vLLM batches at once.")
    s.add_argument("--kv-cache-gib", type=float, default=None, help="vLLM KV-cache size, GiB.")
    s.add_argument("--enforce-eager", action="store_true", help="Skip vLLM's graph compilation.")
    s.add_argument("--load-format", default=None, help="vLLM load format ('dummy': random weights).")
    args = p.parse_args(argv)
    if args.cmd == "standalone":
        from jobs.serve.engine import engine_options
        from jobs.serve.standalone import run_standalone

        opts = engine_options(
            {
                "max_num_seqs": args.max_num_seqs,
                "kv_cache_gib": args.kv_cache_gib,
                "enforce_eager": args.enforce_eager or None,
                "load_format": args.load_format,
            }
        )
        return run_standalone(args.model_dir, args.version, args.host, args.port, args.engine, args.cluster, opts)
    if args.cmd in ("status", "delete"):
        try:
            result = status(args.address) if args.cmd == "status" else delete(args.address, args.app, args.prefix)
        except Exception as exc:
            print(f"error: {args.cmd}: {type(exc).__name__}: {str(exc)[:1000]}", file=sys.stderr)
            return 1
        print(json.dumps(result))
        return 0
    try:
        cfg = json.loads(args.config.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        print(f"error: {args.config}: {exc}", file=sys.stderr)
        return 2
    try:
        result = deploy(cfg, args.address)
    except (ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # the application did not come up
        print(f"error: {cfg.get('app_name')}: {type(exc).__name__}: {str(exc)[:2000]}", file=sys.stderr)
        return 1
    text = json.dumps(result)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
