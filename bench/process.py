"""The parent's side of a worker: start ``python -m edgekd.bench.worker``, send requests, read answers."""

import json
import os
import select
import subprocess
import sys
from typing import Any, List, Optional, Sequence

from ..base.errors import EdgeKDError
from ..bundle.rows import JSON
from .protocol import error_of

REQUEST_TIMEOUT_S = 1800


class WorkerProcess:
    """One live worker process; ``request`` raises EdgeKDError with the reason when the worker fails or dies."""

    def __init__(self, log_path: str, cpus: Optional[Sequence[int]] = None) -> None:
        env = dict(os.environ, OPENVINO_TELEMETRY_OPT_OUT="1")
        cmd = [sys.executable, "-m", "edgekd.bench.worker"]
        if cpus:
            cmd += ["--cpus", ",".join(map(str, cpus))]
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     text=True, bufsize=1, env=env)

    def request(self, op: str, timeout: float = REQUEST_TIMEOUT_S, **fields: Any) -> JSON:
        """Send one request; return its answer's JSON object or raise EdgeKDError with the worker's reason."""
        stdin, stdout = self.proc.stdin, self.proc.stdout
        assert stdin is not None and stdout is not None  # both are pipes
        try:
            stdin.write(json.dumps({"op": op, **fields}) + "\n")
            stdin.flush()
        except BrokenPipeError:
            raise EdgeKDError(self._death()) from None
        ready, _, _ = select.select([stdout], [], [], timeout)
        if not ready:
            self.kill()
            raise EdgeKDError(f"worker gave no answer to {op!r} within {timeout} s")
        line = stdout.readline()
        if not line:
            raise EdgeKDError(self._death())
        answer: JSON = json.loads(line)
        error = error_of(answer)
        if error is not None:
            raise EdgeKDError(error)
        return answer

    def _death(self) -> str:
        code = self.proc.wait(timeout=30)
        self._log.flush()
        with open(self.log_path) as f:
            lines: List[str] = [ln for ln in f.read().strip().splitlines() if ln.strip()]
        return f"worker exited with code {code}: {lines[-1] if lines else 'no output'}"

    def close(self) -> JSON:
        """Ask the worker for its final figures and let it exit; a dead worker answers {}."""
        try:
            answer = self.request("close", timeout=60)
        except EdgeKDError:
            answer = {}
        self.kill()
        return answer

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                if self.proc.stdin is not None:
                    self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (subprocess.TimeoutExpired, BrokenPipeError, OSError):
                self.proc.kill()
                self.proc.wait()
        self._log.close()
