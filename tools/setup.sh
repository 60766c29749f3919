#!/usr/bin/env bash
# Idempotent set-up of a fresh Debian 12 machine (as root) for lanekit:
# system packages, then a virtual environment in the checkout with lanekit installed.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"

apt_packages=(
  python3 python3-venv python3-dev gcc pkg-config
  fuse3 libfuse3-dev
  qemu-system-x86 qemu-utils libnbd-bin python3-libnbd nbdkit nbdkit-plugin-python python3-boto3
  e2fsprogs busybox-static util-linux kmod
  s3backer fio
  qemu-guest-agent debootstrap git
  nftables iproute2
)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv .venv
fi
stamp=.venv/.lanekit-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[test]'
  touch "$stamp"
fi
