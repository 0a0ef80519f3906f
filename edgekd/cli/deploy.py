"""``edgekd deploy BUNDLE ssh://host[:DIR]``: install a bundle on a device, atomically, verified by checksum.

The bundle is copied into a hidden temporary folder beside its destination and checked there by the
device's own Python and runtime (``device_runner.py check``: sha256 sums, load and compile, one batch,
and the manifest's parity images where ``edgekd export --target`` recorded them); only then is it
renamed into place, so a half-copied bundle, or one that does not run or agree on this device, is never
where a program on the device would look for it.
"""

import json
import logging
import os
import shlex
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from .. import EdgeKDError
from ..base import ssh
from ..base.errors import BundleError
from ..base.jsonrec import read_json
from ..bench.remote import check_device
from ..bundle.assemble import runner_source
from ..bundle.card import CARD_FILE, record_deploy
from ..bundle.checks import MANIFEST_FILE, RUNTIME_PACKAGE
from ..bundle.manifest import verify
from ..export.target import DeviceEnv

log = logging.getLogger(__name__)
DEFAULT_FOLDER = "edgekd-bundles"  # relative to the device user's home
RUNNER_NAME = "edgekd_device_runner.py"


@dataclass(frozen=True)
class Checked:
    """What the device runner's ``check`` reports (its JSON line, read here)."""

    output_shape: Optional[List[Any]] = None
    parity_images: Optional[int] = None


def check_on_device(target: ssh.Target, runner: str, staging: str, name: str, timeout: int) -> Dict[str, Any]:
    """The runner's ``check`` on the device (its JSON, {} when only the checksums could be checked); a bundle that
    fails it is refused with the device's own error."""
    q = ssh.quote
    try:
        out = ssh.run(target, f"{q(target.python)} {q(runner)} check {q(staging)}", timeout)
    except EdgeKDError as e:
        why = str(e).split(" failed: ", 1)[-1].replace("edgekd device runner: error: ", "")
        if " is not installed here: pip install " not in why:
            raise EdgeKDError(f"{target} refused bundle {name!r}, nothing installed: {why}") from e
        # installing a runtime later is the user's business: the bundle is checked as far as this Python can
        log.warning("%s with %s cannot load the bundle (%s); checked its sha256 sums only (--python names the "
                    "device's Python with the runtime)", target, target.python, why)
        ssh.run(target, f"{q(target.python)} {q(runner)} verify {q(staging)}", timeout)
        return {}
    result = json.loads(out.decode())
    checked = read_json(Checked, result) or Checked()
    log.info("checked on %s: output %s%s", target, checked.output_shape,
             f", {checked.parity_images} parity images agree" if checked.parity_images else "")
    return dict(result)


def deploy(bundle: str, url: str, ssh_config: Optional[str] = None, timeout: int = ssh.DEFAULT_TIMEOUT_S,
           python: Optional[str] = None) -> Tuple[ssh.Target, str, DeviceEnv]:
    """Install ``bundle`` on the device; return (target, remote bundle path, device environment)."""
    if not os.path.isdir(bundle):
        raise EdgeKDError(f"bundle folder {bundle!r} does not exist")
    try:
        manifest = verify(bundle)  # never ship a bundle that is already broken here
    except BundleError as e:
        raise EdgeKDError(f"bundle {bundle!r}: {e}") from e
    target = ssh.parse_target(url, ssh_config)
    if python:
        ssh.check_path(url, "python path", python)
        target.python = python
    check_device(target, timeout)
    folder = (target.folder or DEFAULT_FOLDER).rstrip("/") or "/"
    name = os.path.basename(os.path.normpath(bundle))
    dest = f"{folder}/{name}"
    q = ssh.quote
    staging = ssh.run(target, f"mkdir -p {q(folder)} && mktemp -d {q(folder + '/.' + name + '.tmp-XXXXXX')}",
                      timeout).decode().strip()
    tools = staging + ".runner"  # the runner beside the bundle, not in it: a bundle is exactly its listed files
    try:
        files = [os.path.join(bundle, f) for f in list(manifest.files) + [MANIFEST_FILE]]
        ssh.copy_to(target, files, staging, timeout)
        ssh.run(target, f"mkdir {q(tools)}", timeout)
        runner = f"{tools}/{RUNNER_NAME}"
        ssh.run(target, f"cat > {q(runner)}", timeout, input_bytes=runner_source().encode())
        checked = check_on_device(target, runner, staging, name, timeout)
        # MODEL_CARD.md notes where it was installed and checked, in the bundle here and in the copy there
        there = json.loads(ssh.run(target, f"{q(target.python)} {q(runner)} env", timeout).decode())
        if record_deploy(bundle, str(target), dest, there, checked):
            ssh.copy_to(target, [os.path.join(bundle, n) for n in (CARD_FILE, MANIFEST_FILE)], staging, timeout)
            ssh.run(target, f"{q(target.python)} {q(runner)} verify {q(staging)}", timeout)
        ssh.run(target, f"mv {q(runner)} {q(folder + '/' + RUNNER_NAME)} && rmdir {q(tools)} && "
                        f"if [ -e {q(dest)} ]; then mv {q(dest)} {q(staging + '.old')}; fi && "
                        f"mv {q(staging)} {q(dest)} && rm -rf {q(staging + '.old')}", timeout)
    except BaseException:
        try:
            ssh.run(target, f"rm -rf {q(staging)} {q(tools)}", 60)
        except EdgeKDError:
            pass
        raise
    env = DeviceEnv.from_json(ssh.run(target, f"{q(target.python)} {q(folder + '/' + RUNNER_NAME)} env",
                                      timeout).decode())
    package = RUNTIME_PACKAGE.get(manifest.format)
    if package and package not in (env.versions or {}):
        log.warning("%s is not installed on %s: pip install %s", package, target, package)
    return target, dest, env


def run_hint(python: str, runner: str, bundle: str) -> str:
    """The line to paste into the device's shell to run the bundle: every name shell-quoted (spaces, $, quotes
    in a folder or a Python path stay one word and run nothing)."""
    q = shlex.quote
    return f"{q(python)} {q(runner)} predict {q(bundle)} IMAGE..."
