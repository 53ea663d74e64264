"""`python -m jobs.serve`: deploy serving applications onto a running Ray cluster.

    python -m jobs.serve deploy --address GCS_ADDRESS --config FILE.json
    python -m jobs.serve standalone --model-dir DIR --version V [--host H] [--port P]

`deploy` reads one JSON config:
    {"kind": "router" | "version", "app_name": ..., "route_prefix": "/svc" | null,
     "http": {"host": "127.0.0.1", "port": 8000},
     "token_env": "LLMCTL_SERVE_TOKEN",
     "deployment": {...},                      # the Router or ModelServer config
     "num_replicas": 2, "num_cpus": 0.5, "num_gpus": 0}
It starts Serve's HTTP proxy if needed, runs the application (waiting until it is healthy)
and exits; the application outlives this process. A router that listens beyond loopback is
refused without a token; the token is read from the environment and only its SHA-256
digest is handed to the router. Exit 2: bad config; 1: the application failed to start.
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
    result = {"app_name": cfg["app_name"], "status": "running"}
    if cfg["kind"] == "router":
        result["info"] = serve.get_app_handle(cfg["app_name"]).info.remote().result(timeout_s=30)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.serve")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("deploy")
    d.add_argument("--address", required=True)
    d.add_argument("--config", required=True, type=Path)
    d.add_argument("--out", type=Path, default=None)
    s = sub.add_parser("standalone")
    s.add_argument("--model-dir", required=True)
    s.add_argument("--version", required=True)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--engine", default="auto")
    args = p.parse_args(argv)
    if args.cmd == "standalone":
        from jobs.serve.standalone import run_standalone

        return run_standalone(args.model_dir, args.version, args.host, args.port, args.engine)
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
