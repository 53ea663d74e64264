"""One real local Ray cluster (token auth on) shared by the integration tests of a session.

The cluster lives under a session-wide storage root; tests that use it point LLMCTL_HOME
there (`cluster_home`), and keep apart by their unique run ids. A small dataset is prepared
once for the session from the default corpus, and a generated 200 MB web-like corpus
(`big_corpus`, tests/corpus.py) is written at most once per session.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from controlplane import ray_cluster
from controlplane.spec import ClusterSpec, StorageSpec


@pytest.fixture(scope="session")
def ray_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("ray-home")
    cluster = ClusterSpec(storage=StorageSpec(root=str(home)))
    try:  # a start that fails half way (the head up, a worker node not) is stopped too
        ray_cluster.up(cluster, num_cpus=4, worker_nodes=1)
        yield home
    finally:
        ray_cluster.down(cluster)


@pytest.fixture
def cluster_home(ray_home, monkeypatch):
    monkeypatch.setenv("LLMCTL_HOME", str(ray_home))
    return ray_home


@pytest.fixture(scope="session")
def dataset_dir(ray_home):
    from controlplane.data import prepare

    out = ray_home / "datasets" / "manpages-ja"
    if not (out / "meta.json").exists():
        prepare("manpages-ja", out, vocab_size=1024, heldout_fraction=0.05, seed=0)
    return out


CORPUS_MB = 200


@pytest.fixture(scope="session")
def big_corpus(tmp_path_factory):
    """CORPUS_MB of generated jsonl (8 files), written once for the session (a few seconds)."""
    from tests.corpus import write_corpus

    root = tmp_path_factory.mktemp("corpus") / "web"
    size = write_corpus(root, CORPUS_MB, seed=0, files=8)
    assert size >= CORPUS_MB * 1024 * 1024
    return root


def wait_for(check: Callable[[], object], timeout: float, what: str, every: float = 0.25):
    """Poll `check` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
