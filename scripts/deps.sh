# Sourced by test.sh and bench.sh: tpattn_install_deps PACKAGE... installs the Debian packages
# that are missing (apt-get update first, only when something is missing; sudo only when not root).

tpattn_install_deps() {
  if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
    echo "tpattn: not a Debian-like system; make sure these are installed: $*" >&2
    return 0
  fi

  local missing=() package
  for package in "$@"; do
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
      missing+=("$package")
    fi
  done
  if [[ ${#missing[@]} -eq 0 ]]; then
    return 0
  fi

  local sudo=()
  if [[ $(id -u) -ne 0 ]]; then
    if ! command -v sudo >/dev/null 2>&1; then
      echo "tpattn: missing packages ${missing[*]} and no sudo; install them as root" >&2
      return 1
    fi
    sudo=(sudo)
  fi
  echo "tpattn: installing ${missing[*]}"
  "${sudo[@]}" apt-get update
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y --no-install-recommends "${missing[@]}"
}

# Workflow presets need CMake >= 3.25 (Debian 12 ships 3.25.1).
tpattn_check_cmake() {
  local version
  version=$(cmake --version | head -n1 | awk '{print $3}')
  if ! printf '3.25.0\n%s\n' "$version" | sort -V -C; then
    echo "tpattn: CMake $version is too old; CMakePresets.json needs 3.25 or newer" >&2
    return 1
  fi
}
