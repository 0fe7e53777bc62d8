"""Cluster nodes as child processes (``_cluster_node``), watched from the test process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class NodeProcess:
    """One node in a child process; ``lines`` collects what it printed (a reader thread)."""

    def __init__(
        self, dsn: str, schema: str, node_id: str, *, lease: float, keys: int, version: int = 1
    ) -> None:
        self.node_id = node_id
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests._cluster_node",
                dsn,
                schema,
                node_id,
                str(lease),
                str(keys),
                str(version),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: list[list[str]] = []
        self.address = ""
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._errors = threading.Thread(target=self._read_errors, daemon=True)
        self._errors.start()
        self.stderr = b""

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            words = raw.decode(errors="replace").split()
            if raw.endswith(b"\n") and words:  # a torn last line was not acknowledged
                self.lines.append(words)
                if words[0] == "ready":
                    self.address = words[1]
                    self._ready.set()

    def _read_errors(self) -> None:
        assert self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()

    def wait_ready(self, timeout: float = 30.0) -> None:
        if not self._ready.wait(timeout):
            self.kill()
            raise AssertionError(f"{self.node_id} did not start: {self.stderr[-2000:]!r}")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self._close()

    def _close(self) -> None:
        self._reader.join(10)
        self._errors.join(10)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM: the node leaves cleanly."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout)
        self._close()

    def closed_stats(self) -> dict[str, int]:
        """The node's counters, from its ``closed`` line (empty if it did not close)."""
        for words in self.lines:
            if words[0] == "closed":
                return {k: int(v) for k, _, v in (w.partition("=") for w in words[1:])}
        return {}

    def acks(self) -> list[tuple[str, int, float]]:
        return [(w[1], int(w[2]), float(w[3])) for w in self.lines if w[0] == "ack"]


def check_history(nodes: list[NodeProcess], stored: dict[str, int]) -> dict[str, list[int]]:
    """The failover checks over every node's acknowledged results.

    Every acknowledged increment is in the stored state (its value is at most the stored one:
    a counter's history is one line), and no value was acknowledged twice (two commits on one
    version: a fork). Returns the acknowledged values by key.
    """
    acked: dict[str, list[int]] = defaultdict(list)
    for node in nodes:
        for key, value, _ in node.acks():
            acked[key].append(value)
    for key, values in acked.items():
        assert len(values) == len(set(values)), f"{key}: a value acknowledged twice (a fork)"
        assert max(values) <= stored.get(key, 0), f"{key}: acknowledged {max(values)} is lost"
    return acked


def wait_until(predicate, timeout: float, step: float = 0.05) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()
