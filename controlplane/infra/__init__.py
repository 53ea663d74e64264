"""What `infra/` declares on Kubernetes, as an importable package.

- `manifests`, `addons`: pure functions from a `ClusterSpec` to Kubernetes objects and Helm values (no Pulumi).
- `settings`: the stack's sizes (`InfraSettings`) and secrets (`InfraSecrets`).
- `components`, `eks`: `pulumi.ComponentResource`s that declare those objects.
- `program`: the Pulumi program (`build`, and `main` for `infra/__main__.py`).
- `render`: run the program under Pulumi's mocks and write what it registers as YAML.
- `automation`: preview / up / destroy / outputs through the Pulumi Automation API.

Only `manifests`, `addons` and `settings` are import-light; the rest import Pulumi, so the CLI imports
them inside commands.
"""
