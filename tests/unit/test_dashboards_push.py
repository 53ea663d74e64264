"""`llmctl dashboards push` against a small stateful Grafana HTTP server on 127.0.0.1.

No Grafana runs here, so the server below implements the folder and dashboard endpoints
grafana-client calls, with Grafana's semantics: uids are unique, every save bumps the
version, a save without `overwrite` of an existing uid is a 412, a dashboard must land in an
existing folder, and every call needs the bearer token.
"""

from __future__ import annotations

import copy
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from typer.testing import CliRunner

from controlplane.cli.main import app
from controlplane.observability.dashboards import render_all
from controlplane.observability.grafana import folder_uid, push, scoped_uid

TOKEN = "glsa_s3cr3t-token-value"


class FakeGrafana:
    def __init__(self, token: str):
        self.token = token
        self.folders: dict[str, dict] = {}
        self.dashboards: dict[str, dict] = {}  # uid -> {"dashboard", "folderUid", "version"}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def snapshot(self) -> dict:
        with self.lock:
            return copy.deepcopy({"folders": self.folders, "dashboards": self.dashboards})

    def handle(self, method: str, path: str, auth: str | None, body: dict | None) -> tuple[int, object]:
        self.requests.append((method, path))
        if auth != f"Bearer {self.token}":
            return 401, {"message": "Unauthorized"}
        path = path.split("?")[0]
        with self.lock:
            if method == "GET" and path == "/api/health":
                return 200, {"database": "ok", "version": "11.6.0"}
            if method == "GET" and path == "/api/folders":
                return 200, [{"uid": u, "title": f["title"]} for u, f in self.folders.items()]
            if path.startswith("/api/folders/"):
                uid = path.removeprefix("/api/folders/")
                if uid not in self.folders:
                    return 404, {"message": "folder not found"}
                if method == "GET":
                    return 200, {"uid": uid, **self.folders[uid]}
                if method == "PUT":
                    self.folders[uid]["title"] = body["title"]
                    self.folders[uid]["version"] += 1
                    return 200, {"uid": uid, **self.folders[uid]}
            if method == "POST" and path == "/api/folders":
                uid = body.get("uid")
                if uid in self.folders or any(f["title"] == body["title"] for f in self.folders.values()):
                    return 409, {"message": "a folder with the same name or uid already exists"}
                self.folders[uid] = {"title": body["title"], "version": 1}
                return 200, {"uid": uid, **self.folders[uid]}
            if method == "POST" and path == "/api/dashboards/db":
                d = body["dashboard"]
                uid, folder = d.get("uid"), body.get("folderUid")
                if folder not in self.folders:
                    return 400, {"message": "folder not found"}
                old = self.dashboards.get(uid)
                if old and not body.get("overwrite") and d.get("version") != old["version"]:
                    return 412, {
                        "message": "The dashboard has been changed by someone else",
                        "status": "version-mismatch",
                    }
                version = old["version"] + 1 if old else 1
                stored = {**copy.deepcopy(d), "version": version, "id": abs(hash(uid)) % 10_000}
                self.dashboards[uid] = {"dashboard": stored, "folderUid": folder, "version": version}
                return 200, {"uid": uid, "status": "success", "version": version, "url": f"/d/{uid}"}
            if method == "GET" and path.startswith("/api/dashboards/uid/"):
                uid = path.removeprefix("/api/dashboards/uid/")
                if uid not in self.dashboards:
                    return 404, {"message": "Dashboard not found"}
                rec = self.dashboards[uid]
                return 200, {
                    "dashboard": rec["dashboard"],
                    "meta": {"folderUid": rec["folderUid"], "version": rec["version"]},
                }
        return 404, {"message": f"not implemented: {method} {path}"}


@pytest.fixture
def grafana():
    state = FakeGrafana(TOKEN)

    class Handler(BaseHTTPRequestHandler):
        def _serve(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            code, payload = state.handle(self.command, self.path, self.headers.get("Authorization"), body)
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = _serve

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_push_is_idempotent_and_overwrites_by_uid(grafana):
    dashboards = render_all()
    first = push(grafana.url, TOKEN, "tsubame", dashboards)
    assert {r.status for r in first} == {"created"}
    state1 = grafana.snapshot()
    assert list(state1["folders"]) == [folder_uid("tsubame")]
    assert set(state1["dashboards"]) == {scoped_uid(uid, "tsubame") for uid in dashboards}
    assert all(rec["folderUid"] == folder_uid("tsubame") for rec in state1["dashboards"].values())

    second = push(grafana.url, TOKEN, "tsubame", dashboards)
    assert {r.status for r in second} == {"unchanged"}
    assert grafana.snapshot() == state1

    # Someone edits a dashboard in the UI: the next push puts the generated one back, same uid.
    uid = scoped_uid("llmctl-power", "tsubame")
    grafana.dashboards[uid]["dashboard"]["panels"] = []
    third = push(grafana.url, TOKEN, "tsubame", dashboards)
    assert [r.status for r in third if r.uid == uid] == ["updated"]
    state3 = grafana.snapshot()
    assert len(state3["dashboards"]) == len(dashboards)
    assert state3["dashboards"][uid]["version"] == state1["dashboards"][uid]["version"] + 1
    assert len(state3["dashboards"][uid]["dashboard"]["panels"]) == len(dashboards["llmctl-power"]["panels"])


def test_clusters_get_their_own_folder_and_uids(grafana):
    dashboards = render_all()
    push(grafana.url, TOKEN, "tsubame", dashboards)
    push(grafana.url, TOKEN, "abci", dashboards)
    state = grafana.snapshot()
    assert set(state["folders"]) == {folder_uid("tsubame"), folder_uid("abci")}
    assert len(state["dashboards"]) == 2 * len(dashboards)
    power = state["dashboards"][scoped_uid("llmctl-power", "abci")]
    assert power["folderUid"] == folder_uid("abci")
    cluster_var = next(v for v in power["dashboard"]["templating"]["list"] if v["name"] == "cluster")
    assert cluster_var["current"]["value"] == "abci"


def test_cli_push_reads_token_from_env_and_never_prints_it(grafana, monkeypatch):
    monkeypatch.setenv("GRAFANA_TOKEN_FOR_TEST", TOKEN)
    runner = CliRunner()
    res = runner.invoke(
        app, ["dashboards", "push", "--url", grafana.url, "--token-env", "GRAFANA_TOKEN_FOR_TEST", "--json"]
    )
    assert res.exit_code == 0, res.output
    assert TOKEN not in res.output
    rows = json.loads(res.stdout)
    assert {r["status"] for r in rows} == {"created"}
    assert {r["folder"] for r in rows} == {folder_uid("local")}

    res = runner.invoke(app, ["dashboards", "push", "--url", grafana.url, "--token-env", "GRAFANA_TOKEN_FOR_TEST"])
    assert res.exit_code == 0
    assert "unchanged" in res.output and TOKEN not in res.output


def test_cli_push_bad_token_is_one_line_without_the_token(grafana, monkeypatch):
    monkeypatch.setenv("WRONG_TOKEN", "not-" + TOKEN)
    res = CliRunner().invoke(app, ["dashboards", "push", "--url", grafana.url, "--token-env", "WRONG_TOKEN"])
    assert res.exit_code == 2
    assert "401" in res.output and TOKEN not in res.output
    assert grafana.snapshot()["dashboards"] == {}


def test_cli_push_missing_token_variable_exits_2(grafana, monkeypatch):
    monkeypatch.delenv("NO_SUCH_TOKEN", raising=False)
    res = CliRunner().invoke(app, ["dashboards", "push", "--url", grafana.url, "--token-env", "NO_SUCH_TOKEN"])
    assert res.exit_code == 2
    assert "NO_SUCH_TOKEN" in res.output


def test_cli_export_writes_import_payloads_scoped_to_the_cluster(tmp_path):
    cluster_file = tmp_path / "cluster.yaml"
    cluster_file.write_text("name: abci\n", encoding="utf-8")
    out = tmp_path / "export"
    res = CliRunner().invoke(app, ["dashboards", "export", str(out), "--cluster", str(cluster_file)])
    assert res.exit_code == 0, res.output
    files = sorted(out.glob("*.json"))
    assert [f.name for f in files] == sorted(f"{scoped_uid(uid, 'abci')}.json" for uid in render_all())
    for f in files:
        payload = json.loads(f.read_text(encoding="utf-8"))
        assert payload["folderUid"] == folder_uid("abci") and payload["overwrite"] is True
        assert payload["dashboard"]["uid"] == f.stem and payload["dashboard"]["title"].endswith("(abci)")
