"""Local Apache Kafka: assemble the broker from Maven Central and run it in KRaft mode on loopback.

Each node is one JVM acting as broker and controller, with its data under
`<data_dir>/broker/node-<id>/`. What runs is recorded in `<data_dir>/broker/broker.json` (the file
`Config.bootstrap_servers` reads); `stop` and `kill_node` signal only the pids recorded there, and
only after checking that the pid still runs `kafka.Kafka` with that node's properties file.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from streams.config import Config
from streams.errors import BrokerError

log = logging.getLogger(__name__)

POM = Path(__file__).resolve().parent.parent / "deploy" / "kafka" / "pom.xml"
DEFAULT_PORT = 19092
HOST = "127.0.0.1"
_MARKER = ".refold-complete"
_INSTALL_HINT = (
    "install OpenJDK 17 and Maven, or use deploy/docker-compose.yml "
    "and set REFOLD_BOOTSTRAP_SERVERS"
)
_LOG4J2 = """\
status = warn
shutdownHook = disable
appender.file.type = RollingFile
appender.file.name = file
appender.file.fileName = {dir}/server.log
appender.file.filePattern = {dir}/server.log.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 50MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 3
appender.console.type = Console
appender.console.name = console
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
appender.console.filter.threshold.type = ThresholdFilter
appender.console.filter.threshold.level = warn
rootLogger.level = info
rootLogger.appenderRef.file.ref = file
rootLogger.appenderRef.console.ref = console
"""


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """One KRaft node (broker + controller); `pid` is None when it is not running."""

    node_id: int
    pid: int | None
    port: int
    controller_port: int
    dir: Path

    @property
    def properties(self) -> Path:
        return self.dir / "server.properties"

    @property
    def log(self) -> Path:
        """The broker's own log (INFO and up)."""
        return self.dir / "server.log"

    @property
    def console_log(self) -> Path:
        """The JVM's stdout/stderr: warnings, errors and crashes."""
        return self.dir / "console.log"


@dataclass(frozen=True, slots=True)
class BrokerInfo:
    """A started local cluster: where clients connect and where each node lives and logs."""

    bootstrap_servers: str
    cluster_id: str
    nodes: tuple[NodeInfo, ...]
    heap_mb: int

    @property
    def logs(self) -> tuple[Path, ...]:
        return tuple(node.log for node in self.nodes)


@dataclass(frozen=True, slots=True)
class NodeStatus:
    node_id: int
    running: bool
    pid: int | None
    port: int


@dataclass(frozen=True, slots=True)
class BrokerStatus:
    """What `refold broker status` shows; `brokers` are the node ids the metadata lists."""

    bootstrap_servers: str | None
    nodes: tuple[NodeStatus, ...]
    answering: bool
    brokers: tuple[int, ...]

    @property
    def running(self) -> bool:
        return bool(self.nodes) and all(node.running for node in self.nodes)


def kafka_version(pom: Path = POM) -> str:
    """The Kafka version the Maven assembly pins (`<kafka.version>` in deploy/kafka/pom.xml)."""
    try:
        root = ET.parse(pom).getroot()
    except (OSError, ET.ParseError) as exc:
        raise BrokerError(f"cannot read {pom}: {exc}") from exc
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    version = root.findtext("m:properties/m:kafka.version", namespaces=ns)
    if not version:
        raise BrokerError(f"{pom} has no <kafka.version> property")
    return version.strip()


def jars_dir() -> Path:
    """Where the broker jars live: `$REFOLD_KAFKA_CACHE/kafka-<version>` (default ~/.cache/refold)."""
    cache = os.environ.get("REFOLD_KAFKA_CACHE") or Path.home() / ".cache" / "refold"
    return Path(cache) / f"kafka-{kafka_version()}"


def ensure_jars() -> Path:
    """Copy the broker and its dependencies into `jars_dir()` with Maven, unless already done.

    Maven fills a sibling temp dir that then replaces `jars_dir()` whole, so jars left by an older
    pom never mix with the new ones; the marker (the pom's digest) is written only on success.
    """
    target = jars_dir()
    digest = hashlib.sha256(POM.read_bytes()).hexdigest()
    if _marker_matches(target, digest):
        return target
    _java()
    mvn = shutil.which("mvn")
    if mvn is None:
        raise BrokerError("Maven (`mvn`) is not on PATH", hint=_INSTALL_HINT)
    target.parent.mkdir(parents=True, exist_ok=True)
    with (target.parent / f".{target.name}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _marker_matches(target, digest):  # another process assembled it meanwhile
            return target
        log.info("assembling Apache Kafka %s into %s with Maven", kafka_version(), target)
        staging = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        cmd = [mvn, "-q", "-B", "-Dstyle.color=never", "-f", str(POM),
               "dependency:copy-dependencies", f"-Drefold.kafka.dir={staging}"]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            raise BrokerError(
                f"Maven could not assemble Kafka:\n{_last_lines(done.stdout + done.stderr)}",
                hint="check access to Maven Central (or the mirror in ~/.m2/settings.xml)",
            )
        (staging / _MARKER).write_text(digest + "\n")
        retired = target.with_name(f"{target.name}.old-{os.getpid()}")
        if target.exists():
            os.rename(target, retired)
        os.rename(staging, target)
        shutil.rmtree(retired, ignore_errors=True)
    return target


def _marker_matches(target: Path, digest: str) -> bool:
    marker = target / _MARKER
    return marker.is_file() and marker.read_text().strip() == digest


def start(
    config: Config,
    nodes: int = 1,
    port: int | None = None,
    fresh: bool = False,
    heap_mb: int = 512,
    timeout: float = 60.0,
) -> BrokerInfo:
    """Start (or find running) a local cluster of 1 or 3 nodes and wait until all of them answer.

    `port` is the first node's client port (the others try the next ones); without it 19092 is
    used when free, else any free port. Recorded data and ports are reused across restarts;
    `fresh` stops the cluster and wipes its data first.
    """
    if nodes not in (1, 3):
        raise BrokerError(f"--nodes must be 1 or 3, not {nodes}")
    jars, java = ensure_jars(), _java()
    with _locked(config):
        if fresh:
            _stop(config, timeout=30.0)
            _wipe(config)
        info = _read_record(config)
        if info is not None and len(info.nodes) != nodes:
            running = any(_is_ours(n) for n in info.nodes)
            raise BrokerError(
                f"{_broker_dir(config)} holds a {len(info.nodes)}-node cluster"
                + (" that is running" if running else ""),
                hint=f"use --nodes {len(info.nodes)}, or --fresh to wipe it",
            )
        moved = port is not None and info is not None and port != info.nodes[0].port
        if info is not None and not any(_is_ours(n) for n in info.nodes) and port is None:
            # Someone else took a recorded port while we were down: move rather than fail.
            moved = not all(_port_free(p) for n in info.nodes for p in (n.port, n.controller_port))
        if info is None or moved:
            if info is not None and any(_is_ours(n) for n in info.nodes):
                raise BrokerError(
                    f"the local broker already runs on {info.bootstrap_servers}",
                    hint="`refold broker stop` first to move it to another port",
                )
            info = _new_layout(config, nodes, port, heap_mb, info)
        launched = [n.node_id for n in info.nodes if not _is_ours(n)]
        if launched:
            info = replace(info, heap_mb=heap_mb)
        _prepare(java, jars, info, [n for n in info.nodes if n.node_id in launched])
        info = replace(info, nodes=tuple(
            _launch(java, jars, n, heap_mb) if n.node_id in launched else n for n in info.nodes
        ))  # fmt: skip
        _write_record(config, info)
        try:
            _wait_for(info, [n.node_id for n in info.nodes], timeout)
        except BrokerError:
            _signal_and_wait(config, [n for n in info.nodes if n.node_id in launched], 10.0)
            raise
        log.info("Kafka %s answering on %s", kafka_version(), info.bootstrap_servers)
        return info


def stop(config: Config, timeout: float = 30.0) -> int:
    """Stop the recorded nodes (SIGTERM, then SIGKILL after `timeout`); return how many ran.

    The data and the recorded ports stay, so the next `start` brings back the same cluster.
    """
    with _locked(config):
        return _stop(config, timeout)


def kill_node(
    config: Config, node_id: int, sig: signal.Signals = signal.SIGKILL, timeout: float = 30.0
) -> None:
    """Send `sig` to one recorded node and wait until it is gone (fault tests)."""
    with _locked(config):
        info = _require_record(config)
        node = _node(info, node_id)
        if not _is_ours(node):
            raise BrokerError(f"Kafka node {node_id} is not running")
        log.info("sending %s to Kafka node %d (pid %s)", sig.name, node_id, node.pid)
        assert node.pid is not None
        os.kill(node.pid, sig)
        deadline = time.monotonic() + timeout
        while _is_ours(node):
            if time.monotonic() > deadline:
                raise BrokerError(f"Kafka node {node_id} still runs {timeout:.0f}s after {sig.name}")
            time.sleep(0.1)
        _write_record(config, _with_pid(info, node_id, None))


def start_node(config: Config, node_id: int, timeout: float = 60.0) -> NodeInfo:
    """Restart one recorded node and wait until the cluster lists it again."""
    jars, java = ensure_jars(), _java()
    with _locked(config):
        info = _require_record(config)
        node = _node(info, node_id)
        if not _is_ours(node):
            _prepare(java, jars, info, [node])
            node = _launch(java, jars, node, info.heap_mb)
            info = _with_pid(info, node_id, node.pid)
            _write_record(config, info)
        _wait_for(info, [node_id], timeout)
        return node


def status(config: Config) -> BrokerStatus:
    """Which recorded nodes run, and whether the cluster metadata answers."""
    info = _read_record(config)
    if info is None:
        return BrokerStatus(None, (), False, ())
    nodes = tuple(NodeStatus(n.node_id, _is_ours(n), n.pid, n.port) for n in info.nodes)
    brokers: tuple[int, ...] = ()
    if any(n.running for n in nodes):
        brokers = _metadata_brokers(_admin(info.bootstrap_servers), 3.0) or ()
    return BrokerStatus(info.bootstrap_servers, nodes, bool(brokers), brokers)


def describe_status(state: BrokerStatus) -> str:
    """A few human lines for `refold broker status`."""
    if state.bootstrap_servers is None:
        return "no local broker recorded (run `refold broker start`)"
    answer = f"answering, brokers {list(state.brokers)}" if state.answering else "not answering"
    lines = [f"Kafka at {state.bootstrap_servers}: {answer}"]
    for node in state.nodes:
        what = f"running (pid {node.pid})" if node.running else "stopped"
        lines.append(f"  node {node.node_id} on port {node.port}: {what}")
    return "\n".join(lines)


def wait_until_answering(bootstrap: str, brokers: int = 1, timeout: float = 60.0) -> tuple[int, ...]:
    """Wait until any Kafka at `bootstrap` lists `brokers` brokers; return their ids."""
    admin = _admin(bootstrap)
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        seen = _metadata_brokers(admin, min(2.0, remaining))
        if seen is not None and len(seen) >= brokers:
            return seen
        time.sleep(0.2)
    raise BrokerError(f"Kafka on {bootstrap} did not list {brokers} broker(s) within {timeout:.0f}s")


def free_port() -> int:
    """A loopback TCP port the OS says is free right now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


# --- internals -------------------------------------------------------------------------------


def _java() -> str:
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home, "bin", "java")) if home else shutil.which("java")
    if not java or not os.access(java, os.X_OK):
        raise BrokerError("Java (`java`) is not on PATH or JAVA_HOME", hint=_INSTALL_HINT)
    return java


def _broker_dir(config: Config) -> Path:
    return config.broker_record.parent.resolve()


@contextmanager
def _locked(config: Config) -> Iterator[None]:
    """Serialise start/stop of one data dir across processes (two `broker start` at once)."""
    path = _broker_dir(config) / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _new_layout(
    config: Config, nodes: int, port: int | None, heap_mb: int, old: BrokerInfo | None
) -> BrokerInfo:
    """Pick ports and the cluster id; an existing cluster id (and its data) is kept."""
    if port is not None and not _port_free(port):
        raise BrokerError(f"port {port} on {HOST} is in use", hint="pick another --port or omit it")
    base = port if port is not None else (DEFAULT_PORT if _port_free(DEFAULT_PORT) else None)
    taken: set[int] = set()

    def pick(preferred: int | None) -> int:
        if preferred is not None and preferred not in taken and _port_free(preferred):
            chosen = preferred
        else:
            chosen = free_port()
            while chosen in taken:
                chosen = free_port()
        taken.add(chosen)
        return chosen

    clients = [pick(None if base is None else base + i) for i in range(nodes)]
    controllers = [pick(None) for _ in range(nodes)]
    cluster_file = _broker_dir(config) / "cluster.id"
    if old is not None:
        cluster_id = old.cluster_id
    elif cluster_file.is_file():
        cluster_id = cluster_file.read_text().strip()
    else:
        cluster_id = _random_uuid()
        cluster_file.write_text(cluster_id + "\n")
    infos = tuple(
        NodeInfo(i + 1, None, clients[i], controllers[i], _broker_dir(config) / f"node-{i + 1}")
        for i in range(nodes)
    )
    return BrokerInfo(",".join(f"{HOST}:{p}" for p in clients), cluster_id, infos, heap_mb)


def _random_uuid() -> str:
    """A Kafka cluster id, as `kafka-storage random-uuid` makes them, without starting a JVM."""
    while True:
        text = base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("=")
        if not text.startswith("-"):  # Kafka rejects ids that would parse as a CLI flag
            return text


def _properties(info: BrokerInfo, node: NodeInfo) -> str:
    """server.properties for one combined node; replication follows the cluster size."""
    rf, isr = (3, 2) if len(info.nodes) == 3 else (1, 1)
    voters = ",".join(f"{n.node_id}@{HOST}:{n.controller_port}" for n in info.nodes)
    props: dict[str, object] = {
        "process.roles": "broker,controller",
        "node.id": node.node_id,
        "controller.quorum.voters": voters,
        "listeners": f"PLAINTEXT://{HOST}:{node.port},CONTROLLER://{HOST}:{node.controller_port}",
        "advertised.listeners": f"PLAINTEXT://{HOST}:{node.port}",
        "inter.broker.listener.name": "PLAINTEXT",
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": node.dir / "data",
        "num.partitions": 6,
        "default.replication.factor": rf,
        "min.insync.replicas": isr,
        "offsets.topic.replication.factor": rf,
        "transaction.state.log.replication.factor": rf,
        "transaction.state.log.min.isr": isr,
        "share.coordinator.state.topic.replication.factor": rf,
        "share.coordinator.state.topic.min.isr": isr,
        "auto.create.topics.enable": "false",
        "group.initial.rebalance.delay.ms": 0,
    }
    if len(info.nodes) > 1:
        # Fence a dead node within seconds (default 9 s), so fault tests and demos fail over fast.
        props["broker.heartbeat.interval.ms"] = 1000
        props["broker.session.timeout.ms"] = 3000
    return "".join(f"{key}={value}\n" for key, value in props.items())


def _prepare(java: str, jars: Path, info: BrokerInfo, nodes: list[NodeInfo]) -> None:
    """Write the nodes' config files and format the storage of new ones (in parallel)."""
    formats: list[tuple[NodeInfo, subprocess.Popen[str]]] = []
    for node in nodes:
        node.dir.mkdir(parents=True, exist_ok=True)
        node.properties.write_text(_properties(info, node))
        (node.dir / "log4j2.properties").write_text(_LOG4J2.format(dir=node.dir))
        if (node.dir / "data" / "meta.properties").is_file():
            continue
        cmd = [java, "-Xmx256m", f"-Dlog4j2.configurationFile={node.dir / 'log4j2.properties'}",
               "-cp", f"{jars}/*", "kafka.tools.StorageTool",
               "format", "-t", info.cluster_id, "-c", str(node.properties)]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        formats.append((node, proc))
    for node, proc in formats:
        output, _ = proc.communicate(timeout=120)
        if proc.returncode != 0:
            raise BrokerError(
                f"could not format Kafka storage in {node.dir}:\n{_last_lines(output)}",
                hint="`refold broker start --fresh` wipes the local broker data",
            )


def _launch(java: str, jars: Path, node: NodeInfo, heap_mb: int) -> NodeInfo:
    """Start the node's JVM detached from us and return it with its pid."""
    cmd = [java, f"-Xmx{heap_mb}m", f"-Xms{heap_mb}m", "-XX:+ExitOnOutOfMemoryError",
           "-Djava.awt.headless=true",
           f"-Dlog4j2.configurationFile={node.dir / 'log4j2.properties'}",
           "-cp", f"{jars}/*", "kafka.Kafka", str(node.properties)]  # fmt: skip
    # `sh` starts the JVM in the background and exits, so the broker is re-parented to init:
    # it outlives the CLI that started it and never lingers as our zombie once it exits.
    script = '"$@" </dev/null >>"$0" 2>&1 & echo $!'
    done = subprocess.run(
        ["/bin/sh", "-c", script, str(node.console_log), *cmd],
        capture_output=True, text=True, check=False, start_new_session=True, cwd=node.dir,
    )  # fmt: skip
    if done.returncode != 0 or not done.stdout.strip().isdigit():
        raise BrokerError(f"could not launch Kafka node {node.node_id}: {done.stderr.strip()}")
    pid = int(done.stdout.strip())
    log.info("started Kafka node %d (pid %d) on %s:%d", node.node_id, pid, HOST, node.port)
    return replace(node, pid=pid)


def _admin(bootstrap: str) -> AdminClient:
    return AdminClient({
        "bootstrap.servers": bootstrap,
        "reconnect.backoff.max.ms": 500,
        "socket.connection.setup.timeout.ms": 3000,
        "log_level": 2,  # refused connections are expected while the broker boots
        "error_cb": lambda err: log.debug("admin client: %s", err),
    })  # fmt: skip


def _metadata_brokers(admin: AdminClient, timeout: float) -> tuple[int, ...] | None:
    try:
        metadata = admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        log.debug("metadata request failed: %s", exc)
        return None
    return tuple(sorted(metadata.brokers))


def _wait_for(info: BrokerInfo, node_ids: list[int], timeout: float) -> None:
    """Wait until the metadata lists every node in `node_ids`; fail fast if one exits."""
    admin = _admin(info.bootstrap_servers)
    deadline = time.monotonic() + timeout
    seen: tuple[int, ...] | None = None
    while True:
        for node in info.nodes:
            if node.node_id in node_ids and not _is_ours(node):
                raise BrokerError(
                    f"Kafka node {node.node_id} exited while starting:\n{_node_tail(node)}",
                    hint=f"full log: {node.log}",
                )
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            tails = "\n".join(_node_tail(n) for n in info.nodes if n.node_id in node_ids)
            raise BrokerError(
                f"Kafka on {info.bootstrap_servers} did not list nodes {node_ids} within "
                f"{timeout:.0f}s (it listed {list(seen or ())}):\n{tails}",
                hint="see the node logs under " + str(info.nodes[0].dir.parent),
            )
        seen = _metadata_brokers(admin, min(2.0, max(remaining, 0.1)))
        if seen is not None and set(node_ids) <= set(seen):
            return
        time.sleep(0.2)


def _stop(config: Config, timeout: float) -> int:
    info = _read_record(config)
    if info is None:
        return 0
    return _signal_and_wait(config, list(info.nodes), timeout)


def _signal_and_wait(config: Config, nodes: list[NodeInfo], timeout: float) -> int:
    """SIGTERM our live nodes, SIGKILL those left after `timeout`, clear their recorded pids."""
    live = [n for n in nodes if _is_ours(n)]
    count = len(live)
    for node in live:
        assert node.pid is not None
        log.info("stopping Kafka node %d (pid %d)", node.node_id, node.pid)
        os.kill(node.pid, signal.SIGTERM)
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        deadline = time.monotonic() + wait
        while (live := [n for n in live if _is_ours(n)]) and time.monotonic() < deadline:
            time.sleep(0.1)
        if live and sig is signal.SIGTERM:
            for node in live:
                log.warning("Kafka node %d ignored SIGTERM for %.0fs; killing", node.node_id, wait)
                os.kill(node.pid, signal.SIGKILL)  # type: ignore[arg-type]
    if live:
        raise BrokerError(f"Kafka nodes {[n.node_id for n in live]} survived SIGKILL")
    info = _read_record(config)
    if info is not None:
        for node in nodes:
            info = _with_pid(info, node.node_id, None)
        _write_record(config, info)
    return count


def _is_ours(node: NodeInfo) -> bool:
    """True if `node.pid` is alive and runs kafka.Kafka with this node's properties file."""
    if node.pid is None:
        return False
    try:
        raw = Path(f"/proc/{node.pid}/cmdline").read_bytes()
        args = raw.decode(errors="replace").split("\0")
    except FileNotFoundError:
        return False
    except OSError:  # no procfs (macOS): ask ps
        done = subprocess.run(["ps", "-o", "command=", "-p", str(node.pid)],
                              capture_output=True, text=True, check=False)  # fmt: skip
        args = done.stdout.split()
    return "kafka.Kafka" in args and str(node.properties) in args


def _wipe(config: Config) -> None:
    """Delete the local cluster's data and record, keeping the lock file we hold."""
    for child in _broker_dir(config).iterdir():
        if child.name == ".lock":
            continue
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()
    log.info("wiped local Kafka data in %s", _broker_dir(config))


def _read_record(config: Config) -> BrokerInfo | None:
    path = config.broker_record
    try:
        raw = json.loads(path.read_text())
        nodes = tuple(
            NodeInfo(n["node_id"], n["pid"], n["port"], n["controller_port"], Path(n["dir"]))
            for n in raw["nodes"]
        )
        return BrokerInfo(raw["bootstrap_servers"], raw["cluster_id"], nodes, raw["heap_mb"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        raise BrokerError(
            f"broken broker record {path}: {exc!r}", hint="`refold broker start --fresh`"
        ) from exc


def _require_record(config: Config) -> BrokerInfo:
    info = _read_record(config)
    if info is None:
        raise BrokerError(f"no local broker recorded in {config.broker_record}",
                          hint="`refold broker start` first")  # fmt: skip
    return info


def _write_record(config: Config, info: BrokerInfo) -> None:
    """Replace broker.json atomically so readers never see half a record."""
    record = {
        "bootstrap_servers": info.bootstrap_servers,
        "cluster_id": info.cluster_id,
        "kafka_version": kafka_version(),
        "heap_mb": info.heap_mb,
        "nodes": [
            {"node_id": n.node_id, "pid": n.pid, "port": n.port,
             "controller_port": n.controller_port, "dir": str(n.dir)}  # fmt: skip
            for n in info.nodes
        ],
    }
    path = config.broker_record
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


def _node(info: BrokerInfo, node_id: int) -> NodeInfo:
    for node in info.nodes:
        if node.node_id == node_id:
            return node
    raise BrokerError(f"no Kafka node {node_id}; the local cluster has {len(info.nodes)} node(s)")


def _with_pid(info: BrokerInfo, node_id: int, pid: int | None) -> BrokerInfo:
    nodes = tuple(replace(n, pid=pid) if n.node_id == node_id else n for n in info.nodes)
    return replace(info, nodes=nodes)


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        # Java listeners set SO_REUSEADDR, so sockets in TIME_WAIT do not block them either.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def _node_tail(node: NodeInfo) -> str:
    text = _last_lines(_read_tail(node.console_log), 10) + _last_lines(_read_tail(node.log), 15)
    return f"--- node {node.node_id} ({node.dir}) ---\n{text}"


def _read_tail(path: Path, size: int = 16384) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - size))
            return handle.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def _last_lines(text: str, count: int = 20) -> str:
    lines = text.strip().splitlines()[-count:]
    return "".join(line + "\n" for line in lines)
