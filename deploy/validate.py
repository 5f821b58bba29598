"""Validates the deployment files under deploy/; tests/deploy.rs runs it.

    python3 deploy/validate.py [--emit DIR]

Checks, offline:
- every YAML file under deploy/ parses, with no key given twice in a mapping
  (PyYAML would silently keep the last one);
- the Kubernetes manifests against the API schemas bundled with
  kubernetes-validate, strictly (unknown fields are errors), for the oldest
  Kubernetes these manifests support and for the newest bundled;
- what the schemas cannot see: the pgstash sidecar is a native sidecar, the
  ConfigMap, Secret and port names it refers to exist, the PodMonitor selects
  its pods and port, the drain fits in the grace period;
- docker-compose.yml's services, build paths and dependencies;
- the Prometheus rule files' shape (promtool checks the PromQL itself);
- the Grafana dashboard's JSON, panel ids, layout and queries.

With --emit DIR it also writes what the Rust tests check further with the
real binaries (promtool, pgstash):
- DIR/metric-refs.tsv: every pgstash_* series selector in the rules and the
  dashboard, one label matcher a line: source, metric, label, op, value;
- DIR/dashboard-rules.yaml: the dashboard's queries as recording rules, the
  Grafana variables replaced, so `promtool check rules` parses them;
- DIR/configs/NN/{source,proxy.toml,env}: each pgstash container's config
  file and PGSTASH_* environment (secrets resolved from secret.yaml), for
  `pgstash check-config`.

Needs Python 3.11 (tomllib), PyYAML and kubernetes-validate; installs the
last two with pip when they are missing.
"""

import importlib
import json
import os
import re
import subprocess
import sys
import tomllib

DEPLOY = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(DEPLOY)

# Pinned because the Kubernetes versions it bundles schemas for move with
# each release; .ci/run installs the same.
PIP_PACKAGES = ["kubernetes-validate==1.37.0", "PyYAML"]

# The oldest Kubernetes the manifests support: native sidecars are on by
# default from 1.29 and the preStop sleep action from 1.30. Schemas alone
# would pass 1.29 (they list alpha fields too), hence the explicit floor.
K8S_MIN_VERSION = "1.30"

# Custom resources kubernetes-validate has no schema for; checked by hand.
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "PodMonitor")}

errors = []


def error(where, message):
    errors.append(f"{where}: {message}")


def rel(path):
    return os.path.relpath(path, REPO)


def ensure_packages():
    try:
        import yaml  # noqa: F401
        import kubernetes_validate  # noqa: F401
    except ImportError:
        print(f"validate.py: installing {' '.join(PIP_PACKAGES)}", file=sys.stderr)
        subprocess.check_call(
            [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
            + PIP_PACKAGES
        )
        importlib.invalidate_caches()


ensure_packages()
import yaml  # noqa: E402
import kubernetes_validate  # noqa: E402


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping."""


def _construct_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        # Keys merged in with `<<: *anchor` may be overridden; only keys
        # written twice in the mapping itself are mistakes.
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} given twice", key_node.start_mark
            )
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml_files():
    """Every YAML file under deploy/: path -> list of documents."""
    docs = {}
    for root, dirs, files in os.walk(DEPLOY):
        dirs.sort()
        for name in sorted(files):
            if not name.endswith((".yaml", ".yml")):
                continue
            path = os.path.join(root, name)
            try:
                with open(path, encoding="utf-8") as f:
                    docs[path] = [d for d in yaml.load_all(f, Loader=StrictLoader) if d is not None]
            except yaml.YAMLError as e:
                error(rel(path), f"not valid YAML: {e}")
    return docs


# ---------------------------------------------------------------- PromQL


SELECTOR = re.compile(r"\b(pgstash_[A-Za-z0-9_]+)\b(\s*\{([^}]*)\})?")
MATCHER = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*(,|$)')


def metric_refs(source, expr):
    """(source, metric, label, op, value) for each pgstash_* selector."""
    refs = []
    for m in SELECTOR.finditer(expr):
        metric, body = m.group(1), m.group(3)
        if body is None or not body.strip():
            refs.append((source, metric, "", "", ""))
            continue
        pos = 0
        while pos < len(body):
            mm = MATCHER.match(body, pos)
            if not mm:
                error(source, f"cannot read the label matchers of {metric}{{{body}}}")
                break
            refs.append((source, metric, mm.group(1), mm.group(2), mm.group(3)))
            pos = mm.end()
    return refs


# ------------------------------------------------------------ Kubernetes


def parse_duration(text):
    """Seconds in a humantime duration such as "20s", "1m30s" or "500ms"."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+)\s*(ms|s|m|h)", text)
    if not parts or "".join(n + u for n, u in parts) != text.replace(" ", ""):
        raise ValueError(f"cannot read duration {text!r}")
    return sum(int(n) * units[u] for n, u in parts)


def check_kubernetes(docs):
    """Returns (pgstash container configs for --emit)."""
    resources = []
    for path, file_docs in docs.items():
        if os.path.dirname(path) != os.path.join(DEPLOY, "kubernetes"):
            continue
        for doc in file_docs:
            where = f"{rel(path)} {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
                error(rel(path), "a document without apiVersion and kind")
                continue
            resources.append((where, doc))
            if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
                continue
            for version in (K8S_MIN_VERSION, kubernetes_validate.latest_version()):
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except kubernetes_validate.ValidationError as e:
                    field = ".".join(str(p) for p in e.path)
                    error(where, f"Kubernetes {version}: {field}: {e.message}")
                except kubernetes_validate.SchemaNotFoundError as e:
                    error(where, e.message)
                except kubernetes_validate.utils.VersionNotSupportedError:
                    error(where, f"kubernetes-validate has no schemas for {version}: "
                                 f"pip install {PIP_PACKAGES[0]}")

    def of_kind(kind):
        return [(w, d) for w, d in resources if d["kind"] == kind]

    configmaps = {d["metadata"]["name"]: d for _, d in of_kind("ConfigMap")}
    secrets = {d["metadata"]["name"]: d for _, d in of_kind("Secret")}
    deployments = of_kind("Deployment")
    if not deployments:
        error("deploy/kubernetes", "no Deployment")
    configs = []
    for where, dep in deployments:
        configs += check_deployment(where, dep, configmaps, secrets)
    for where, pm in of_kind("PodMonitor"):
        check_podmonitor(where, pm, deployments)
    return configs


def check_deployment(where, dep, configmaps, secrets):
    pod = dep["spec"]["template"]["spec"]
    sidecars = [c for c in pod.get("initContainers", []) if c["name"] == "pgstash"]
    if not sidecars:
        error(where, "no initContainers entry named pgstash")
        return []
    pgstash = sidecars[0]
    if pgstash.get("restartPolicy") != "Always":
        # Without it the kubelet waits for pgstash to exit before starting
        # the app, which is forever.
        error(where, "pgstash must be a native sidecar: restartPolicy: Always")
    if pod.get("enableServiceLinks") is not False:
        error(where, "enableServiceLinks must be false: a Service named pgstash would inject "
                     "PGSTASH_* variables that pgstash refuses as unknown settings")
    ports = {p["name"]: p["containerPort"] for p in pgstash.get("ports", []) if "name" in p}
    for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"),
                        ("readinessProbe", "/readyz")):
        get = pgstash.get(probe, {}).get("httpGet")
        if probe != "startupProbe" and not get:
            error(where, f"pgstash has no {probe}")
        if get and (get.get("path") != path or get.get("port") not in ports):
            error(where, f"pgstash {probe} should GET {path} on a named port of the container")

    # The config file: the image reads /etc/pgstash/proxy.toml.
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    text = None
    for mount in pgstash.get("volumeMounts", []):
        if mount["mountPath"] != "/etc/pgstash" or "subPath" in mount:
            continue
        cm_name = volumes.get(mount["name"], {}).get("configMap", {}).get("name")
        if cm_name not in configmaps:
            error(where, f"volume {mount['name']} needs a ConfigMap in deploy/kubernetes")
            continue
        text = configmaps[cm_name].get("data", {}).get("proxy.toml")
        if text is None:
            error(where, f"ConfigMap {cm_name} has no proxy.toml")
    if text is None:
        error(where, "pgstash has no ConfigMap mounted at /etc/pgstash")
        return []
    try:
        config = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        error(where, f"proxy.toml in the ConfigMap: {e}")
        return []
    listen_host = config.get("listen", "").rpartition(":")[0]
    if listen_host not in ("127.0.0.1", "[::1]"):
        # Clients are trusted: only the pod itself may reach the listener.
        error(where, f"proxy.toml listen must be on loopback, not {listen_host!r}")
    metrics_port = config.get("metrics_listen", "").rpartition(":")[2]
    if not metrics_port or int(metrics_port) not in ports.values():
        error(where, f"metrics_listen port {metrics_port!r} is not a declared port of pgstash")
    grace = pod.get("terminationGracePeriodSeconds", 30)
    drain = parse_duration(config.get("shutdown_timeout", "30s"))
    if drain >= grace:
        error(where, f"shutdown_timeout ({drain}s) must be under terminationGracePeriodSeconds ({grace})")

    env = {}
    for var in pgstash.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        ref = var.get("valueFrom", {}).get("secretKeyRef")
        if not ref:
            error(where, f"env {var['name']}: only value and secretKeyRef are resolved here")
            continue
        secret = secrets.get(ref["name"])
        if secret is None:
            error(where, f"env {var['name']}: no Secret {ref['name']} in deploy/kubernetes")
            continue
        value = secret.get("stringData", {}).get(ref["key"])
        if value is None:
            error(where, f"env {var['name']}: Secret {ref['name']} has no stringData.{ref['key']}")
            continue
        env[var["name"]] = value
    return [(f"{where} container pgstash", text, env)]


def check_podmonitor(where, pm, deployments):
    spec = pm.get("spec", {})
    selector = spec.get("selector", {}).get("matchLabels", {})
    endpoints = spec.get("podMetricsEndpoints", [])
    if not selector or not endpoints:
        error(where, "needs spec.selector.matchLabels and spec.podMetricsEndpoints")
        return
    for dep_where, dep in deployments:
        labels = dep["spec"]["template"]["metadata"].get("labels", {})
        if any(labels.get(k) != v for k, v in selector.items()):
            error(where, f"selector {selector} does not match the pods of {dep_where}")
            continue
        pod = dep["spec"]["template"]["spec"]
        ports = {p.get("name") for c in pod.get("containers", []) + pod.get("initContainers", [])
                 for p in c.get("ports", [])}
        for ep in endpoints:
            if ep.get("port") not in ports:
                error(where, f"port {ep.get('port')!r} is not a named port of {dep_where}")
        job_label = spec.get("jobLabel")
        if job_label and job_label not in labels:
            error(where, f"jobLabel {job_label} is not a label of the pods of {dep_where}")


# --------------------------------------------------------------- Compose


def check_compose(path, doc):
    """Returns (pgstash container configs for --emit)."""
    where = rel(path)
    services = doc.get("services")
    if not isinstance(services, dict) or not services:
        error(where, "no services")
        return []
    configs = []
    compose_dir = os.path.dirname(path)
    for name, svc in services.items():
        build = svc.get("build")
        if build is not None:
            context = os.path.normpath(os.path.join(compose_dir, build.get("context", ".")))
            dockerfile = os.path.join(context, build.get("dockerfile", "Dockerfile"))
            if not os.path.isfile(dockerfile):
                error(where, f"service {name}: no Dockerfile at {rel(dockerfile)}")
        deps = svc.get("depends_on", [])
        for dep in deps:
            if dep not in services:
                error(where, f"service {name} depends on unknown service {dep}")
        env = svc.get("environment", {})
        if isinstance(env, list):
            env = dict(item.split("=", 1) for item in env)
        if build is not None and build.get("dockerfile", "").endswith("deploy/Dockerfile"):
            # No volume replaces it, so pgstash reads the image's copy.
            with open(os.path.join(REPO, "proxy.toml"), encoding="utf-8") as f:
                text = f.read()
            configs.append((f"{where} service {name}", text, {k: str(v) for k, v in env.items()}))
    if not configs:
        error(where, "no service built from deploy/Dockerfile")
    return configs


# ------------------------------------------------------------ Prometheus


def check_rules(path, doc):
    where = rel(path)
    refs = []
    groups = doc.get("groups") if isinstance(doc, dict) else None
    if not isinstance(groups, list) or not groups:
        error(where, "a rule file needs a non-empty groups list")
        return refs
    for group in groups:
        for rule in group.get("rules", []):
            name = rule.get("alert") or rule.get("record")
            if not name or "expr" not in rule:
                error(where, f"rule without alert/record name or expr: {rule}")
                continue
            refs += metric_refs(f"{where} {name}", rule["expr"])
    return refs


# --------------------------------------------------------------- Grafana


GRAFANA_VARS = {"$__rate_interval": "5m", "$namespace": ".*", "$job": ".*", "$pod": ".*"}


def check_dashboard(path):
    where = rel(path)
    try:
        with open(path, encoding="utf-8") as f:
            dash = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        error(where, f"not valid JSON: {e}")
        return [], []
    if not isinstance(dash.get("schemaVersion"), int) or dash["schemaVersion"] < 36:
        error(where, "schemaVersion must be a number, 36 or newer")
    for key in ("title", "uid", "panels", "templating"):
        if key not in dash:
            error(where, f"no {key}")
    refs, exprs = [], []
    ids, cells = set(), {}
    for panel in dash.get("panels", []):
        title = panel.get("title", "?")
        pid = panel.get("id")
        if pid in ids:
            error(where, f"panel id {pid} used twice")
        ids.add(pid)
        grid = panel.get("gridPos", {})
        if not all(isinstance(grid.get(k), int) for k in "hwxy") or grid["x"] + grid["w"] > 24:
            error(where, f"panel {title!r}: gridPos needs h, w, x, y within 24 columns")
            continue
        # Overlapping panels render on top of each other.
        for y in range(grid["y"], grid["y"] + grid["h"]):
            for x in range(grid["x"], grid["x"] + grid["w"]):
                if (x, y) in cells:
                    error(where, f"panel {title!r} overlaps {cells[(x, y)]!r}")
                    break
                cells[(x, y)] = title
            else:
                continue
            break
        if panel.get("type") == "row":
            continue
        targets = panel.get("targets", [])
        if not targets:
            error(where, f"panel {title!r} has no query")
        refids = [t.get("refId") for t in targets]
        if len(set(refids)) != len(refids) or None in refids:
            error(where, f"panel {title!r}: every query needs its own refId")
        for t in targets:
            if t.get("datasource", panel.get("datasource", {})).get("uid") != "${datasource}":
                error(where, f"panel {title!r}: queries must use the ${{datasource}} variable")
            expr = t.get("expr", "")
            if not expr:
                error(where, f"panel {title!r} query {t.get('refId')} has no expr")
                continue
            refs += metric_refs(f"{where} {title!r}", expr)
            for var, value in GRAFANA_VARS.items():
                expr = expr.replace(var, value)
            if "$" in expr:
                error(where, f"panel {title!r}: unknown Grafana variable in {expr!r}")
            exprs.append((f"{title} {t.get('refId')}", expr))
    return refs, exprs


# ------------------------------------------------------------------ main


def emit(out, refs, exprs, configs):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "metric-refs.tsv"), "w", encoding="utf-8") as f:
        for ref in refs:
            if any("\t" in part or "\n" in part for part in ref):
                error(ref[0], f"cannot write {ref!r} as one TSV line")
                continue
            f.write("\t".join(ref) + "\n")
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": expr} for i, (_, expr) in enumerate(exprs)
    ]}]}
    with open(os.path.join(out, "dashboard-rules.yaml"), "w", encoding="utf-8") as f:
        f.write("# The dashboard's queries in order: " + "; ".join(s for s, _ in exprs) + "\n")
        yaml.safe_dump(rules, f, sort_keys=False, width=1000)
    for i, (source, text, env) in enumerate(configs):
        d = os.path.join(out, "configs", f"{i:02}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "source"), "w", encoding="utf-8") as f:
            f.write(source + "\n")
        with open(os.path.join(d, "proxy.toml"), "w", encoding="utf-8") as f:
            f.write(text)
        with open(os.path.join(d, "env"), "w", encoding="utf-8") as f:
            for k, v in sorted(env.items()):
                if "\n" in v:
                    error(source, f"{k} holds a newline")
                    continue
                f.write(f"{k}={v}\n")


def main(argv):
    out = None
    if argv[1:2] == ["--emit"] and len(argv) == 3:
        out = argv[2]
    elif len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    docs = load_yaml_files()
    configs = check_kubernetes(docs)
    refs, exprs = [], []
    for path, file_docs in docs.items():
        name = os.path.basename(path)
        if name in ("docker-compose.yml", "docker-compose.yaml", "compose.yaml", "compose.yml"):
            for doc in file_docs:
                configs += check_compose(path, doc)
        elif os.path.dirname(path) == os.path.join(DEPLOY, "prometheus") and ".test." not in name:
            for doc in file_docs:
                refs += check_rules(path, doc)
    dashboards = [os.path.join(DEPLOY, "grafana", n)
                  for n in sorted(os.listdir(os.path.join(DEPLOY, "grafana"))) if n.endswith(".json")]
    for path in dashboards:
        r, e = check_dashboard(path)
        refs += r
        exprs += e
    if out is not None and not errors:
        emit(out, refs, exprs, configs)
    for e in errors:
        print(f"validate.py: {e}", file=sys.stderr)
    if errors:
        return 1
    print(f"validate.py: {len(docs)} YAML files, {len(dashboards)} dashboards, "
          f"{len(configs)} pgstash containers: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
