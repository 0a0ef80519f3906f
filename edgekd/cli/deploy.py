"""``edgekd deploy BUNDLE ssh://host[:DIR]``: install a bundle on a device, atomically, verified by checksum.

The bundle is copied into a hidden temporary folder beside its destination, its sha256 sums are
checked on the device by the device's own Python, and only then is it renamed into place, so a
half-copied bundle is never where a program on the device would look for it.
"""

import json
import logging
import os

from .. import EdgeKDError
from ..base import ssh

log = logging.getLogger(__name__)
DEFAULT_FOLDER = "edgekd-bundles"  # relative to the device user's home
RUNNER_NAME = "edgekd_device_runner.py"


def deploy(bundle, url, ssh_config=None, timeout=ssh.DEFAULT_TIMEOUT_S):
    """Install ``bundle`` on the device; return (target, remote bundle path, device environment)."""
    from ..bundle.runner import MANIFEST_FILE, BundleError, RUNTIME_PACKAGE, verify
    from ..bench.remote import RUNNER, check_device

    if not os.path.isdir(bundle):
        raise EdgeKDError(f"bundle folder {bundle!r} does not exist")
    try:
        manifest = verify(bundle)  # never ship a bundle that is already broken here
    except BundleError as e:
        raise EdgeKDError(f"bundle {bundle!r}: {e}") from e
    target = ssh.parse_target(url, ssh_config)
    check_device(target, timeout)
    folder = (target.folder or DEFAULT_FOLDER).rstrip("/") or "/"
    name = os.path.basename(os.path.normpath(bundle))
    dest = f"{folder}/{name}"
    q = ssh.quote
    staging = ssh.run(target, f"mkdir -p {q(folder)} && mktemp -d {q(folder + '/.' + name + '.tmp-XXXXXX')}",
                      timeout).decode().strip()
    try:
        files = [os.path.join(bundle, f) for f in list(manifest["files"]) + [MANIFEST_FILE]]
        ssh.copy_to(target, files, staging, timeout)
        ssh.copy_to(target, [RUNNER], staging, timeout)
        runner = f"{staging}/{os.path.basename(RUNNER)}"
        ssh.run(target, f"{q(target.python)} {q(runner)} verify {q(staging)}", timeout)
        ssh.run(target, f"mv {q(runner)} {q(folder + '/' + RUNNER_NAME)} && "
                        f"if [ -e {q(dest)} ]; then mv {q(dest)} {q(staging + '.old')}; fi && "
                        f"mv {q(staging)} {q(dest)} && rm -rf {q(staging + '.old')}", timeout)
    except BaseException:
        try:
            ssh.run(target, f"rm -rf {q(staging)}", 60)
        except EdgeKDError:
            pass
        raise
    env = json.loads(ssh.run(target, f"{q(target.python)} {q(folder + '/' + RUNNER_NAME)} env", timeout).decode())
    package = RUNTIME_PACKAGE.get(manifest["format"])
    if package and package not in env["versions"]:
        log.warning("%s is not installed on %s: pip install %s", package, target, package)
    return target, dest, env
