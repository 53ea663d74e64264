"""Why `ray start` stopped, read from its log, in one line."""

from __future__ import annotations

from controlplane.ray_launch import gave_up, start_failure

GCS_PORT_TAKEN = """\
2026-12-08 02:04:43,743\tINFO usage_lib.py:448 -- Usage stats collection is disabled.
Traceback (most recent call last):
  File "ray/_private/node.py", line 1025, in _init_gcs_client
    raise RuntimeError(
RuntimeError: Failed to start GCS.  Last 1 lines of error files:
[2026-12-08 02:04:43,988 C 22923 22923] (gcs_server) grpc_server.cc:134:  An unexpected system state has occurred. \
You have likely discovered a bug in Ray. Check failed: server_ Failed to start the grpc server. The specified port is \
50167. This means that Ray's core components will not be able to function correctly.

.Please check /tmp/llmctl-ray-x/session/logs/gcs_server.out for details. Last connection error: None
"""

DASHBOARD_PORT_TAKEN = """\
2026-12-08 02:06:40,100\tINFO scripts.py:1043 -- Local node IP: 127.0.0.1
    raise ValueError(
ValueError: Failed to bind to 127.0.0.1:36069 because it's already occupied. You can use `ray start --dashboard-port ...`
"""


def test_the_line_that_names_the_cause(tmp_path):
    log = tmp_path / "head.log"
    log.write_text(GCS_PORT_TAKEN)
    line = start_failure(log)
    assert line.startswith("Check failed: server_ Failed to start the grpc server. The specified port is 50167")
    assert "\n" not in line and len(line) <= 240
    log.write_text(DASHBOARD_PORT_TAKEN)
    assert start_failure(log).startswith("ValueError: Failed to bind to 127.0.0.1:36069 because it's already occupied")


def test_a_log_with_no_error_line_gives_its_last_line_and_a_missing_one_says_so(tmp_path):
    log = tmp_path / "head.log"
    log.write_text("starting\nwaiting for the GCS\n\n")
    assert start_failure(log) == "waiting for the GCS"
    log.write_text("")
    assert start_failure(log) == "its log is empty"
    assert start_failure(tmp_path / "absent.log") == "its log is unreadable"


NODE_TIMED_OUT = """\
2026-12-08 03:56:50,106\tINFO scripts.py:1234 -- Local node IP: 127.0.0.1
2026-12-08 03:57:25,770\tINFO node.py:438 -- Failed to get node info b'GCS cannot find the node with node ID 8498'
Traceback (most recent call last):
  File "ray/_private/node.py", line 440, in __init__
    raise Exception(
Exception: The current node timed out during startup. This could happen because some of the raylet failed to startup.
"""


def test_a_start_that_printed_its_traceback_gave_up_and_only_this_tries_part_counts(tmp_path):
    log = tmp_path / "worker-2.log"
    log.write_text(NODE_TIMED_OUT)
    assert gave_up(log)
    assert start_failure(log).startswith("Exception: The current node timed out during startup")
    since = log.stat().st_size  # a second try appends to the same log
    with open(log, "a") as f:
        f.write("2026-12-08 03:58:00,000\tINFO scripts.py:1234 -- Local node IP: 127.0.0.1\n")
    assert not gave_up(log, since)
    assert start_failure(log, since) == "2026-12-08 03:58:00,000\tINFO scripts.py:1234 -- Local node IP: 127.0.0.1"
    assert not gave_up(tmp_path / "absent.log")
