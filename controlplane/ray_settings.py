"""The environment every Ray process of an llmctl cluster runs with, local or on Kubernetes
(`ray_cluster.ray_env` adds the local token file; `infra.manifests.ray_env` the token Secret).

Nothing here imports Ray: the infra renderer and the CLI read it cheaply.
"""

from __future__ import annotations

# Ray Serve's controller kills an HTTP proxy that misses three readiness (5 s) or health (10 s)
# checks in a row. On a busy host (a head that also runs an engine or a training rank) a proxy
# can take longer than that to answer, and a killed proxy fails the deploy or drops every
# request in flight; these bounds give it 30 s a check.
SERVE_PROXY_ENV = {
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30",
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30",
}

# Token authentication on, no usage reports, the proxies' bounds.
RAY_PROCESS_ENV = {"RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0", **SERVE_PROXY_ENV}

# The local cluster (`cluster up`: every node on this machine, which also trains and serves):
# Ray's GCS marks a raylet dead after 5 missed 3 s health checks, and on a host whose cores are
# all busy training a raylet can miss that many without being dead; a false death kills every
# worker on it. Ten (about 30 s) is what a loaded workstation needs; a killed raylet is still
# found dead within that, and Kubernetes nodes keep Ray's defaults.
#
# A raylet also starts Python workers ahead of a driver's first task, with no runtime env. Every
# llmctl job and Serve app runs with one (its PYTHONPATH), so none of their actors can use those
# workers: each is a Python process importing Ray (about 0.7 CPU-s) for nothing, two when a
# driver connects. The Ray Data engine's tasks (no runtime env) get theirs when they ask.
LOCAL_CLUSTER_ENV = {
    "RAY_health_check_failure_threshold": "10",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_prestart_worker_first_driver": "0",
}
