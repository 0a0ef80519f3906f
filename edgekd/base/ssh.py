"""Reach an edge device over SSH with the system ``ssh``/``scp``, the user's own config and keys.

``BatchMode=yes`` means a missing key fails at once instead of prompting: edgekd never asks for,
passes or stores a password. Every failure becomes one EdgeKDError line that says what to do.
"""

import os
import re
import shlex
import subprocess
from dataclasses import dataclass
from typing import List, Optional, Sequence

from .errors import EdgeKDError

SCHEME = "ssh://"
DEFAULT_PYTHON = "python3"
DEFAULT_TIMEOUT_S = 600
_URL = re.compile(r"^ssh://(?:(?P<user>[^@/:]+)@)?(?P<host>\[[^\]]+\]|[^@/:?]+)(?::(?P<port>\d+))?"
                  r"(?P<rest>[:/][^?]*)?(?:\?device=(?P<ov>[A-Z0-9.:_]+))?$")


@dataclass
class Target:
    """A device: ``ssh://[user@]host[:port][/python][?device=NPU]``; deploy: ``ssh://[user@]host[:port][:DIR]``.

    ``?device=`` picks the OpenVINO device on the board (CPU, GPU, NPU, AUTO) for OpenVINO bundles.
    """

    host: str
    user: Optional[str] = None
    port: Optional[int] = None
    python: str = DEFAULT_PYTHON
    folder: Optional[str] = None
    ssh_config: Optional[str] = None
    connect_timeout: int = 15
    openvino_device: str = "CPU"

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    def __str__(self) -> str:
        port = f":{self.port}" if self.port else ""
        return f"{SCHEME}{self.destination}{port}"


def parse_target(url: Optional[str], ssh_config: Optional[str] = None) -> Target:
    """Parse a device URL; ``/path`` after the host names the device's Python, ``:DIR`` a deploy folder."""
    m = _URL.match(url or "")
    if not m:
        raise EdgeKDError(f"bad device {url!r}: expected ssh://[user@]host[:port][/path/to/python] "
                          "(deploy: ssh://[user@]host[:port][:DIR])")
    rest = m.group("rest") or ""
    python: str = DEFAULT_PYTHON
    folder: Optional[str] = None
    if rest.startswith(":") and not rest.startswith((":/", ":~", ":-")):  # ":-x" is refused as a folder below
        # host:notaport is a mistyped port (silently port 22 before), or a deploy folder without its / or ~
        raise EdgeKDError(f"bad device {url!r}: port {rest[1:]!r} must be a number from 1 to 65535 (a deploy "
                          "folder starts with / or ~: ssh://host:/opt/models, ssh://host:~/models)")
    if rest.startswith(":"):
        folder = rest[1:]
    elif rest.startswith("/") and rest != "/":
        python = rest
    if ssh_config and not os.path.isfile(ssh_config):
        raise EdgeKDError(f"ssh config {ssh_config!r} does not exist")
    host, user = m.group("host"), m.group("user")
    port = int(m.group("port")) if m.group("port") else None
    _check_parts(url, host, user, port, python, folder)
    return Target(host.strip("[]"), user, port, python, folder, ssh_config, openvino_device=m.group("ov") or "CPU")


# What reaches ssh, scp and the device's shell as an argument: a host name, alias or address, a user name,
# a path. Nothing may start with '-' (ssh would read "-oProxyCommand=..." as an option and run it).
_HOST = re.compile(r"^(?:[A-Za-z0-9_][A-Za-z0-9_.-]*|\[[0-9A-Fa-f:.]+(?:%[A-Za-z0-9_.-]+)?\])$")
_USER = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_PATH = re.compile(r"^[A-Za-z0-9_./~+@%=,][A-Za-z0-9_./~+@%=,-]*$")


def _check_parts(url: Optional[str], host: str, user: Optional[str], port: Optional[int], python: str,
                 folder: Optional[str]) -> None:
    """Refuse any part of a device URL that ssh or the device's shell could read as an option or as code."""
    if not _HOST.match(host):
        raise EdgeKDError(f"bad device {url!r}: host {host!r} must be a host name, alias or address (letters, digits, "
                          "'.', '-', '_', not starting with '-'; IPv6 in [brackets])")
    if user is not None and not _USER.match(user):
        raise EdgeKDError(f"bad device {url!r}: user {user!r} must be letters, digits, '.', '-', '_', "
                          "not starting with '-'")
    if port is not None and not 1 <= port <= 65535:
        raise EdgeKDError(f"bad device {url!r}: port {port} must be from 1 to 65535")
    for what, path in (("python path", python), ("folder", folder)):
        if path is not None and not _PATH.match(path):
            raise EdgeKDError(f"bad device {url!r}: {what} {path!r} must be a plain path (letters, digits and "
                              "./~+@%=,_-; no spaces, quotes or control characters; not starting with '-')")


def check_path(url: str, what: str, path: str) -> None:
    """Refuse a path (given apart from the URL) that the device's shell could read as an option or as code."""
    if not _PATH.match(path):
        raise EdgeKDError(f"bad {what} {path!r} for {url}: must be a plain path (letters, digits and ./~+@%=,_-; "
                          "not starting with '-')")


def _options(target: Target) -> List[str]:
    opts = ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={target.connect_timeout}",
            "-o", "ServerAliveInterval=10", "-o", "ServerAliveCountMax=3"]
    if target.ssh_config:
        opts = ["-F", target.ssh_config] + opts
    return opts


def run(target: Target, command: str, timeout: float = DEFAULT_TIMEOUT_S,
        input_bytes: Optional[bytes] = None) -> bytes:
    """Run a shell command on the device; return its stdout (bytes). Raise one clear line on failure."""
    # "--" ends ssh's options: nothing after it is read as one, whatever it holds.
    port = ["-p", str(target.port)] if target.port else []
    args = ["ssh", *_options(target), *port, "--", target.destination, command]
    proc = _call(args, target, timeout, input_bytes)
    if proc.returncode != 0:
        raise EdgeKDError(_explain(target, proc))
    return proc.stdout


def copy_to(target: Target, local_paths: Sequence[str], remote_folder: str,
            timeout: float = DEFAULT_TIMEOUT_S) -> None:
    """Copy files and folders into an existing folder on the device (scp -r, batch mode)."""
    args = ["scp", "-r", "-q"] + _options(target) + (["-P", str(target.port)] if target.port else [])
    args += ["--"] + list(local_paths) + [f"{target.destination}:{remote_folder}/"]
    proc = _call(args, target, timeout)
    if proc.returncode != 0:
        raise EdgeKDError(_explain(target, proc, "copying to"))


def _call(args: List[str], target: Target, timeout: float,
          input_bytes: Optional[bytes] = None) -> "subprocess.CompletedProcess[bytes]":
    try:
        return subprocess.run(args, input=input_bytes, capture_output=True, timeout=timeout)
    except FileNotFoundError:
        raise EdgeKDError(f"the {args[0]!r} command is not installed here; install OpenSSH's client") from None
    except subprocess.TimeoutExpired:
        raise EdgeKDError(f"{target} did not answer within {timeout} s (--timeout)") from None


def _explain(target: Target, proc: "subprocess.CompletedProcess[bytes]", doing: str = "running on") -> str:
    """Turn ssh's exit and stderr into one line that says what to do."""
    err = proc.stderr.decode(errors="replace").strip()
    last = err.splitlines()[-1] if err else f"exit code {proc.returncode}"
    if proc.returncode == 255 or "ssh:" in err:
        if "Permission denied" in err:
            return (f"{target} refused authentication ({last}); edgekd uses your SSH keys and config only "
                    "(BatchMode, never a password): add your key with ssh-copy-id or an IdentityFile in ~/.ssh/config")
        if "Connection refused" in err or "No route" in err or "Could not resolve" in err or "timed out" in err:
            return f"cannot reach {target}: {last}"
        if "Host key verification failed" in err:
            return f"{target}: host key not known or changed ({last}); connect once with ssh to accept it"
    return f"{doing} {target} failed: {last}"


def quote(text: object) -> str:
    """``text`` quoted for the device's shell (one word, nothing run)."""
    return shlex.quote(str(text))
