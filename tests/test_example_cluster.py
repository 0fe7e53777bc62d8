"""``examples/cluster/``: three nodes on loopback, the username registrar, a cache per node."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pachyderm.testing import PostgresServer

ROOT = Path(__file__).resolve().parent.parent


def test_the_cluster_example_runs(postgres_server: PostgresServer) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "cluster" / "demo.py"),
            "--db",
            f"{postgres_server.dsn}?schema=example_cluster",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for node in ("n1", "n2", "n3"):
        assert f"[{node}] the cache sees all 8 names, served by followers" in out
        assert f"[{node}] left the cluster" in out
    # "bob" went to exactly one user: the registrar of shard "bo" decided, on one node.
    assert out.count("registered 'bob'") == 1
    assert out.count("refused 'bob': 'bob' is taken") == 1
    served = [int(line.split()[3]) for line in out.splitlines() if " serves " in line]
    assert len(served) == 3
    assert all(n > 0 for n in served)  # each node took a share (printed at different times)
