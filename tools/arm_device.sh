#!/usr/bin/env bash
# An emulated ARM64 (aarch64) edge device on an x86-64 Linux machine, reachable over SSH on loopback.
#
#   tools/arm_device.sh start    build the device once (cached), start its sshd, print how to reach it
#   tools/arm_device.sh stop     stop the sshd this script started and unmount what it mounted
#   tools/arm_device.sh status   say whether it runs (exit 0) or not (exit 3)
#   tools/arm_device.sh build    only build (or check) the cached device
#
# The device is a Debian bookworm arm64 root file system (debootstrap, minbase) with Python 3, numpy and
# OpenSSH, plus a virtual environment /opt/edgekd-venv holding the aarch64 wheels of onnxruntime,
# openvino and Pillow. Its programs run through qemu-user-static and binfmt_misc, in a chroot: that needs
# root and binfmt_misc; where either is missing the script says so in one line and exits 2.
# It is built once into $EDGEKD_ARM_CACHE (default /var/cache/edgekd-arm, outside any checkout; about
# 700 MB, 4-8 minutes) and reused. Its /proc/cpuinfo is an aarch64 one that says it is emulated: under
# qemu 7.2 the host's x86 cpuinfo makes `import onnxruntime` crash, and edgekd's device runner reads the
# marker to label its rows `emulated: qemu` (emulated timings are not latency).
#
# After `start`, $EDGEKD_ARM_CACHE/run/ holds ssh_config (Host edgekd-arm, user root, generated keys)
# and device.env (the values as shell assignments, read by the tests).
set -euo pipefail

CACHE=${EDGEKD_ARM_CACHE:-/var/cache/edgekd-arm}
ROOT=$CACHE/rootfs
RUN=$CACHE/run
VENV=/opt/edgekd-venv
SUITE=bookworm
ALIAS=edgekd-arm
PACKAGES=python3,python3-venv,python3-numpy,openssh-server,ca-certificates
WHEELS="onnxruntime openvino pillow numpy"

die() { echo "arm_device: $*" >&2; exit 2; }
log() { echo "arm_device: $*" >&2; }

check_host() {
  [ "$(uname -s)" = Linux ] || die "needs Linux (binfmt_misc), this is $(uname -s)"
  [ "$(id -u)" = 0 ] || die "needs root (chroot, mounts, binfmt_misc); run it with sudo"
  case "$(uname -m)" in aarch64|arm64) die "this machine is ARM64 already: use it (or a real board) as the device";; esac
  local qemu
  qemu=$(command -v qemu-aarch64-static || true)
  [ -n "$qemu" ] || die "needs qemu-user-static (apt-get install qemu-user-static binfmt-support)"
  command -v debootstrap >/dev/null || [ -f "$ROOT/.edgekd-ready" ] || die "needs debootstrap (apt-get install debootstrap)"
  command -v ssh-keygen >/dev/null && command -v ssh >/dev/null || die "needs the OpenSSH client (apt-get install openssh-client)"
  local bm=/proc/sys/fs/binfmt_misc
  if [ ! -e $bm/register ]; then
    mount -t binfmt_misc binfmt_misc $bm 2>/dev/null || die "needs binfmt_misc, and it cannot be mounted here (mount -t binfmt_misc binfmt_misc $bm failed)"
  fi
  if [ ! -e $bm/qemu-aarch64 ]; then
    if command -v update-binfmts >/dev/null; then update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true; fi
    if [ ! -e $bm/qemu-aarch64 ]; then  # register it by hand, the way qemu-user-static's binfmt file does (F: fixed interpreter, works in a chroot)
      echo ':qemu-aarch64:M::\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:'"$qemu"':FP' \
        > $bm/register 2>/dev/null || die "cannot register qemu-aarch64 with binfmt_misc"
    fi
  fi
  grep -q '^enabled' $bm/qemu-aarch64 || echo 1 > $bm/qemu-aarch64
  grep -q '^flags:.*F' $bm/qemu-aarch64 || die "binfmt_misc's qemu-aarch64 entry lacks the F flag, so it cannot run programs in a chroot (reinstall qemu-user-static)"
}

# The Debian mirror of this machine's own apt sources (deb822 or one-line format).
mirror() {
  local m
  m=$(grep -hsE '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
      | grep -oE '(https?|file)://[^ ]*debian/?' | grep -v -- '-security' | head -n1 || true)
  echo "${m:-http://deb.debian.org/debian}"
}

# An aarch64 /proc/cpuinfo (one block per host core) whose model name says it is emulated.
write_cpuinfo() {
  local n i
  n=$(nproc)
  for ((i = 0; i < n; i++)); do
    printf 'processor\t: %d\nmodel name\t: ARMv8 (emulated: qemu-aarch64 user mode on %s)\nBogoMIPS\t: 50.00\n' "$i" "$(uname -m)"
    printf 'Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\n'
    printf 'CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x3\nCPU part\t: 0xd0c\nCPU revision\t: 1\n\n'
  done > "$CACHE/cpuinfo"
}

# glibc of the device -> every manylinux tag pip may pick for it (pip's --platform matches tags exactly).
platform_args() {
  local glibc minor args="--platform manylinux2014_aarch64"
  glibc=$(chroot "$ROOT" ldd --version | head -n1 | grep -oE '[0-9]+\.[0-9]+$')
  for ((minor = 17; minor <= ${glibc#2.}; minor++)); do args="$args --platform manylinux_2_${minor}_aarch64"; done
  echo "$args"
}

build() {
  if [ -f "$ROOT/.edgekd-ready" ]; then
    return
  fi
  mkdir -p "$CACHE"
  local partial=$CACHE/rootfs.partial t0=$SECONDS
  if [ ! -f "$partial/.debootstrap-done" ]; then
    if grep -qs " $partial/" /proc/self/mounts; then die "$partial has mounts; unmount them first"; fi
    rm -rf "$partial"
    log "building the ARM64 device in $CACHE (debootstrap $SUITE arm64 from $(mirror); 4-8 minutes, once)"
    debootstrap --arch=arm64 --variant=minbase --include=$PACKAGES $SUITE "$partial" "$(mirror)" \
      > "$CACHE/debootstrap.log" 2>&1 || die "debootstrap failed: $(tail -n1 "$CACHE/debootstrap.log") (log: $CACHE/debootstrap.log)"
    touch "$partial/.debootstrap-done"
  fi
  ROOT=$partial
  log "installing onnxruntime, openvino and Pillow (aarch64 wheels) into $VENV"
  local py wheels=$CACHE/wheels
  py=$(chroot "$ROOT" python3 -c 'import sys; print("%d%d" % sys.version_info[:2])')
  rm -rf "$wheels" "$ROOT$VENV"
  # The wheels are fetched and unpacked by this machine's pip (fast) for the device's platform; the venv
  # itself is made by the device's Python, so its paths and interpreter are the device's.
  local device="--only-binary=:all: $(platform_args) --python-version $py --implementation cp --abi cp$py"
  python3 -m pip download -q $device -d "$wheels" $WHEELS > "$CACHE/pip.log" 2>&1 \
    || die "pip download failed: $(tail -n1 "$CACHE/pip.log")"
  chroot "$ROOT" python3 -m venv --without-pip $VENV
  python3 -m pip install -q $device --no-deps --no-index --target "$ROOT$VENV/lib/python${py:0:1}.${py:1}/site-packages" \
    "$wheels"/*.whl >> "$CACHE/pip.log" 2>&1 || die "installing the wheels failed: $(tail -n1 "$CACHE/pip.log")"
  rm -rf "$ROOT$VENV/bin/"{onnxruntime*,ov*} 2>/dev/null || true  # console scripts with this machine's shebang
  rm -rf "$wheels"
  mkdir -p "$ROOT/run/sshd"
  ROOT=$CACHE/rootfs
  mv "$partial" "$ROOT"
  touch "$ROOT/.edgekd-ready"
  log "built in $((SECONDS - t0)) s: $(du -sh "$ROOT" | cut -f1)"
}

running() { [ -f "$RUN/sshd.pid" ] && kill -0 "$(cat "$RUN/sshd.pid")" 2>/dev/null; }

mount_one() {  # mount_one TARGET mount-args...: mount and remember it for stop
  local target=$1
  shift
  mount "$@" "$target"
  echo "$target" >> "$RUN/mounts"
}

unmount_all() {
  [ -f "$RUN/mounts" ] || return 0
  local m
  for m in $(tac "$RUN/mounts"); do
    if grep -qs " $m " /proc/self/mounts; then umount "$m" 2>/dev/null || umount -l "$m"; fi
  done
  rm -f "$RUN/mounts"
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
  if running; then
    log "already running (pid $(cat "$RUN/sshd.pid"))"
    show
    return
  fi
  unmount_all  # left over from a stop that never ran
  mkdir -p "$RUN"
  write_cpuinfo
  # A fresh proc instance (not a bind of the host's /proc) so the cpuinfo mount on top of it can never
  # propagate to the host's /proc/cpuinfo.
  mount_one "$ROOT/proc" -t proc proc
  mount --make-private "$ROOT/proc"
  mount_one "$ROOT/proc/cpuinfo" --bind "$CACHE/cpuinfo"
  mount_one "$ROOT/sys" -t sysfs -o ro sysfs  # onnxruntime's cpuinfo reads the CPU lists there
  mount --make-private "$ROOT/sys"
  mount_one "$ROOT/dev" --bind /dev
  mount --make-private "$ROOT/dev"
  [ -f "$RUN/host_key" ] || ssh-keygen -q -t ed25519 -N "" -f "$RUN/host_key"
  [ -f "$RUN/client_key" ] || ssh-keygen -q -t ed25519 -N "" -f "$RUN/client_key"
  install -m 600 "$RUN/host_key" "$ROOT/etc/ssh/edgekd_host_key"
  install -m 644 "$RUN/client_key.pub" "$ROOT/etc/ssh/edgekd_authorized_keys"
  local port
  port=$(free_port)
  cat > "$ROOT/etc/ssh/edgekd_sshd_config" <<EOF
Port $port
ListenAddress 127.0.0.1
HostKey /etc/ssh/edgekd_host_key
AuthorizedKeysFile /etc/ssh/edgekd_authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
PidFile none
Subsystem sftp internal-sftp
EOF
  mkdir -p "$ROOT/run/sshd"
  rm -f "$RUN/known_hosts"
  cat > "$RUN/ssh_config" <<EOF
Host $ALIAS
  HostName 127.0.0.1
  Port $port
  User root
  IdentityFile $RUN/client_key
  IdentitiesOnly yes
  UserKnownHostsFile $RUN/known_hosts
  StrictHostKeyChecking accept-new
EOF
  # sshd runs in the foreground (-D) under qemu in the chroot; its pid is the one stop kills.
  setsid chroot "$ROOT" /usr/sbin/sshd -D -e -f /etc/ssh/edgekd_sshd_config < /dev/null > "$RUN/sshd.log" 2>&1 &
  echo $! > "$RUN/sshd.pid"
  local i
  for ((i = 0; i < 150; i++)); do
    if ssh -F "$RUN/ssh_config" -o BatchMode=yes -o ConnectTimeout=5 $ALIAS true 2>/dev/null; then break; fi
    if ! running; then stop >/dev/null 2>&1; die "sshd did not start in the device: $(tail -n1 "$RUN/sshd.log")"; fi
    sleep 0.2
  done
  local machine
  machine=$(ssh -F "$RUN/ssh_config" -o BatchMode=yes $ALIAS uname -m 2>/dev/null) \
    || { stop >/dev/null 2>&1; die "sshd in the device does not answer: $(tail -n1 "$RUN/sshd.log")"; }
  [ "$machine" = aarch64 ] || { stop >/dev/null 2>&1; die "the device says it is $machine, not aarch64"; }
  cat > "$RUN/device.env" <<EOF
EDGEKD_ARM_HOST=$ALIAS
EDGEKD_ARM_PORT=$port
EDGEKD_ARM_SSH_CONFIG=$RUN/ssh_config
EDGEKD_ARM_KEY=$RUN/client_key
EDGEKD_ARM_KNOWN_HOSTS=$RUN/known_hosts
EDGEKD_ARM_PYTHON=$VENV/bin/python
EDGEKD_ARM_BARE_PYTHON=/usr/bin/python3
EDGEKD_ARM_ROOT=$ROOT
EOF
  show
}

show() {
  local port
  port=$(sed -n 's/^EDGEKD_ARM_PORT=//p' "$RUN/device.env")
  echo "ARM64 device (emulated, qemu) on 127.0.0.1:$port, pid $(cat "$RUN/sshd.pid"), root file system $ROOT"
  echo "  ssh -F $RUN/ssh_config $ALIAS"
  echo "  edgekd bench BUNDLE --device ssh://$ALIAS$VENV/bin/python --ssh-config $RUN/ssh_config"
  echo "  edgekd deploy BUNDLE ssh://$ALIAS:/root/models --ssh-config $RUN/ssh_config"
}

stop() {
  if running; then
    local pid
    pid=$(cat "$RUN/sshd.pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    # the sessions sshd forked for clients (in the device's root) end with their connections
  fi
  rm -f "$RUN/sshd.pid" "$RUN/device.env"
  unmount_all
  echo "ARM64 device stopped"
}

case "${1:-}" in
  start) check_host; exec 9> "$CACHE.lock" || die "cannot write $CACHE.lock"; flock 9; build; start ;;
  build) check_host; exec 9> "$CACHE.lock"; flock 9; build; echo "ARM64 device built in $ROOT" ;;
  stop) [ "$(id -u)" = 0 ] || die "needs root"; exec 9> "$CACHE.lock"; flock 9; stop ;;
  status) if running; then show; else echo "ARM64 device not running"; exit 3; fi ;;
  *) echo "usage: $0 start|stop|status|build" >&2; exit 2 ;;
esac
