"""compose.infra.yml, its Mosquitto config and .env.example agree with each other and with the
settings, so `cp .env.example .env && docker compose -f compose.infra.yml up -d` gives services
that iotmeter, started with that .env, can reach.

No container engine runs here: the files are parsed and checked, not started.
"""

from __future__ import annotations

import re
import ssl
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from cryptography import x509

from iotmeter.config import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "compose.infra.yml"
ENV_EXAMPLE = ROOT / ".env.example"
MOSQUITTO_CONFIG_TARGET = "/mosquitto/config/mosquitto.conf"

LONG_RUNNING = ("mosquitto", "minio", "influxdb", "postgres", "prometheus", "grafana")
IMAGES = {
    "mosquitto": r"eclipse-mosquitto:2\.0\.\d+",
    "minio": r"minio/minio:RELEASE\.[0-9TZ-]+",
    "minio-init": r"minio/mc:RELEASE\.[0-9TZ-]+",
    "influxdb": r"influxdb:2\.7(\.\d+)?",
    "postgres": r"postgres:15(\.\d+)?",
    "prometheus": r"prom/prometheus:v\d+\.\d+\.\d+",
    "grafana": r"grafana/grafana(-oss)?:\d+\.\d+\.\d+",
}
PUBLISHED = [
    ("mosquitto", 1883),
    ("mosquitto", 9001),
    ("minio", 9000),
    ("minio", 9090),
    ("influxdb", 8086),
    ("postgres", 5432),
]

# Compose interpolation: `$$` is a literal `$`; `${VAR}`, `${VAR:-default}`, `${VAR-default}`,
# `${VAR:?error}`, `${VAR?error}`.
_INTERPOLATION = re.compile(
    r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<operator>:?[-?])(?P<argument>[^}]*))?\}"
)
_SHELL_SAFE_VALUE = re.compile(r"[A-Za-z0-9_.,:/@%+=-]*")


# --- Parsing helpers ---------------------------------------------------------------------------


def parse_env_file(text: str) -> dict[str, str]:
    """KEY=VALUE lines as both Compose and `set -a; . ./.env` read them (no quoting needed)."""
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, separator, value = line.partition("=")
        assert separator, f"line {number} is not KEY=VALUE: {raw!r}"
        assert re.fullmatch(r"[A-Z][A-Z0-9_]*", key), f"line {number}: bad name {key!r}"
        assert key not in values, f"line {number}: {key} is set twice"
        values[key] = value
    return values


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Resolve a Compose value the way `docker compose` does with `env` as its .env file."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, operator, argument = match.group("name", "operator", "argument")
        current = env.get(name)
        missing = current is None or (current == "" and operator in (":-", ":?"))
        if operator in ("-", ":-") and missing:
            return str(argument)
        if operator in ("?", ":?") and missing:
            raise LookupError(f"{name} is required: {argument}")
        return current or ""

    return _INTERPOLATION.sub(replace, value)


def referenced_variables(node: Any) -> set[tuple[str, str | None]]:
    """Every `${VAR...}` in the Compose document, as (name, operator)."""
    if isinstance(node, dict):
        return set().union(*(referenced_variables(item) for item in node.values()))
    if isinstance(node, list):
        return set().union(*(referenced_variables(item) for item in node))
    if isinstance(node, str):
        return {
            (match.group("name"), match.group("operator"))
            for match in _INTERPOLATION.finditer(node)
            if match.group("name")
        }
    return set()


def resolve_document(node: Any, env: Mapping[str, str]) -> Any:
    """The Compose document with every string interpolated."""
    if isinstance(node, dict):
        return {key: resolve_document(item, env) for key, item in node.items()}
    if isinstance(node, list):
        return [resolve_document(item, env) for item in node]
    return interpolate(node, env) if isinstance(node, str) else node


def service_environment(service: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, str]:
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) for item in raw)
    return {key: interpolate(str(value), env) for key, value in raw.items()}


def port_bindings(service: Mapping[str, Any]) -> list[tuple[str, int, int]]:
    """(host address, published port, container port) of each port mapping."""
    bindings = []
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            host_ip = str(entry.get("host_ip", ""))
            published, target = int(entry["published"]), int(entry["target"])
        else:
            parts = str(entry).split("/")[0].split(":")
            assert len(parts) == 3, f"{entry!r}: give the host address, e.g. 127.0.0.1:1883:1883"
            host_ip, published, target = parts[0], int(parts[1]), int(parts[2])
        bindings.append((host_ip, published, target))
    return bindings


def volume_mounts(service: Mapping[str, Any]) -> list[tuple[str, str, bool]]:
    """(source, container path, read-only) of each mount."""
    mounts = []
    for entry in service.get("volumes") or []:
        if isinstance(entry, dict):
            mounts.append(
                (str(entry["source"]), str(entry["target"]), bool(entry.get("read_only")))
            )
        else:
            source, target, *options = str(entry).split(":")
            mounts.append((source, target, "ro" in ",".join(options).split(",")))
    return mounts


def is_named_volume(source: str) -> bool:
    return not source.startswith((".", "/", "~", "$"))


def parse_mosquitto_config(text: str) -> list[tuple[str, str]]:
    """(option, value) pairs in file order; comments and blank lines dropped."""
    options = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            option, _, value = line.partition(" ")
            options.append((option, value.strip()))
    return options


def mosquitto_listeners(options: list[tuple[str, str]]) -> dict[int, str]:
    """Port -> protocol of each listener (a `protocol` line belongs to the listener above it)."""
    listeners: dict[int, str] = {}
    current: int | None = None
    for option, value in options:
        if option == "listener":
            current = int(value.split()[0])
            listeners[current] = "mqtt"
        elif option == "protocol":
            assert current is not None, "`protocol` before any `listener`"
            listeners[current] = value
    return listeners


def mosquitto_option(options: list[tuple[str, str]], name: str) -> str:
    values = [value for option, value in options if option == name]
    assert len(values) == 1, f"mosquitto.conf should set {name} exactly once, has {values}"
    return values[0]


def created_bucket(service: Mapping[str, Any]) -> str:
    script = " ".join(
        str(part)
        for key in ("entrypoint", "command")
        for part in (
            service.get(key) if isinstance(service.get(key), list) else [service.get(key) or ""]
        )
    )
    match = re.search(r"mc mb --ignore-existing \"?[\w.-]+/([a-z0-9.-]+)", script)
    assert match, f"minio-init does not run `mc mb --ignore-existing ALIAS/BUCKET`: {script!r}"
    return match.group(1)


# --- Fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(document, dict)
    return document


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = compose["services"]
    return result


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return parse_env_file(ENV_EXAMPLE.read_text())


@pytest.fixture(scope="module")
def mosquitto_config(services: dict[str, Any]) -> list[tuple[str, str]]:
    sources = [
        source
        for source, target, _ in volume_mounts(services["mosquitto"])
        if target == MOSQUITTO_CONFIG_TARGET
    ]
    assert len(sources) == 1, f"mosquitto should mount one file at {MOSQUITTO_CONFIG_TARGET}"
    path = (COMPOSE_FILE.parent / sources[0]).resolve()
    assert path.is_file(), f"the mounted Mosquitto config {path} does not exist"
    return parse_mosquitto_config(path.read_text())


# --- compose.infra.yml -------------------------------------------------------------------------


def test_compose_spec_without_version_key(compose: dict[str, Any]) -> None:
    assert "version" not in compose


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_service_uses_pinned_image(services: dict[str, Any], name: str) -> None:
    assert name in services, f"compose.infra.yml has no service {name!r}"
    assert re.fullmatch(IMAGES[name], services[name]["image"]), services[name]["image"]


@pytest.mark.parametrize(("name", "port"), PUBLISHED)
def test_port_published_on_loopback(services: dict[str, Any], name: str, port: int) -> None:
    assert ("127.0.0.1", port, port) in port_bindings(services[name])


def test_no_port_published_beyond_loopback(services: dict[str, Any]) -> None:
    exposed = [
        (name, binding)
        for name, service in services.items()
        for binding in port_bindings(service)
        if binding[0] != "127.0.0.1"
    ]
    assert exposed == []


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_long_running_service_has_healthcheck(services: dict[str, Any], name: str) -> None:
    healthcheck = services[name].get("healthcheck") or {}
    assert not healthcheck.get("disable")
    test = healthcheck.get("test")
    assert test, f"{name} has no healthcheck"
    assert isinstance(test, str) or test[0] in ("CMD", "CMD-SHELL"), test


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_long_running_service_keeps_data_in_named_volume(
    compose: dict[str, Any], services: dict[str, Any], name: str
) -> None:
    named = [source for source, _, _ in volume_mounts(services[name]) if is_named_volume(source)]
    assert named, f"{name} keeps its data in no named volume"
    undeclared = set(named) - set(compose.get("volumes") or {})
    assert not undeclared, f"volumes {undeclared} are not declared under top-level `volumes`"


def test_minio_init_waits_for_healthy_minio(services: dict[str, Any]) -> None:
    depends_on = services["minio-init"]["depends_on"]
    assert depends_on["minio"]["condition"] == "service_healthy"
    assert not services["minio-init"].get("ports")


def test_minio_init_creates_the_archive_bucket(services: dict[str, Any]) -> None:
    assert created_bucket(services["minio-init"]) == "iot-data"


def test_minio_init_logs_in_with_the_root_credentials(
    services: dict[str, Any], env_example: dict[str, str]
) -> None:
    minio = service_environment(services["minio"], env_example)
    init = service_environment(services["minio-init"], env_example)
    for name in ("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"):
        assert init[name] == minio[name], name
    assert "$$MINIO_ROOT_USER" in str(services["minio-init"]["command"])


def test_influxdb_setup_creates_org_and_bucket(services: dict[str, Any]) -> None:
    environment = services["influxdb"]["environment"]
    assert environment["DOCKER_INFLUXDB_INIT_MODE"] == "setup"
    assert environment["DOCKER_INFLUXDB_INIT_ORG"] == "iot-org"
    assert environment["DOCKER_INFLUXDB_INIT_BUCKET"] == "iot-metrics"
    assert "INFLUXDB_ADMIN_TOKEN" in environment["DOCKER_INFLUXDB_INIT_ADMIN_TOKEN"]


@pytest.mark.parametrize("use_env_example", [True, False], ids=["env-example", "defaults"])
@pytest.mark.parametrize(
    ("service", "variable"),
    [("minio", "MINIO_ROOT_PASSWORD"), ("influxdb", "DOCKER_INFLUXDB_INIT_PASSWORD")],
)
def test_passwords_long_enough_to_start(
    services: dict[str, Any],
    env_example: dict[str, str],
    service: str,
    variable: str,
    use_env_example: bool,
) -> None:
    """MinIO refuses to start, and InfluxDB's setup fails, with fewer than 8 characters."""
    value = services[service]["environment"][variable]
    assert len(interpolate(value, env_example if use_env_example else {})) >= 8


def test_postgres_healthcheck_waits_for_tcp(services: dict[str, Any]) -> None:
    """The image's first-start temporary server listens on the socket only."""
    test = " ".join(services["postgres"]["healthcheck"]["test"])
    assert "pg_isready" in test
    assert "-h 127.0.0.1" in test


# --- deploy/mosquitto/mosquitto.conf -----------------------------------------------------------


def test_mosquitto_config_is_mounted_read_only(services: dict[str, Any]) -> None:
    mounts = volume_mounts(services["mosquitto"])
    assert [ro for _, target, ro in mounts if target == MOSQUITTO_CONFIG_TARGET] == [True]


def test_mosquitto_listeners_match_published_ports(
    services: dict[str, Any], mosquitto_config: list[tuple[str, str]]
) -> None:
    listeners = mosquitto_listeners(mosquitto_config)
    assert listeners == {1883: "mqtt", 8883: "mqtt", 9001: "websockets"}
    targets = {target for _, _, target in port_bindings(services["mosquitto"])}
    assert targets == set(listeners)


def test_mosquitto_persists_to_its_volume(
    services: dict[str, Any], mosquitto_config: list[tuple[str, str]]
) -> None:
    assert mosquitto_option(mosquitto_config, "persistence") == "true"
    location = mosquitto_option(mosquitto_config, "persistence_location").rstrip("/")
    volumes = {
        target.rstrip("/"): source for source, target, _ in volume_mounts(services["mosquitto"])
    }
    assert location in volumes, f"{location} is not a mounted volume: lost on recreate"
    assert is_named_volume(volumes[location])
    assert 0 < int(mosquitto_option(mosquitto_config, "autosave_interval")) <= 60


def test_mosquitto_queues_an_outage_for_the_collector(
    mosquitto_config: list[tuple[str, str]],
) -> None:
    assert int(mosquitto_option(mosquitto_config, "max_queued_messages")) > 1000
    # 0 would mean unbounded memory.
    assert int(mosquitto_option(mosquitto_config, "max_queued_bytes")) > 0
    assert re.fullmatch(
        r"\d+[hdwmy]", mosquitto_option(mosquitto_config, "persistent_client_expiration")
    )


def test_mosquitto_drains_a_backlog_faster_than_by_default(
    mosquitto_config: list[tuple[str, str]],
) -> None:
    """A queued backlog drains at max_inflight_messages per round trip (default 20; 0: no limit)."""
    inflight = int(mosquitto_option(mosquitto_config, "max_inflight_messages"))
    assert inflight == 0 or inflight >= 100


def test_mosquitto_logs_to_stdout(mosquitto_config: list[tuple[str, str]]) -> None:
    assert ("log_dest", "stdout") in mosquitto_config


# --- Prometheus and Grafana --------------------------------------------------------------------

HOST_NETWORK_LISTENERS = {"prometheus": ("127.0.0.1", 9091), "grafana": ("127.0.0.1", 3000)}
"""Services on the host's network publish no ports: each binds loopback itself, here."""
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
GRAFANA_DIR = ROOT / "deploy" / "grafana"


def listen_address(
    name: str, service: Mapping[str, Any], env: Mapping[str, str]
) -> tuple[str, int]:
    if name == "prometheus":
        flags = [str(part) for part in service["command"]]
        [flag] = [flag for flag in flags if flag.startswith("--web.listen-address=")]
        host, _, port = flag.removeprefix("--web.listen-address=").rpartition(":")
        return host, int(port)
    environment = service_environment(service, env)
    return environment["GF_SERVER_HTTP_ADDR"], int(environment["GF_SERVER_HTTP_PORT"])


def mounted_source(service: Mapping[str, Any], target: str) -> Path:
    sources = [source for source, mount, _ in volume_mounts(service) if mount == target]
    assert len(sources) == 1, f"nothing (or more than one thing) is mounted at {target}"
    return (COMPOSE_FILE.parent / sources[0]).resolve()


@pytest.fixture(scope="module")
def prometheus_config() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    return config


@pytest.fixture(scope="module")
def grafana_datasources() -> dict[str, dict[str, Any]]:
    path = GRAFANA_DIR / "provisioning" / "datasources" / "datasources.yml"
    return {source["uid"]: source for source in yaml.safe_load(path.read_text())["datasources"]}


def test_every_bind_mounted_file_exists(services: dict[str, Any]) -> None:
    for name, service in services.items():
        for source, _target, read_only in volume_mounts(service):
            if not is_named_volume(source):
                assert (COMPOSE_FILE.parent / source).exists(), f"{name}: {source} is missing"
                assert read_only, f"{name} may write to the repository's {source}"


def test_host_network_services_listen_on_loopback_only(
    services: dict[str, Any], env_example: dict[str, str]
) -> None:
    on_host = {name for name, service in services.items() if service.get("network_mode") == "host"}
    assert on_host == set(HOST_NETWORK_LISTENERS)
    for name in on_host:
        assert not services[name].get("ports"), f"{name}: ports do not apply on the host network"
        assert listen_address(name, services[name], env_example) == HOST_NETWORK_LISTENERS[name]
    published = {port for service in services.values() for _, port, _ in port_bindings(service)}
    assert not published & {port for _, port in HOST_NETWORK_LISTENERS.values()}


def test_prometheus_loads_the_repository_config_and_rules(
    services: dict[str, Any], prometheus_config: dict[str, Any]
) -> None:
    prometheus = services["prometheus"]
    flags = dict(str(flag).split("=", 1) for flag in prometheus["command"])
    config_target = flags["--config.file"]
    assert mounted_source(prometheus, config_target) == PROMETHEUS_DIR / "prometheus.yml"
    rules = prometheus_config["rule_files"]
    assert rules, "prometheus.yml loads no alert rules"
    for rule_file in rules:
        target = str(Path(config_target).parent / rule_file)
        assert mounted_source(prometheus, target) == (PROMETHEUS_DIR / rule_file).resolve()
    # Its data outlives the container.
    storage = flags["--storage.tsdb.path"]
    assert [is_named_volume(s) for s, t, _ in volume_mounts(prometheus) if t == storage] == [True]


def test_prometheus_scrapes_the_metrics_port_that_env_example_sets(
    prometheus_config: dict[str, Any], env_example: dict[str, str]
) -> None:
    [job] = [job for job in prometheus_config["scrape_configs"] if job["job_name"] == "iotmeter"]
    targets = [target for group in job["static_configs"] for target in group["targets"]]
    host = env_example.get("IOTMETER_METRICS_HOST", Settings.model_fields["metrics_host"].default)
    assert host == "127.0.0.1"
    assert targets == [f"{host}:{env_example['IOTMETER_METRICS_PORT']}"]
    # The metrics port needs no key (the API port would answer this job 401).
    assert "authorization" not in job
    assert "basic_auth" not in job


def test_prometheus_scrapes_itself_where_it_listens(
    services: dict[str, Any], prometheus_config: dict[str, Any]
) -> None:
    [job] = [job for job in prometheus_config["scrape_configs"] if job["job_name"] == "prometheus"]
    host, port = listen_address("prometheus", services["prometheus"], {})
    assert job["static_configs"][0]["targets"] == [f"{host}:{port}"]


def test_grafana_mounts_its_provisioning_and_the_dashboards(
    services: dict[str, Any], env_example: dict[str, str]
) -> None:
    grafana = services["grafana"]
    for kind in ("datasources", "dashboards"):
        source = mounted_source(grafana, f"/etc/grafana/provisioning/{kind}")
        assert source == GRAFANA_DIR / "provisioning" / kind
    providers = yaml.safe_load(
        (GRAFANA_DIR / "provisioning" / "dashboards" / "dashboards.yml").read_text()
    )["providers"]
    [provider] = providers
    folder = provider["options"]["path"]
    assert mounted_source(grafana, folder) == GRAFANA_DIR / "dashboards"
    assert sorted(path.name for path in (GRAFANA_DIR / "dashboards").glob("*.json")) == [
        "device-telemetry.json",
        "iotmeter-health.json",
    ]
    home = service_environment(grafana, env_example)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{folder}/iotmeter-health.json"


def test_grafana_waits_for_prometheus_and_does_not_phone_home(
    services: dict[str, Any], env_example: dict[str, str]
) -> None:
    grafana = services["grafana"]
    assert grafana["depends_on"]["prometheus"]["condition"] == "service_healthy"
    environment = service_environment(grafana, env_example)
    for variable in (
        "GF_ANALYTICS_REPORTING_ENABLED",
        "GF_ANALYTICS_CHECK_FOR_UPDATES",
        "GF_ANALYTICS_CHECK_FOR_PLUGIN_UPDATES",
        "GF_NEWS_NEWS_FEED_ENABLED",
        "GF_USERS_ALLOW_SIGN_UP",
    ):
        assert environment[variable] == "false", variable


def test_grafana_data_sources_reach_the_services(
    services: dict[str, Any], grafana_datasources: dict[str, dict[str, Any]]
) -> None:
    """Grafana is on the host's network: Prometheus where it listens, the others at their
    published loopback ports."""
    prometheus = urlsplit(grafana_datasources["iotmeter-prometheus"]["url"])
    assert (prometheus.hostname, prometheus.port) == listen_address(
        "prometheus", services["prometheus"], {}
    )
    influx = urlsplit(grafana_datasources["iotmeter-influxdb"]["url"])
    postgres = urlsplit("//" + grafana_datasources["iotmeter-postgres"]["url"])
    for url, service, port in ((influx, "influxdb", 8086), (postgres, "postgres", 5432)):
        published = {(h, p) for h, p, target in port_bindings(services[service]) if target == port}
        assert (url.hostname, url.port) in published, f"{service}: {url.geturl()}"


def test_grafana_data_sources_log_in_as_the_services_expect(
    services: dict[str, Any],
    env_example: dict[str, str],
    grafana_datasources: dict[str, dict[str, Any]],
) -> None:
    """`${VAR}` in datasources.yml comes from Grafana's environment, filled from .env."""
    grafana_env = service_environment(services["grafana"], env_example)
    # Every variable it uses is set (Grafana would put in an empty string).
    used = {name for name, _ in referenced_variables(grafana_datasources)}
    assert used
    assert used <= set(grafana_env)
    sources = resolve_document(grafana_datasources, grafana_env)
    postgres = service_environment(services["postgres"], env_example)
    source = sources["iotmeter-postgres"]
    assert source["user"] == postgres["POSTGRES_USER"]
    assert source["secureJsonData"]["password"] == postgres["POSTGRES_PASSWORD"]
    assert source["jsonData"]["database"] == postgres["POSTGRES_DB"]
    influx = service_environment(services["influxdb"], env_example)
    source = sources["iotmeter-influxdb"]
    assert source["secureJsonData"]["token"] == influx["DOCKER_INFLUXDB_INIT_ADMIN_TOKEN"]
    assert source["jsonData"]["organization"] == influx["DOCKER_INFLUXDB_INIT_ORG"]
    assert source["jsonData"]["defaultBucket"] == influx["DOCKER_INFLUXDB_INIT_BUCKET"]


# --- .env.example ------------------------------------------------------------------------------


def test_env_example_values_are_safe_to_source(env_example: dict[str, str]) -> None:
    unsafe = {
        key: value for key, value in env_example.items() if not _SHELL_SAFE_VALUE.fullmatch(value)
    }
    assert unsafe == {}, "quotes, spaces and `$` read differently in Compose and the shell"


def test_env_example_sets_every_required_compose_variable(
    compose: dict[str, Any], env_example: dict[str, str]
) -> None:
    required = {
        name for name, operator in referenced_variables(compose) if operator in (None, "?", ":?")
    }
    assert required, "expected at least INFLUXDB_ADMIN_TOKEN to be required"
    assert required <= set(env_example)
    resolve_document(compose, env_example)  # raises if a required variable is missing


def test_env_example_names_only_real_settings(env_example: dict[str, str]) -> None:
    fields = {name.upper() for name in Settings.model_fields}
    unknown = [
        key
        for key in env_example
        if key.startswith("IOTMETER_") and key.removeprefix("IOTMETER_") not in fields
    ]
    assert unknown == []


@pytest.mark.parametrize(
    ("variable", "service", "port"),
    [
        ("IOTMETER_DATABASE_URL", "postgres", 5432),
        ("IOTMETER_MQTT_URL", "mosquitto", 1883),
        ("IOTMETER_INFLUX_URL", "influxdb", 8086),
        ("IOTMETER_S3_ENDPOINT_URL", "minio", 9000),
    ],
)
def test_env_example_urls_reach_the_published_ports(
    services: dict[str, Any], env_example: dict[str, str], variable: str, service: str, port: int
) -> None:
    url = urlsplit(env_example[variable])
    published = {
        (host, published)
        for host, published, target in port_bindings(services[service])
        if target == port
    }
    assert (url.hostname, url.port) in published, f"{variable} points elsewhere than {published}"


def test_env_example_influx_matches_setup(
    services: dict[str, Any], env_example: dict[str, str]
) -> None:
    setup = service_environment(services["influxdb"], env_example)
    assert env_example["IOTMETER_INFLUX_ORG"] == setup["DOCKER_INFLUXDB_INIT_ORG"]
    assert env_example["IOTMETER_INFLUX_BUCKET"] == setup["DOCKER_INFLUXDB_INIT_BUCKET"]
    assert env_example["IOTMETER_INFLUX_TOKEN"] == setup["DOCKER_INFLUXDB_INIT_ADMIN_TOKEN"]


def test_env_example_s3_matches_minio(
    services: dict[str, Any], env_example: dict[str, str]
) -> None:
    minio = service_environment(services["minio"], env_example)
    assert env_example["IOTMETER_S3_ACCESS_KEY"] == minio["MINIO_ROOT_USER"]
    assert env_example["IOTMETER_S3_SECRET_KEY"] == minio["MINIO_ROOT_PASSWORD"]
    assert env_example["IOTMETER_S3_BUCKET"] == created_bucket(services["minio-init"])


def test_env_example_database_url_matches_postgres(
    services: dict[str, Any], env_example: dict[str, str]
) -> None:
    postgres = service_environment(services["postgres"], env_example)
    url = urlsplit(env_example["IOTMETER_DATABASE_URL"])
    assert (url.username, url.password, url.path.lstrip("/")) == (
        postgres["POSTGRES_USER"],
        postgres["POSTGRES_PASSWORD"],
        postgres["POSTGRES_DB"],
    )


def test_settings_accept_env_example(
    monkeypatch: pytest.MonkeyPatch, env_example: dict[str, str]
) -> None:
    for key, value in env_example.items():
        if key.startswith("IOTMETER_"):
            monkeypatch.setenv(key, value)
    settings = load_settings()
    assert settings.database_url == "postgresql+asyncpg://iotmeter:iotmeter@127.0.0.1:5432/iotmeter"
    assert settings.auto_migrate is True
    assert settings.mqtt_url == "mqtt://127.0.0.1:1883"
    assert settings.influx_url == "http://127.0.0.1:8086"
    assert settings.influx_token is not None
    assert settings.influx_token.get_secret_value() == env_example["INFLUXDB_ADMIN_TOKEN"]
    assert (settings.influx_org, settings.influx_bucket) == ("iot-org", "iot-metrics")
    assert settings.s3_endpoint_url == "http://127.0.0.1:9000"
    assert settings.s3_access_key is not None
    assert settings.s3_access_key.get_secret_value() == env_example["MINIO_ROOT_USER"]
    assert settings.s3_secret_key is not None
    assert settings.s3_secret_key.get_secret_value() == env_example["MINIO_ROOT_PASSWORD"]
    assert (settings.s3_bucket, settings.s3_region) == ("iot-data", "us-east-1")


# --- TLS of the compose Mosquitto --------------------------------------------------------------


def certificate_script(services: dict[str, Any], folder: Path) -> str:
    """mosquitto-certs' script, writing into `folder` instead of the volume."""
    command = services["mosquitto-certs"]["command"]
    assert services["mosquitto-certs"]["entrypoint"] == ["/bin/sh", "-c"]
    script = str(command[0]).replace("cd /certs", f"cd {folder}")
    # Not root here: the broker's owner is the container's concern.
    return script.replace("chown 1883:1883 broker.key broker.pem ca.pem", ":")


def handshake(client: ssl.SSLContext, server: ssl.SSLContext, hostname: str) -> None:
    """A whole TLS handshake in memory; raises `ssl.SSLError` when the client refuses."""
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    client_side = client.wrap_bio(to_client, to_server, server_hostname=hostname)
    server_side = server.wrap_bio(to_server, to_client, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(20):
        for name, side in (("client", client_side), ("server", server_side)):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        if all(done.values()):
            return
    raise AssertionError("the TLS handshake did not finish")


def test_mosquitto_waits_for_its_certificates(services: dict[str, Any]) -> None:
    depends_on = services["mosquitto"]["depends_on"]
    assert depends_on["mosquitto-certs"]["condition"] == "service_completed_successfully"
    certs = {target: source for source, target, _ in volume_mounts(services["mosquitto"])}
    assert certs["/mosquitto/certs"] == "mosquitto-certs"
    assert services["mosquitto-certs"]["restart"] == "no"


def test_the_tls_listener_uses_the_files_the_certificate_job_makes(
    mosquitto_config: list[tuple[str, str]],
) -> None:
    for option in ("cafile", "certfile", "keyfile"):
        assert mosquitto_option(mosquitto_config, option).startswith("/mosquitto/certs/")


def test_the_certificate_job_makes_a_server_certificate_clients_can_verify(
    services: dict[str, Any], tmp_path: Path
) -> None:
    script = certificate_script(services, tmp_path)
    subprocess.run(["sh", "-c", script], check=True, capture_output=True)
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "broker.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(names.get_values_for_type(x509.DNSName)) == {"mosquitto", "localhost"}
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    # A TLS client trusting the CA accepts the pair (as iotmeter does with IOTMETER_MQTT_CA_FILE).
    client_context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(tmp_path / "broker.pem", tmp_path / "broker.key")
    handshake(client_context, server_context, "localhost")
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(client_context, server_context, "elsewhere.example")
    # Run again: the existing files are kept (the volume outlives container recreation).
    before = (tmp_path / "broker.pem").read_bytes()
    subprocess.run(["sh", "-c", script], check=True, capture_output=True)
    assert (tmp_path / "broker.pem").read_bytes() == before
