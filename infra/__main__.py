"""Pulumi entry point: the program lives in the llmctl package (`controlplane.infra.program`).

The stack config names the ClusterSpec (`llmctl:clusterSpec`, relative to this directory);
sizes are plain `llmctl:*` config, secrets are `pulumi config set --secret` values.
"""

from controlplane.infra.program import main

main()
