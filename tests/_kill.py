"""Run a child process until it has printed enough lines, then SIGKILL it (the crash tests)."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time


def kill_after_lines(args: list[str], count: int, timeout: float = 20.0) -> list[bytes]:
    """Run ``python *args``; once it printed ``READY`` and then ``count`` lines, SIGKILL it.

    Returns every whole line it printed after ``READY``, including those still in the pipe at
    the kill (they were written before it, so they were acknowledged too; a torn last line was
    not). Fails if the child did not die by the kill, wrote to stderr, or was too slow.
    """
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buffer = b""
    lines: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while len(lines) <= count and time.monotonic() < deadline:
                if not selector.select(timeout=max(0.0, deadline - time.monotonic())):
                    continue
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    break  # the child ended by itself: the checks below say why
                buffer += chunk
                *done, buffer = buffer.split(b"\n")
                lines.extend(done)
    finally:
        proc.send_signal(signal.SIGKILL)
        rest, err = proc.communicate(timeout=30)
    *done, _torn = (buffer + rest).split(b"\n")
    lines.extend(done)
    assert proc.returncode == -signal.SIGKILL, err.decode(errors="replace")
    assert lines[:1] == [b"READY"], (lines[:3], err.decode(errors="replace"))
    assert len(lines) > count, f"only {len(lines) - 1} lines in {timeout} s"
    assert not err, err.decode(errors="replace")
    return lines[1:]
