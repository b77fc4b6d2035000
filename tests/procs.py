"""Background tool processes for tests, with their output in files rather than pipes.

A child whose stderr pipe nobody reads blocks once the pipe's buffer fills, and a parent blocked in
readline() on the other pipe then waits forever (one CI run spent 24 minutes so). Here the output goes to
files, and waiting for a line polls them with a deadline, so no wait can outlive its timeout."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class Proc:
    def __init__(self, cmd: list[str], log_dir: Path, **env: str):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = log_dir / "stdout.txt", log_dir / "stderr.txt"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.popen = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, text=True,
                                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})

    def text(self, stream: str = "stderr") -> str:
        return (self.out_path if stream == "stdout" else self.err_path).read_text(errors="replace")

    def wait_for_line(self, needle: str, stream: str = "stderr", timeout: float = 120) -> None:
        t0 = time.time()
        while time.time() - t0 < timeout:
            if needle in self.text(stream):
                return
            if self.popen.poll() is not None:
                break
            time.sleep(0.05)
        self.kill()
        raise AssertionError(f"{needle!r} never appeared on {stream} within {timeout:.0f} s; exit code "
                             f"{self.popen.poll()}; stderr ends: {self.text()[-1500:]}")

    def finish(self, timeout: float = 120) -> tuple[int, str]:
        """Wait for the exit (killing it after `timeout`) and return (exit code, stderr)."""
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired as e:
            self.kill()
            raise AssertionError(f"still running after {timeout:.0f} s; stderr ends: {self.text()[-1500:]}") from e
        return self.popen.returncode, self.text()

    def send_signal(self, sig: int) -> None:
        self.popen.send_signal(sig)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()
