#!/usr/bin/env bash
# Install the system packages the napari GUI tests need: a virtual X server (Xvfb) and Mesa's
# software OpenGL (Qt's "offscreen" platform is not enough: vispy needs an OpenGL context).
# Idempotent: does nothing when everything is already installed. Exits non-zero, with a message
# saying why, when the packages cannot be installed (the GUI tests then skip themselves and say so).
set -euo pipefail

PACKAGES=(
  xvfb libgl1-mesa-dri libglx-mesa0 libegl1 libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0
  libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 libxcb-xfixes0 libxcb-shape0
  libxcb-cursor0 libdbus-1-3
)

missing=()
if command -v dpkg-query >/dev/null 2>&1; then
  for p in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
      missing+=("$p")
    fi
  done
else
  echo "gui-deps: no dpkg on this machine (not Debian/Ubuntu); install Xvfb and Mesa OpenGL yourself" >&2
  exit 1
fi

if [ ${#missing[@]} -eq 0 ]; then
  echo "gui-deps: all GUI test packages are installed"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "gui-deps: need root (or passwordless sudo) to install: ${missing[*]}" >&2
    exit 1
  fi
fi

echo "gui-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get update -qq; then
  echo "gui-deps: 'apt-get update' failed (no network or no package mirror?); cannot install ${missing[*]}" >&2
  exit 1
fi
if ! $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"; then
  echo "gui-deps: 'apt-get install' failed for: ${missing[*]}" >&2
  exit 1
fi
command -v Xvfb >/dev/null 2>&1 || { echo "gui-deps: Xvfb still not found after the install" >&2; exit 1; }
echo "gui-deps: done"
