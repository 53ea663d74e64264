"""Runbooks: one per alert, each with its sections, and every `llmctl ...` command in them parses
against the real CLI (resolved through click with resilient parsing; nothing is executed)."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from controlplane.cli.main import app
from controlplane.observability import runbooks as rb
from controlplane.observability.catalog import SOURCES, metrics_in

ROOT = Path(__file__).resolve().parents[2]
ALL_METRICS = {m for names in SOURCES.values() for m in names}
SECTIONS = ("## What it means", "## Impact", "## Confirm", "## Mitigate", "## Escalate")


class CommandParseError(Exception):
    pass


def resolve(argv: list[str]):
    """Resolve `llmctl ARGV` to its command, or raise CommandParseError saying why it would not parse.

    Typer ships its own copy of click, so this goes through the command objects typer builds
    (`make_context` with resilient parsing, `resolve_command`) rather than importing click.
    """
    cmd = typer.main.get_command(app)
    path = ["llmctl"]
    try:
        ctx = cmd.make_context("llmctl", list(argv), resilient_parsing=True)
        while hasattr(cmd, "resolve_command"):  # a group
            rest = [*ctx._protected_args, *ctx.args]
            if not rest and getattr(cmd, "invoke_without_command", False):
                break  # a group that is a command of its own too (`llmctl supervise`)
            if not rest:
                raise CommandParseError(f"{' '.join(path)}: a command group, not a command")
            wanted = rest[0]
            name, sub, rest = cmd.resolve_command(ctx, rest)
            if sub is None:
                raise CommandParseError(f"{' '.join(path)}: no command {wanted!r}")
            path.append(name)
            ctx = sub.make_context(name, rest, parent=ctx, resilient_parsing=True)
            cmd = sub
    except CommandParseError:
        raise
    except Exception as exc:  # typer's click UsageError / NoSuchOption / BadParameter
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        raise CommandParseError(f"{' '.join(path)}: {message}") from None
    if ctx.args:
        raise CommandParseError(f"{' '.join(path)}: unexpected arguments {ctx.args}")
    missing = [p.name for p in cmd.params if p.required and ctx.params.get(p.name) in (None, ())]
    if missing:
        raise CommandParseError(f"{' '.join(path)}: missing {', '.join(missing)}")
    return cmd


def test_resolver_accepts_real_commands_and_rejects_wrong_ones():
    assert resolve(["runbook", "show", "TrainingHang"]).name == "show"
    assert resolve(["dashboards", "push", "--url", "http://g:3000", "--token-env", "T"]).name == "push"
    for bad in (
        ["runbook", "nosuch"],
        ["nosuchgroup", "list"],
        ["runbook", "show"],  # missing ALERT
        ["runbook", "show", "A", "B"],  # extra argument
        ["dashboards", "push", "--nosuch-option", "x", "--url", "u"],
        ["runbook"],
    ):
        with pytest.raises(CommandParseError):
            resolve(bad)


def test_every_alert_has_a_runbook_and_every_runbook_an_alert():
    alerts = {a.name for a in rb.load_alerts()}
    assert alerts == set(rb.runbook_names())


@pytest.mark.parametrize("name", rb.runbook_names())
def test_runbook_structure(name):
    text = rb.read_runbook(name)
    assert text.startswith(f"# {name}: "), name
    positions = [text.find(s) for s in SECTIONS]
    assert all(p > 0 for p in positions), (name, dict(zip(SECTIONS, positions, strict=True)))
    assert positions == sorted(positions), name
    assert "```promql" in text, f"{name}: no PromQL to confirm with"
    for expr in rb.promql_blocks(text):
        assert metrics_in(expr) <= ALL_METRICS, (name, expr)
    assert rb.llmctl_commands(text), f"{name}: no llmctl command"


def _all_commands() -> list[tuple[str, str]]:
    files = sorted(rb.runbooks_dir().glob("*.md"))
    return [(f.stem, c) for f in files for c in rb.llmctl_commands(f.read_text(encoding="utf-8"))]


@pytest.mark.parametrize(("runbook", "command"), _all_commands())
def test_runbook_commands_parse_against_the_cli(runbook, command):
    argv = shlex.split(command)
    assert argv[0] == "llmctl"
    try:
        resolve(argv[1:])
    except CommandParseError as exc:
        pytest.fail(f"{runbook}: `{command}` does not parse: {exc}")


def test_runbook_cli_list_and_show():
    runner = CliRunner()
    res = runner.invoke(app, ["runbook", "list", "--json"])
    assert res.exit_code == 0, res.output
    import json

    rows = json.loads(res.stdout)
    assert {r["alert"] for r in rows} == set(rb.runbook_names())
    assert all(r["runbook"] for r in rows)
    res = runner.invoke(app, ["runbook", "show", "traininghang"])
    assert res.exit_code == 0 and "## Mitigate" in res.stdout
    res = runner.invoke(app, ["runbook", "show", "NoSuchAlert"])
    assert res.exit_code == 2 and "no runbook" in res.output


def test_runbook_show_imports_neither_ray_nor_torch():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from controlplane.cli.main import app\n"
        "r = CliRunner().invoke(app, ['runbook', 'show', 'GpuLost'])\n"
        "assert r.exit_code == 0, r.output\n"
        "heavy = [m for m in ('ray', 'torch') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


def test_runbooks_are_found_through_the_package():
    # The package carries the runbooks and rules (controlplane/observability/runbooks, alerts.yaml),
    # which is what an installed llmctl reads.
    pkg = Path(rb.__file__).resolve().parent
    assert (pkg / "runbooks" / "GpuLost.md").is_file()
    assert (pkg / "alerts.yaml").is_file()
    assert rb.runbooks_dir() == pkg / "runbooks"
