#!/usr/bin/env bash
# Checks deploy/compose.yaml and the files it mounts (deploy/compose/*, deploy/prometheus/
# alerts.yml, deploy/grafana/agora.json) without running anything: no container engine, no
# image pulled or built.
#
#   bash scripts/check-compose.sh [COMPOSE_FILE]
#
# - `docker-compose config` (Debian's 1.29, installed when missing) validates the file against
#   the Compose schema: an unknown or misspelt key, a wrong type, a service or volume named but
#   not defined fail. `docker compose config` (v2) runs too where that plugin is installed.
#   Keep the file within what 1.29 knows (no top-level `name:`, no `include:`, no
#   healthcheck `start_interval`).
# - `promtool check config` on prometheus.yml laid out as the prometheus service mounts it, so
#   its rule_files (the alert rules) must resolve where they would be in the container.
# - `nats-server -t` on the NATS configuration each NATS service mounts, with its server name.
# - Consistency: the agora services use three-replica streams and the three NATS servers by
#   service name, distinct node ids and data volumes, a stop_grace_period above the node's
#   shutdown_timeout_secs; every image pinned to a version tag (only our own agora image may
#   be `latest`, and only with a `build:`); every scrape target a service of the file, on the
#   port that service serves, in the jobs the alert rules name; Grafana's data source and the
#   dashboard's data source variable agree; every bind-mounted file exists; no host port is
#   published twice.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

file="${1:-deploy/compose.yaml}"
[ -f "$file" ] || { echo "no such file: $file" >&2; exit 1; }
need_compose
need_promtool
need_nats_server

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "==> docker-compose config ($(docker-compose version --short 2>/dev/null || echo '?')): $file"
docker-compose -f "$file" config >"$tmp/config.yaml"
if docker compose version >/dev/null 2>&1; then
  echo "==> docker compose config ($(docker compose version --short 2>/dev/null || echo '?')): $file"
  docker compose -f "$file" config --quiet
fi

# A Python with PyYAML: Debian's python3 has it once docker-compose is installed.
py=""
for candidate in python3 /usr/bin/python3; do
  if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import yaml' 2>/dev/null; then
    py="$candidate"
    break
  fi
done
[ -n "$py" ] || { echo "no python3 with the yaml module (Debian: apt-get install python3-yaml)" >&2; exit 1; }

echo "==> consistency of $file"
"$py" - "$tmp/config.yaml" "$tmp" <<'PY'
import json, os, re, shlex, shutil, sys
from urllib.parse import urlparse

import yaml

config_path, tmp = sys.argv[1], sys.argv[2]
cfg = yaml.safe_load(open(config_path))
services = cfg.get("services") or {}
errors = []


def err(msg):
    errors.append(msg)


# What the image sets (Dockerfile): AGORA_HTTP_PORT=9464, so `agora node` serves HTTP there
# unless told otherwise, and its HEALTHCHECK probes that port (AGORA_HISTORY__HTTP_PORT first).
IMAGE_HTTP_PORT = 9464
DATA_DIR = "/var/lib/agora"
default_toml = open("config/default.toml").read()
SHUTDOWN_SECS = int(re.search(r"^shutdown_timeout_secs\s*=\s*(\d+)", default_toml, re.M).group(1))


def environment(svc):
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, "") for e in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def command(svc):
    c = svc.get("command") or []
    return shlex.split(c) if isinstance(c, str) else [str(a) for a in c]


def flag(args, *names):
    for i, a in enumerate(args):
        for n in names:
            if a == n and i + 1 < len(args):
                return args[i + 1]
            if a.startswith(n + "="):
                return a[len(n) + 1:]
    return None


def repo_tag(image):
    """('docker.io/library/nats', '2.15.1'); tag None when there is none, 'digest' for @sha256."""
    if "@" in image:
        return image.split("@", 1)[0], "digest"
    name, _, tag = image.rpartition(":")
    if name and "/" not in tag:
        return name, tag
    return image, None


def basename(repo):
    return repo.rsplit("/", 1)[-1]


def mounts(svc):
    """[(kind, source, target)]: kind 'bind' or 'volume'."""
    out = []
    for v in svc.get("volumes") or []:
        if isinstance(v, dict):
            out.append((v.get("type", "volume"), v.get("source"), v.get("target")))
            continue
        parts = v.split(":")
        if len(parts) == 1:
            out.append(("volume", None, parts[0]))
            continue
        source, target = parts[0], parts[1]
        kind = "bind" if source.startswith(("/", ".", "~")) else "volume"
        out.append((kind, source, target))
    return out


def duration_secs(text):
    if text is None:
        return 10.0  # Compose's default
    if isinstance(text, (int, float)):
        return float(text)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    total, rest = 0.0, str(text)
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", rest):
        total += float(number) * units[unit]
    return total


def published(svc):
    """[(host_ip, host_port, container_port)]"""
    out = []
    for p in svc.get("ports") or []:
        if isinstance(p, dict):
            out.append((p.get("host_ip", ""), str(p.get("published", "")), str(p.get("target"))))
            continue
        p = str(p).split("/")[0]
        parts = p.split(":")
        if len(parts) == 3:
            out.append((parts[0], parts[1], parts[2]))
        elif len(parts) == 2:
            out.append(("", parts[0], parts[1]))
        else:
            out.append(("", "", parts[0]))
    return out


for name, svc in services.items():
    image = svc.get("image")
    if not image:
        err(f"service {name}: no image (every service names its image, pinned to a version)")
        continue
    repo, tag = repo_tag(image)
    if tag is None or tag == "latest":
        if basename(repo) == "agora" and "build" in svc:
            pass  # our own image, built here
        else:
            err(f"service {name}: image {image} is not pinned to a version tag")
    for kind, source, target in mounts(svc):
        if kind == "bind" and not os.path.exists(source):
            err(f"service {name}: mounts {source} at {target}, which does not exist "
                "(the engine would mount an empty directory)")
        if kind == "volume" and source and source not in (cfg.get("volumes") or {}):
            err(f"service {name}: volume {source} is not declared under volumes:")

seen_ports = {}
for name, svc in services.items():
    for host_ip, host_port, _ in published(svc):
        if not host_port:
            continue
        key = (host_ip or "0.0.0.0", host_port)
        if key in seen_ports:
            err(f"host port {host_port} is published by both {seen_ports[key]} and {name}")
        seen_ports[key] = name

nats = {n: s for n, s in services.items()
        if s.get("image") and basename(repo_tag(s["image"])[0]) == "nats"}
agora = {n: s for n, s in services.items()
         if s.get("image") and basename(repo_tag(s["image"])[0]) == "agora"}
nodes = {n: s for n, s in agora.items() if command(s)[:1] == ["node"]}
histories = {n: s for n, s in agora.items() if command(s)[:1] == ["history"]}

if len(nats) != 3:
    err(f"expected three NATS servers, found {len(nats)}: {sorted(nats)}")
if len(nodes) < 3:
    err(f"expected three `agora node` services (command: node ...), found {sorted(nodes)}")
if not histories:
    err("no `agora history` service (command: history ...)")


def http_port(name):
    svc = services[name]
    if name in agora:
        args = command(svc)
        port = flag(args, "--http-port") or environment(svc).get("AGORA_HTTP_PORT")
        if port is None and args[:1] == ["history"]:
            port = environment(svc).get("AGORA_HISTORY__HTTP_PORT")
        if port is None and args[:1] == ["node"]:
            port = IMAGE_HTTP_PORT
        return int(port) if port not in (None, "") else None
    return None


node_ids, node_volumes, notes = {}, {}, []
for name, svc in agora.items():
    env, args = environment(svc), command(svc)
    if "build" not in svc:
        err(f"service {name}: no build: (the agora image is built from the repository)")
    else:
        build = svc["build"] if isinstance(svc["build"], dict) else {"context": svc["build"]}
        dockerfile = os.path.join(build.get("context", "."), build.get("dockerfile", "Dockerfile"))
        if not os.path.isfile(dockerfile) and dockerfile not in notes:
            notes.append(dockerfile)
            print(f"  note: {dockerfile} does not exist (yet): `up --build` needs it, "
                  "`up` alone an agora:latest made by scripts/image.sh")
    url = env.get("AGORA_NATS_URL") or flag(args, "--nats-url") or ""
    urls = [u.strip() for u in url.split(",") if u.strip()]
    hosts = [urlparse(u).hostname for u in urls]
    if len(urls) != 3 or sorted(hosts) != sorted(nats):
        err(f"service {name}: NATS URLs {urls} are not the three NATS services {sorted(nats)}")
    for u in urls:
        if urlparse(u).port not in (None, 4222):
            err(f"service {name}: {u}: the NATS services listen on 4222")
    replicas = env.get("AGORA_STREAMS__REPLICAS")
    if replicas != "3":
        err(f"service {name}: AGORA_STREAMS__REPLICAS is {replicas!r}, not 3")
    shutdown = int(env.get("AGORA_SHUTDOWN_TIMEOUT_SECS") or SHUTDOWN_SECS)
    grace = duration_secs(svc.get("stop_grace_period"))
    if grace <= shutdown:
        err(f"service {name}: stop_grace_period {grace:g} s is not above shutdown_timeout_secs "
            f"({shutdown} s): a stopping node would be killed before it flushes")
    # The image's HEALTHCHECK probes /health on AGORA_HISTORY__HTTP_PORT, else AGORA_HTTP_PORT
    # (9464 in the image): it must be the port the process serves.
    probed = env.get("AGORA_HISTORY__HTTP_PORT") or env.get("AGORA_HTTP_PORT") or str(IMAGE_HTTP_PORT)
    if "healthcheck" not in svc and str(http_port(name)) != probed:
        err(f"service {name}: serves HTTP on {http_port(name)} but the image's healthcheck probes "
            f"{probed} (set AGORA_HISTORY__HTTP_PORT or AGORA_HTTP_PORT to match)")
    if name in nodes:
        node_id = env.get("AGORA_NODE_ID") or flag(args, "--node-id")
        if not node_id:
            err(f"service {name}: no AGORA_NODE_ID")
        elif node_id in node_ids:
            err(f"services {node_ids[node_id]} and {name} have the same node id {node_id}")
        else:
            node_ids[node_id] = name
        data_dir = env.get("AGORA_DATA_DIR") or flag(args, "--data-dir") or DATA_DIR
        vols = [s for k, s, t in mounts(svc) if k == "volume" and t == data_dir and s]
        if not vols:
            err(f"service {name}: no named volume at its data dir {data_dir}")
        for v in vols:
            if v in node_volumes:
                err(f"services {node_volumes[v]} and {name} share the data volume {v}")
            node_volumes[v] = name
        endpoint = env.get("AGORA_TRACING__ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        if endpoint and urlparse(endpoint).hostname not in services:
            err(f"service {name}: tracing endpoint {endpoint} is not a service of the file")
    if name in histories:
        db = env.get("AGORA_HISTORY__DATABASE") or flag(args, "--database") or ""
        host = urlparse(db).hostname
        if host and host not in services:
            err(f"service {name}: its database host {host} is not a service of the file")

# NATS: the configuration each server mounts, its routes and its store.
nats_checks = []
for name, svc in nats.items():
    args = command(svc)
    conf_target = flag(args, "--config", "-c")
    binds = {t: s for k, s, t in mounts(svc) if k == "bind"}
    if not conf_target or conf_target not in binds:
        err(f"service {name}: its --config {conf_target} is not a file mounted into it")
        continue
    server_name = environment(svc).get("NATS_SERVER_NAME", "")
    nats_checks.append((server_name, binds[conf_target]))
    conf = open(binds[conf_target]).read()
    routes = re.findall(r"nats-route://([A-Za-z0-9_.-]+):(\d+)", conf)
    if sorted(h for h, _ in routes) != sorted(nats):
        err(f"{binds[conf_target]}: routes {[h for h, _ in routes]} are not the NATS services {sorted(nats)}")
    store = re.search(r"store_dir\s*[:=]\s*\"?([^\s\"]+)", conf)
    volume_targets = [t for k, s, t in mounts(svc) if k == "volume"]
    if not store or not any(store.group(1) == t or store.group(1).startswith(t.rstrip("/") + "/")
                            for t in volume_targets):
        err(f"service {name}: JetStream's store_dir is not on a volume of the service")
names = [n for n, _ in nats_checks]
if len(set(names)) != len(names) or "" in names:
    err(f"the NATS services need distinct NATS_SERVER_NAMEs, have {names}")
with open(os.path.join(tmp, "nats-checks"), "w") as f:
    for server_name, source in nats_checks:
        f.write(f"{server_name}\t{source}\n")

# Prometheus: prometheus.yml laid out as mounted, every target a service on its port.
prom = {n: s for n, s in services.items()
        if s.get("image") and basename(repo_tag(s["image"])[0]) == "prometheus"}
if len(prom) != 1:
    err(f"expected one prometheus service, found {sorted(prom)}")
for name, svc in prom.items():
    target = flag(command(svc), "--config.file") or "/etc/prometheus/prometheus.yml"
    binds = {t: s for k, s, t in mounts(svc) if k == "bind"}
    if target not in binds:
        err(f"service {name}: its --config.file {target} is not mounted")
        continue
    layout = os.path.join(tmp, "prometheus")
    for t, s in binds.items():
        dest = os.path.join(layout, t.lstrip("/"))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        if os.path.isdir(s):
            shutil.copytree(s, dest, dirs_exist_ok=True)
        elif os.path.exists(s):
            shutil.copy(s, dest)
    with open(os.path.join(tmp, "prometheus-config"), "w") as f:
        f.write(os.path.join(layout, target.lstrip("/")))
    pcfg = yaml.safe_load(open(binds[target])) or {}
    jobs = {}
    for sc in pcfg.get("scrape_configs") or []:
        for st in sc.get("static_configs") or []:
            for t in st.get("targets") or []:
                host, _, port = t.rpartition(":")
                jobs.setdefault(sc.get("job_name"), []).append(host)
                if host not in services:
                    err(f"prometheus.yml: target {t} (job {sc.get('job_name')}) is not a service of the file")
                    continue
                want = http_port(host)
                if want is not None and str(want) != port:
                    err(f"prometheus.yml: target {t}: {host} serves its metrics on {want}")
    if sorted(jobs.get("agora", [])) != sorted(nodes):
        err(f"prometheus.yml: job agora scrapes {jobs.get('agora', [])}, the nodes are {sorted(nodes)}")
    if sorted(jobs.get("agora-history", [])) != sorted(histories):
        err(f"prometheus.yml: job agora-history scrapes {jobs.get('agora-history', [])}, "
            f"the history processes are {sorted(histories)}")
    for rule_file in pcfg.get("rule_files") or []:
        mounted = binds.get(os.path.join(os.path.dirname(target), rule_file))
        rules_text = open(mounted).read() if mounted else ""
        for job in sorted(set(re.findall(r'job="([^"]+)"', rules_text))):
            if job not in jobs:
                err(f"the alert rules look at job {job}, which prometheus.yml does not scrape")

# Grafana: the provisioned data sources, and what the mounted dashboards ask for.
grafana = {n: s for n, s in services.items()
           if s.get("image") and basename(repo_tag(s["image"])[0]) == "grafana"}
for name, svc in grafana.items():
    binds = {t: s for k, s, t in mounts(svc) if k == "bind"}

    def files_under(container_dir, suffixes):
        out = []
        for t, s in binds.items():
            if t == container_dir and os.path.isdir(s):
                out += [os.path.join(s, f) for f in sorted(os.listdir(s)) if f.endswith(suffixes)]
            elif t.startswith(container_dir.rstrip("/") + "/") and t.endswith(suffixes):
                out.append(s)
        return out

    sources = []
    for f in files_under("/etc/grafana/provisioning/datasources", (".yml", ".yaml")):
        sources += (yaml.safe_load(open(f)) or {}).get("datasources") or []
    if not sources:
        err(f"service {name}: no data source provisioned")
    for ds in sources:
        host = urlparse(ds.get("url", "")).hostname
        if host not in services:
            err(f"grafana data source {ds.get('name')}: {ds.get('url')} is not a service of the file")
    dashboards = []
    for f in files_under("/etc/grafana/provisioning/dashboards", (".yml", ".yaml")):
        for provider in (yaml.safe_load(open(f)) or {}).get("providers") or []:
            path = (provider.get("options") or {}).get("path")
            found = files_under(path, (".json",)) if path else []
            if not found:
                err(f"grafana dashboard provider {provider.get('name')}: nothing mounted at {path}")
            dashboards += found
    if not any(os.path.realpath(d) == os.path.realpath("deploy/grafana/agora.json") for d in dashboards):
        err(f"service {name}: deploy/grafana/agora.json is not provisioned")
    for d in dashboards:
        if not os.path.isfile(d):
            continue  # reported with the mounts
        dash = json.load(open(d))
        variables = {v.get("name"): v for v in (dash.get("templating") or {}).get("list") or []}
        refs = []

        def walk(node):
            if isinstance(node, dict):
                ds = node.get("datasource")
                if isinstance(ds, dict):
                    refs.append(ds)
                elif isinstance(ds, str):
                    refs.append({"uid": ds})
                for v in node.values():
                    walk(v)
            elif isinstance(node, list):
                for v in node:
                    walk(v)

        walk(dash)
        for ref in refs:
            uid = ref.get("uid") or ""
            m = re.fullmatch(r"\$\{?(\w+)\}?", uid)
            if m:
                var = variables.get(m.group(1))
                if not var or var.get("type") != "datasource":
                    err(f"{d}: data source {uid} is not a data source variable of the dashboard")
                    continue
                kind = var.get("query")
                if not any(ds.get("type") == kind for ds in sources):
                    err(f"{d}: variable {m.group(1)} wants a {kind} data source; none is provisioned")
                elif not any(ds.get("type") == kind and ds.get("isDefault") for ds in sources):
                    err(f"{d}: variable {m.group(1)} picks the default {kind} data source; none is the default")
            elif uid and not any(ds.get("uid") == uid for ds in sources):
                err(f"{d}: data source uid {uid} is not provisioned")

if errors:
    for e in dict.fromkeys(errors):
        print(f"  FAILED: {e}", file=sys.stderr)
    sys.exit(1)
print(f"  ok: {len(services)} services; nodes {sorted(nodes)}, history {sorted(histories)}, "
      f"NATS {sorted(nats)}; images pinned; scrape targets, mounts and data sources consistent")
PY

echo "==> promtool check config (as mounted in the prometheus service)"
promtool check config "$(cat "$tmp/prometheus-config")"

while IFS=$'\t' read -r name conf; do
  echo "==> nats-server -t: $conf as $name"
  NATS_SERVER_NAME="$name" nats-server -t -c "$conf"
done <"$tmp/nats-checks"

echo "compose checks passed"
