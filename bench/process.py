"""The parent's side of a worker: start ``python -m edgekd.bench.worker``, send requests, read answers."""

import json
import os
import select
import subprocess
import sys

from ..base.errors import EdgeKDError

REQUEST_TIMEOUT_S = 1800


class WorkerProcess:
    """One live worker process; ``request`` raises EdgeKDError with the reason when the worker fails or dies."""

    def __init__(self, log_path, cpus=None):
        env = dict(os.environ, OPENVINO_TELEMETRY_OPT_OUT="1")
        cmd = [sys.executable, "-m", "edgekd.bench.worker"]
        if cpus:
            cmd += ["--cpus", ",".join(map(str, cpus))]
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     text=True, bufsize=1, env=env)

    def request(self, op, timeout=REQUEST_TIMEOUT_S, **fields):
        """Send one request; return its answer (a dict) or raise EdgeKDError with the worker's reason."""
        try:
            self.proc.stdin.write(json.dumps({"op": op, **fields}) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise EdgeKDError(self._death()) from None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.kill()
            raise EdgeKDError(f"worker gave no answer to {op!r} within {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            raise EdgeKDError(self._death())
        answer = json.loads(line)
        if "error" in answer:
            raise EdgeKDError(answer["error"])
        return answer

    def _death(self):
        code = self.proc.wait(timeout=30)
        self._log.flush()
        with open(self.log_path) as f:
            lines = [ln for ln in f.read().strip().splitlines() if ln.strip()]
        return f"worker exited with code {code}: {lines[-1] if lines else 'no output'}"

    def close(self):
        """Ask the worker for its final figures and let it exit; a dead worker answers {}."""
        try:
            answer = self.request("close", timeout=60)
        except EdgeKDError:
            answer = {}
        self.kill()
        return answer

    def kill(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (subprocess.TimeoutExpired, BrokenPipeError, OSError):
                self.proc.kill()
                self.proc.wait()
        self._log.close()
