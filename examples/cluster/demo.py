"""Three nodes of one cluster on loopback: the username registrar, with a cache on every node.

``python examples/cluster/demo.py`` starts a throwaway PostgreSQL of its own
(``pachyderm.testing.PostgresServer``: ``initdb`` and ``pg_ctl`` must be on PATH), or uses
``--db postgresql://...``; then it runs three ``node.py`` processes. Each registers its own
usernames (a call for a shard another node owns is forwarded to it), and each keeps a
follower-backed cache that sees every node's registrations. Then the nodes leave one by one,
handing their partitions to the others, and the demo prints what they said.
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
from pathlib import Path

from pachyderm.testing import PostgresServer

HERE = Path(__file__).resolve().parent
NODES = {
    "n1": ["alice", "bob", "carol"],
    "n2": ["alfred", "bonnie", "dave"],
    "n3": ["casper", "daphne", "bob"],  # "bob" is taken by n1's user (or n3 gets it first)
}


def run(dsn: str) -> int:
    env = {**os.environ, "PACHYDERM_SECRET": secrets.token_hex(16)}
    procs = {
        node_id: subprocess.Popen(
            [sys.executable, str(HERE / "node.py"), dsn, node_id, *names],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for node_id, names in NODES.items()
    }
    status = 0
    try:
        for node_id, proc in procs.items():  # wait until each cache saw every name
            assert proc.stdout is not None
            for line in proc.stdout:
                print(line, end="")
                if "the cache sees all" in line:
                    break
            else:
                print(f"{node_id} ended early", file=sys.stderr)
                status = 1
        for proc in procs.values():  # leave one by one: hand-offs, not failures
            assert proc.stdin is not None
            assert proc.stdout is not None
            proc.stdin.close()
            print(proc.stdout.read(), end="")
            status = status or proc.wait(60)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--db", help="a PostgreSQL URL (default: a throwaway server of our own)")
    args = parser.parse_args()
    if args.db:
        return run(args.db)
    server = PostgresServer().start()
    try:
        return run(server.dsn)
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
