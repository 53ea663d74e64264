"""On-call runbooks: one Markdown file per alert rule, found beside the package.

The runbooks live in the project's `runbooks/` directory and the rules in
`dashboards/alerts.yaml`; the package carries both (as `controlplane/observability/runbooks/`
and `alerts.yaml`), so an installed `llmctl runbook show` finds them without a checkout.
Import-light on purpose: no Ray, no torch.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from controlplane.errors import CorruptFileError, NotFoundError

_HERE = Path(__file__).resolve().parent
_REPO = _HERE.parent.parent

# `llmctl ...` commands inside fenced code blocks (```) or inline code (`...`).
_FENCE = re.compile(r"```[a-z]*\n(.*?)```", re.S)
_INLINE = re.compile(r"`(llmctl [^`\n]+)`")
_PROMQL = re.compile(r"```promql\n(.*?)```", re.S)


@dataclass(frozen=True)
class AlertRule:
    name: str
    group: str
    expr: str
    severity: str
    summary: str
    runbook_url: str
    for_: str = "0s"


def runbooks_dir() -> Path:
    """`$LLMCTL_RUNBOOKS`, else the packaged copy, else the source tree's `runbooks/`."""
    env = os.environ.get("LLMCTL_RUNBOOKS")
    for candidate in ([Path(env)] if env else []) + [_HERE / "runbooks", _REPO / "runbooks"]:
        if candidate.is_dir():
            return candidate
    raise NotFoundError("runbooks directory not found (set LLMCTL_RUNBOOKS to the project's runbooks/)")


def alerts_file() -> Path:
    for candidate in (_HERE / "alerts.yaml", _REPO / "dashboards" / "alerts.yaml"):
        if candidate.is_file():
            return candidate
    raise NotFoundError("alert rules file alerts.yaml not found")


def load_alerts(path: Path | None = None) -> list[AlertRule]:
    path = path or alerts_file()
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        rules = []
        for group in doc["groups"]:
            for r in group["rules"]:
                if "alert" not in r:
                    continue
                ann = r.get("annotations", {})
                rules.append(
                    AlertRule(
                        name=r["alert"],
                        group=group["name"],
                        expr=r["expr"].strip(),
                        severity=r.get("labels", {}).get("severity", ""),
                        summary=ann.get("summary", ""),
                        runbook_url=ann.get("runbook_url", ""),
                        for_=r.get("for", "0s"),
                    )
                )
    except (yaml.YAMLError, KeyError, TypeError) as exc:
        raise CorruptFileError(f"{path}: not a Prometheus rules file ({exc})") from None
    return rules


def runbook_names() -> list[str]:
    return sorted(p.stem for p in runbooks_dir().glob("*.md") if p.stem != "README")


def runbook_path(name: str) -> Path:
    names = runbook_names()
    match = {n.lower(): n for n in names}.get(name.lower())
    if match is None:
        raise NotFoundError(f"no runbook for {name!r}; known: {', '.join(names)}")
    return runbooks_dir() / f"{match}.md"


def read_runbook(name: str) -> str:
    return runbook_path(name).read_text(encoding="utf-8")


def title_of(text: str) -> str:
    for line in text.splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return ""


def llmctl_commands(text: str) -> list[str]:
    """Every `llmctl ...` command line a runbook shows, in order (continuations joined)."""
    found: list[str] = []
    for block in _FENCE.findall(text):
        lines = block.replace("\\\n", " ").splitlines()
        found += [
            ln.strip().removeprefix("$ ").strip() for ln in lines if ln.strip().removeprefix("$ ").startswith("llmctl ")
        ]
    found += [m.strip() for m in _INLINE.findall(text)]
    return found


def promql_blocks(text: str) -> list[str]:
    """The PromQL expressions a runbook gives to paste into Prometheus."""
    return [b.strip() for b in _PROMQL.findall(text) if b.strip()]
