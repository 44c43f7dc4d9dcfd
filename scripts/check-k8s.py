#!/usr/bin/env python3
"""Checks the Kubernetes manifests of deploy/k8s (or of the directory given), offline.

    python3 scripts/check-k8s.py [DIR]

- Every manifest (DIR/*.yaml but nats-values.yaml and kustomization.yaml; every document of
  a multi-document file) against the Kubernetes JSON schemas of KUBERNETES_VERSION, in strict
  mode (an unknown field fails), with kubernetes-validate (pip install
  kubernetes-validate==1.37.0; scripts/lib.sh need_kubernetes_validate). A duplicated key
  fails too, as it does with kubectl.
- kustomization.yaml lists exactly those manifests.
- Every TOML file held by a ConfigMap (the nodes' agora.toml, agora history's history.toml):
  each section and key must be one of config/default.toml's ([nats] has the fields of
  NatsOptions in src/bus/connect.rs, commented out in default.toml; [[markets]] tables are
  allowed, their keys are market specs and not checked here), with a value of the same type.
- The manifests agree with each other and with that configuration: ConfigMaps, config files
  and ports that workloads name exist; the HTTP port each process ends up with (its
  configuration's layers as the process reads them: config/default.toml, the --config file,
  AGORA_* variables from the image's ENV in the top-level Dockerfile then from the
  container's env, the --http-port flag) is the container's port `http`, its probes' and its
  prometheus.io/port annotation; no value of the --config file is silently replaced by the
  image's ENV; the node's shutdown_timeout_secs is below terminationGracePeriodSeconds;
  Services, PodDisruptionBudgets and the HorizontalPodAutoscaler select or target a workload
  of the folder (the autoscaled one with a CPU request). Skipped while a manifest fails its
  schema.
Exits 1 naming every problem found, 0 when there is none.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES_VERSION = "1.30.0"
KUBERNETES_VALIDATE_VERSION = "1.37.0"
NOT_MANIFESTS = {"nats-values.yaml", "kustomization.yaml"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet"}

try:
    import yaml
    import kubernetes_validate
    from kubernetes_validate.utils import (
        InvalidSchemaError,
        SchemaNotFoundError,
        ValidationError,
        VersionNotSupportedError,
    )
except ImportError as e:
    sys.exit(
        f"check-k8s: {e}: install kubernetes-validate first "
        f"(pip install kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}, "
        "or source scripts/lib.sh and run need_kubernetes_validate)"
    )


class UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key given twice in one mapping (kubectl does too)."""


def _construct_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping
)


class Checker:
    def __init__(self, directory: Path):
        self.dir = directory
        self.problems: list[str] = []
        self.notes: list[str] = []
        # (file name, document) of every manifest read.
        self.docs: list[tuple[str, dict]] = []

    def fail(self, where: str, what: str) -> None:
        self.problems.append(f"{where}: {what}")

    # ---- YAML and schemas -------------------------------------------------------------

    def load_yaml(self, path: Path) -> list | None:
        try:
            return [d for d in yaml.load_all(path.read_text(), Loader=UniqueKeyLoader) if d is not None]
        except (OSError, yaml.YAMLError) as e:
            self.fail(path.name, f"cannot read it as YAML: {e}")
            return None

    def manifests(self) -> list[Path]:
        return sorted(p for p in self.dir.glob("*.yaml") if p.name not in NOT_MANIFESTS)

    def check_schemas(self) -> None:
        files = self.manifests()
        if not files:
            self.fail(str(self.dir), "no manifest (*.yaml) found")
        for path in files:
            docs = self.load_yaml(path)
            if docs is None:
                continue
            if not docs:
                self.fail(path.name, "holds no document")
            for i, doc in enumerate(docs, 1):
                where = f"{path.name} (document {i})"
                if not isinstance(doc, dict) or not {"apiVersion", "kind"} <= doc.keys():
                    self.fail(where, "not a Kubernetes object (apiVersion and kind needed)")
                    continue
                name = (doc.get("metadata") or {}).get("name")
                where = f"{path.name}: {doc['kind']}/{name}"
                if not isinstance(name, str) or not name:
                    # The schemas leave metadata optional; the API server does not.
                    self.fail(f"{path.name} (document {i}, {doc['kind']})", "no metadata.name")
                    continue
                try:
                    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
                except ValidationError as e:
                    field = ".".join(str(p) for p in e.path) or "(top level)"
                    self.fail(where, f"{field}: {e.message} (Kubernetes {KUBERNETES_VERSION} schema, strict)")
                    continue
                except SchemaNotFoundError as e:
                    self.fail(where, e.message)
                    continue
                except (InvalidSchemaError, VersionNotSupportedError) as e:
                    self.fail(where, getattr(e, "message", str(e)))
                    continue
                # Only objects of a valid shape go on to the checks below.
                self.docs.append((path.name, doc))

    def check_kustomization(self) -> None:
        path = self.dir / "kustomization.yaml"
        if not path.exists():
            self.fail(str(self.dir), "no kustomization.yaml")
            return
        docs = self.load_yaml(path)
        if not docs:
            return
        listed = docs[0].get("resources") or []
        present = {p.name for p in self.manifests()}
        for name in listed:
            if name not in present:
                self.fail("kustomization.yaml", f"lists {name}, which is not in {self.dir}")
        for name in sorted(present - set(listed)):
            self.fail("kustomization.yaml", f"does not list {name}")

    # ---- the Agora configuration held by ConfigMaps --------------------------------------

    def defaults(self) -> tuple[dict, dict]:
        default = tomllib.loads((ROOT / "config" / "default.toml").read_text())
        # [nats] is commented out in default.toml: its keys are NatsOptions' fields.
        nats: dict[str, type] = {}
        source = (ROOT / "src" / "bus" / "connect.rs").read_text()
        m = re.search(r"pub struct NatsOptions \{(.*?)\n\}", source, re.S)
        if m:
            for field, rust in re.findall(r"pub (\w+): ([^,]+),", m.group(1)):
                nats[field] = bool if rust == "bool" else int if re.search(r"\b[ui]\d+\b", rust) else str
        return default, nats

    def check_configs(self) -> None:
        default, nats = self.defaults()
        for file, doc in self.docs:
            if doc.get("kind") != "ConfigMap":
                continue
            for key, text in (doc.get("data") or {}).items():
                if not key.endswith(".toml"):
                    continue
                where = f"{file}: ConfigMap/{doc['metadata']['name']}: {key}"
                try:
                    config = tomllib.loads(text)
                except tomllib.TOMLDecodeError as e:
                    self.fail(where, f"not valid TOML: {e}")
                    continue
                self.check_table(where, config, default, nats, [])

    def check_table(self, where, table, default, nats, path) -> None:
        for key, value in table.items():
            name = ".".join(path + [key])
            if not path and key == "nats":
                if not nats:
                    self.fail(where, "[nats]: NatsOptions not found in src/bus/connect.rs to check it against")
                elif not isinstance(value, dict):
                    self.fail(where, "nats must be a section ([nats])")
                else:
                    for k, v in value.items():
                        if k not in nats:
                            self.fail(where, f"unknown key nats.{k} (known: {', '.join(nats)})")
                        elif not isinstance(v, nats[k]) or (nats[k] is int and isinstance(v, bool)):
                            self.fail(where, f"nats.{k} = {v!r}: expected a {nats[k].__name__}")
                continue
            if not path and key == "markets":
                if not (isinstance(value, list) and all(isinstance(m, dict) for m in value)):
                    self.fail(where, "markets must be an array of tables ([[markets]]) or []")
                continue
            if key not in default:
                kind = "section" if isinstance(value, dict) else "key"
                known = ", ".join(k for k in default)
                self.fail(where, f"unknown {kind} {name} (config/default.toml has: {known})")
                continue
            expected = default[key]
            if isinstance(expected, dict):
                if not isinstance(value, dict):
                    self.fail(where, f"{name} must be a section ([{name}])")
                else:
                    self.check_table(where, value, expected, nats, path + [key])
            elif not same_type(value, expected):
                self.fail(where, f"{name} = {value!r}: expected {toml_type(expected)} like the default {expected!r}")

    # ---- consistency between manifests --------------------------------------------------

    def by_kind(self, kind: str) -> list[tuple[str, dict]]:
        return [(f, d) for f, d in self.docs if d.get("kind") == kind]

    def config_of(self, pod: dict, container: dict) -> tuple[dict, str | None]:
        """The Agora configuration file that the container's --config names, read from its
        ConfigMap ({} when there is none), and what is wrong with that reference."""
        args = container.get("args") or []
        if "--config" not in args or args.index("--config") + 1 >= len(args):
            return {}, None
        target = args[args.index("--config") + 1]
        volumes = {v["name"]: v for v in pod.get("volumes") or []}
        configmaps = {d["metadata"]["name"]: d for _, d in self.by_kind("ConfigMap")}
        for mount in container.get("volumeMounts") or []:
            prefix = mount["mountPath"].rstrip("/") + "/"
            volume = volumes.get(mount["name"], {})
            if not target.startswith(prefix) or "configMap" not in volume:
                continue
            rel = target[len(prefix):]
            source = volume["configMap"]
            cm = configmaps.get(source.get("name"))
            if cm is None:
                return {}, None  # the volume's check says so
            items = source.get("items")
            key = next((i["key"] for i in items if i["path"] == rel), None) if items else rel
            text = (cm.get("data") or {}).get(key) if key else None
            if text is None:
                return {}, f"--config {target}: ConfigMap {source.get('name')} has no such file"
            try:
                return tomllib.loads(text), None
            except tomllib.TOMLDecodeError:
                return {}, None  # check_configs says so
        return {}, f"--config {target} is on no ConfigMap volume mounted in the container"

    def image_env(self) -> dict[str, str]:
        """The ENV of the image's final stage (Dockerfile at the top of the repository)."""
        path = ROOT / "Dockerfile"
        if not path.exists():
            return {}
        text = re.sub(r"\\\n", " ", path.read_text())
        env: dict[str, str] = {}
        for line in text.splitlines():
            if line.startswith("FROM "):
                env = {}
            elif line.startswith("ENV "):
                env.update(re.findall(r"(\w+)=(\S+)", line))
        return env

    def effective(self, pod: dict, container: dict) -> tuple[dict, dict, list[str]]:
        """The container's Agora configuration as the process sees it, in its layers:
        config/default.toml, then the --config file, then AGORA_* variables (the image's ENV,
        then the container's env), then the flags read here (--http-port). Returns it, where
        each value that is not a default came from, and the problems: a bad --config, or a
        value of the file that the image's ENV silently replaces."""
        default, _ = self.defaults()
        config, problem = self.config_of(pod, container)
        problems = [problem] if problem else []
        merged = merge(default, config)
        origin = {k: "--config file" for k in flatten(config)}
        layers = [(k, v, "the image's ENV (Dockerfile)") for k, v in self.image_env().items()]
        layers += [(e["name"], e["value"], "the container's env") for e in container.get("env") or [] if "value" in e]
        for name, value, where in layers:
            if not name.startswith("AGORA_"):
                continue
            path = name[len("AGORA_"):].lower().split("__")
            if path[0] not in default and path[0] != "nats":
                continue  # not configuration (AGORA_LOG, AGORA_LOG_FORMAT, ...)
            table = merged
            for part in path[:-1]:
                table = table.setdefault(part, {})
            value = int(value) if re.fullmatch(r"-?\d+", value) else value
            key = ".".join(path)
            if origin.get(key) == "--config file" and table.get(path[-1]) != value and "image" in where:
                problems.append(
                    f"the --config file's {key} = {table.get(path[-1])!r} has no effect: {name}={value} "
                    f"from {where} wins over it; set {name} in the container's env as well"
                )
            table[path[-1]] = value
            origin[key] = f"{name}={value} from {where}"
        args = container.get("args") or []
        if "--http-port" in args and args.index("--http-port") + 1 < len(args):
            key = "history.http_port" if args[:1] == ["history"] else "http_port"
            table = merged["history"] if key.startswith("history") else merged
            table["http_port"] = int(args[args.index("--http-port") + 1])
            origin[key] = "--http-port"
        return merged, origin, problems

    def check_workloads(self) -> None:
        configmaps = {d["metadata"]["name"]: d for _, d in self.by_kind("ConfigMap")}
        for file, doc in self.docs:
            if doc.get("kind") not in WORKLOAD_KINDS:
                continue
            where = f"{file}: {doc['kind']}/{doc['metadata']['name']}"
            template = (doc.get("spec") or {}).get("template") or {}
            pod = template.get("spec") or {}
            annotations = (template.get("metadata") or {}).get("annotations") or {}
            for volume in pod.get("volumes") or []:
                source = volume.get("configMap")
                if source is None:
                    continue
                cm = configmaps.get(source.get("name"))
                if cm is None:
                    self.fail(where, f"volume {volume['name']}: no ConfigMap {source.get('name')} in {self.dir}")
                    continue
                for item in source.get("items") or []:
                    if item["key"] not in (cm.get("data") or {}):
                        self.fail(where, f"volume {volume['name']}: ConfigMap {cm['metadata']['name']} has no key {item['key']}")
            grace = pod.get("terminationGracePeriodSeconds", 30)
            for container in pod.get("containers") or []:
                cwhere = f"{where}: container {container['name']}"
                config, origin, problems = self.effective(pod, container)
                for problem in problems:
                    self.fail(cwhere, problem)
                history = (container.get("args") or ["node"])[0] == "history"
                key = "history.http_port" if history else "http_port"
                port = config["history"]["http_port"] if history else config["http_port"]
                said = f"{key} = {port} (from {origin.get(key, 'config/default.toml')})"
                ports = {p.get("name"): p["containerPort"] for p in container.get("ports") or []}
                if not port:
                    self.fail(cwhere, f"its HTTP port (probes, metrics) is off: {said}")
                    continue
                if ports.get("http") != port:
                    self.fail(cwhere, f"the process serves HTTP on {said}, but the container port named http is {ports.get('http')}")
                for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                    get = (container.get(probe) or {}).get("httpGet")
                    if get and get.get("port") not in ("http", port):
                        self.fail(cwhere, f"{probe} asks port {get.get('port')}, not http ({said})")
                if annotations.get("prometheus.io/scrape") == "true" and annotations.get("prometheus.io/port") != str(port):
                    self.fail(where, f"prometheus.io/port is {annotations.get('prometheus.io/port')}, but {said}")
                if not history:
                    timeout = config["shutdown_timeout_secs"]
                    if timeout >= grace:
                        self.fail(cwhere, f"shutdown_timeout_secs = {timeout} must be below terminationGracePeriodSeconds = {grace}")

    def workload_matching(self, selector: dict) -> list[dict]:
        found = []
        for _, doc in self.docs:
            if doc.get("kind") in WORKLOAD_KINDS:
                labels = (template_of(doc).get("metadata") or {}).get("labels") or {}
                if selector and all(labels.get(k) == v for k, v in selector.items()):
                    found.append(doc)
        return found

    def check_selectors(self) -> None:
        for file, doc in self.by_kind("Service"):
            where = f"{file}: Service/{doc['metadata']['name']}"
            spec = doc.get("spec") or {}
            targets = self.workload_matching(spec.get("selector") or {})
            if not targets:
                self.fail(where, "its selector matches no workload of the folder")
                continue
            for port in spec.get("ports") or []:
                target = port.get("targetPort", port.get("port"))
                for w in targets:
                    cports = [p for c in containers_of(w) for p in c.get("ports") or []]
                    if not any(target in (p.get("name"), p["containerPort"]) for p in cports):
                        self.fail(where, f"port {port.get('name')}: {w['kind']}/{w['metadata']['name']} has no container port {target}")
        for file, doc in self.by_kind("StatefulSet"):
            service = (doc.get("spec") or {}).get("serviceName")
            if service and not any(d["metadata"]["name"] == service for _, d in self.by_kind("Service")):
                self.fail(f"{file}: StatefulSet/{doc['metadata']['name']}", f"serviceName {service}: no such Service in the folder")
        for file, doc in self.by_kind("PodDisruptionBudget"):
            selector = ((doc.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
            if not self.workload_matching(selector):
                self.fail(f"{file}: PodDisruptionBudget/{doc['metadata']['name']}", "its selector matches no workload of the folder")
        for file, doc in self.by_kind("HorizontalPodAutoscaler"):
            where = f"{file}: HorizontalPodAutoscaler/{doc['metadata']['name']}"
            ref = doc["spec"]["scaleTargetRef"]
            target = next((d for _, d in self.docs if d.get("kind") == ref.get("kind") and d["metadata"]["name"] == ref.get("name")), None)
            if target is None:
                self.fail(where, f"scaleTargetRef {ref.get('kind')}/{ref.get('name')}: not in the folder")
                continue
            for metric in doc["spec"].get("metrics") or []:
                resource = (metric.get("resource") or {}).get("name")
                if metric.get("type") == "Resource" and resource:
                    for c in containers_of(target):
                        if resource not in ((c.get("resources") or {}).get("requests") or {}):
                            self.fail(where, f"scales on {resource} but container {c['name']} of {ref['name']} requests no {resource}")


def template_of(workload: dict) -> dict:
    return ((workload.get("spec") or {}).get("template")) or {}


def containers_of(workload: dict) -> list[dict]:
    return (template_of(workload).get("spec") or {}).get("containers") or []


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def flatten(table: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in table.items():
        keys += flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return keys


def same_type(value, expected) -> bool:
    if isinstance(expected, bool):
        return isinstance(value, bool)
    if isinstance(expected, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(expected, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, type(expected))


def toml_type(value) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array"}.get(type(value), "a " + type(value).__name__)


def main(argv: list[str]) -> int:
    directory = Path(argv[1]) if len(argv) > 1 else ROOT / "deploy" / "k8s"
    if not directory.is_dir():
        print(f"check-k8s: {directory} is not a directory", file=sys.stderr)
        return 2
    version = getattr(kubernetes_validate, "__version__", "?")
    checker = Checker(directory)
    checker.check_schemas()
    schemas_ok = not checker.problems
    checker.check_kustomization()
    checker.check_configs()
    if schemas_ok:
        checker.check_workloads()
        checker.check_selectors()
    else:
        checker.notes.append("ports, references and selectors not compared: fix the problems with the schemas first")
    for note in checker.notes:
        print(f"check-k8s: note: {note}")
    if version != KUBERNETES_VALIDATE_VERSION:
        print(f"check-k8s: note: kubernetes-validate {version} here, the checks were written with {KUBERNETES_VALIDATE_VERSION}")
    if checker.problems:
        print(f"check-k8s: {len(checker.problems)} problem(s) in {directory}:", file=sys.stderr)
        for p in checker.problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    kinds = ", ".join(f"{d['kind']}/{d['metadata']['name']}" for _, d in checker.docs)
    print(
        f"check-k8s: ok: {len(checker.docs)} objects valid against Kubernetes {KUBERNETES_VERSION} "
        f"(strict, kubernetes-validate {version}): {kinds}; configuration keys and cross-references "
        "checked"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
