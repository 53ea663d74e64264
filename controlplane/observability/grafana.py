"""Push the generated dashboards to a Grafana through its HTTP API (grafana-client).

One folder per cluster (uid `llmctl-<cluster>`); each dashboard's uid carries the cluster, so
clusters never overwrite each other. Idempotent: a dashboard whose content already matches is
left alone (no new version); a changed one is overwritten by uid. The token is passed to the
client and never printed, logged or put in an error message.
"""

from __future__ import annotations

import copy
import hashlib
import re
from dataclasses import dataclass
from typing import Any

from controlplane.errors import RetryableError, UserError

UID_MAX = 40  # Grafana's limit on dashboard and folder uids


class GrafanaError(UserError):
    """Grafana refused a request (bad token, bad URL, conflicting folder)."""


@dataclass(frozen=True)
class PushResult:
    uid: str
    title: str
    status: str  # created | updated | unchanged
    version: int | None


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-") or "default"


def scoped_uid(uid: str, cluster: str) -> str:
    full = f"{uid}-{_slug(cluster)}"
    if len(full) <= UID_MAX:
        return full
    digest = hashlib.sha256(full.encode()).hexdigest()[:8]
    return f"{full[: UID_MAX - 9]}-{digest}"


def folder_uid(cluster: str) -> str:
    return scoped_uid("llmctl", cluster)


def for_cluster(dashboard: dict[str, Any], cluster: str) -> dict[str, Any]:
    """The dashboard as pushed for one cluster: scoped uid, titled, cluster variable preselected."""
    d = copy.deepcopy(dashboard)
    d["uid"] = scoped_uid(d["uid"], cluster)
    d["title"] = f"{d['title']} ({cluster})"
    d.pop("id", None)
    d.pop("version", None)
    for var in d.get("templating", {}).get("list", []):
        if var.get("name") == "cluster":
            var["current"] = {"selected": True, "text": cluster, "value": cluster}
    return d


def redact(url: str) -> str:
    """The URL without any user:password part."""
    return re.sub(r"//[^/@]*@", "//", url)


def _same(pushed: dict[str, Any], stored: dict[str, Any]) -> bool:
    strip = ("id", "version")
    return {k: v for k, v in pushed.items() if k not in strip} == {k: v for k, v in stored.items() if k not in strip}


def _api(url: str, token: str | None, timeout: float):
    from grafana_client import GrafanaApi

    return GrafanaApi.from_url(url, credential=token or None, timeout=timeout)


def _call(what: str, fn, *args, **kwargs):
    """Run one API call; turn its failures into one line that names the call, never the token."""
    from grafana_client.client import GrafanaClientError, GrafanaException, GrafanaServerError

    try:
        return fn(*args, **kwargs)
    except GrafanaServerError as exc:
        raise RetryableError(f"grafana: {what}: server error {exc.status_code}") from None
    except GrafanaClientError as exc:
        raise GrafanaError(f"grafana: {what}: HTTP {exc.status_code}: {_message(exc)}") from None
    except GrafanaException as exc:
        raise RetryableError(f"grafana: {what}: {exc.message}") from None
    except OSError as exc:  # connection refused, DNS
        raise RetryableError(f"grafana: {what}: {type(exc).__name__}") from None


def _message(exc) -> str:
    resp = getattr(exc, "response", None)
    if isinstance(resp, dict) and "message" in resp:
        return str(resp["message"])
    return "request refused"


def _is_missing(fn, *args) -> tuple[bool, Any]:
    from grafana_client.client import GrafanaClientError

    try:
        return False, fn(*args)
    except GrafanaClientError as exc:
        if exc.status_code == 404:
            return True, None
        raise


def push(
    url: str,
    token: str | None,
    cluster: str,
    dashboards: dict[str, dict[str, Any]],
    timeout: float = 10.0,
) -> list[PushResult]:
    """Create or update the cluster's folder and every dashboard in it; returns what happened."""
    import niquests

    api = _api(url, token, timeout)
    f_uid, f_title = folder_uid(cluster), f"llmctl {cluster}"
    try:
        missing, folder = _call("read folder", _is_missing, api.folder.get_folder, f_uid)
        if missing:
            _call("create folder", api.folder.create_folder, f_title, uid=f_uid)
        elif folder.get("title") != f_title:
            _call("rename folder", api.folder.update_folder, f_uid, title=f_title, overwrite=True)
        results = []
        for uid in sorted(dashboards):
            d = for_cluster(dashboards[uid], cluster)
            missing, stored = _call("read dashboard", _is_missing, api.dashboard.get_dashboard, d["uid"])
            if not missing:
                meta = stored.get("meta", {})
                if _same(d, stored.get("dashboard", {})) and meta.get("folderUid") == f_uid:
                    results.append(PushResult(d["uid"], d["title"], "unchanged", stored["dashboard"].get("version")))
                    continue
            body = {"dashboard": d, "folderUid": f_uid, "overwrite": True, "message": "llmctl dashboards push"}
            resp = _call("save dashboard", api.dashboard.update_dashboard, body)
            status = "created" if missing else "updated"
            results.append(PushResult(d["uid"], d["title"], status, resp.get("version")))
    except niquests.exceptions.RequestException as exc:
        raise RetryableError(f"grafana: cannot reach {redact(url)}: {type(exc).__name__}") from None
    return results
