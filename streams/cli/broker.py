"""Local Apache Kafka: assemble the broker from Maven Central and run it in KRaft mode on loopback.

Each node is one JVM acting as broker and controller, with its data under
`<data_dir>/broker/node-<id>/`. What runs is recorded in `<data_dir>/broker/broker.json` (the file
`Config.bootstrap_servers` reads); `stop` and `kill_node` signal only the pids recorded there, and
only after checking that the pid still runs `kafka.Kafka` with that node's properties file.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from refold.core.config import Config
from refold.core.errors import BrokerError
from refold.kafka import clients

log = logging.getLogger(__name__)

#: The Maven assembly of the broker, shipped in the package (refold.deploy), not read from a
#: checkout.
POM = Path(str(resources.files("refold.deploy") / "kafka" / "pom.xml"))
DEFAULT_PORT = 19092
HOST = "127.0.0.1"
_MARKER = ".refold-complete"
_ACTIVE_CONTROLLER = re.compile(
    r"\[QuorumController id=(\d+)\] Becoming the active controller at epoch (\d+)"
)
_POM_NS = "http://maven.apache.org/POM/4.0.0"
_INSTALL_HINT = (
    "install OpenJDK 17 and Maven, or use deploy/docker-compose.yml "
    "and set REFOLD_BOOTSTRAP_SERVERS"
)
# Broker log to server.log (rolled at 50 MB); only warnings reach the JVM's console.log.
_LOG4J2 = """\
status = warn
shutdownHook = disable
appender.file.type = RollingFile
appender.file.name = file
appender.file.fileName = {dir}/server.log
appender.file.filePattern = {dir}/server.log.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = SizeBasedTriggeringPolicy
appender.file.policies.size = 50MB
appender.console.type = Console
appender.console.name = console
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
appender.console.filter.threshold.type = ThresholdFilter
appender.console.filter.threshold.level = warn
rootLogger = info, file, console
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
    def log(self) -> Path:  # the broker's log, INFO and up
        return self.dir / "server.log"

    @property
    def console_log(self) -> Path:  # the JVM's stdout/stderr: warnings, errors, crashes
        return self.dir / "console.log"


@dataclass(frozen=True, slots=True)
class BrokerInfo:
    """A local cluster: where clients connect and where each node lives and logs."""

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
    version = root.findtext("m:properties/m:kafka.version", namespaces={"m": _POM_NS})
    if not version:
        raise BrokerError(f"{pom} has no <kafka.version> property")
    return version.strip()


def jars_dir() -> Path:
    """The broker jars: `$REFOLD_KAFKA_CACHE/kafka-<version>`, by default under ~/.cache/refold."""
    cache = os.environ.get("REFOLD_KAFKA_CACHE") or Path.home() / ".cache" / "refold"
    return Path(cache) / f"kafka-{kafka_version()}"


def ensure_jars() -> Path:
    """Copy the broker and its dependencies into `jars_dir()` with Maven, unless already done.

    Maven fills a sibling temp dir that then replaces `jars_dir()` whole, so jars left by an older
    pom never mix with the new ones; the marker (the pom's digest) is written only on success.
    """
    target, digest = jars_dir(), hashlib.sha256(POM.read_bytes()).hexdigest()
    marker = target / _MARKER
    if marker.is_file() and marker.read_text().strip() == digest:
        return target
    _java()
    if (mvn := shutil.which("mvn")) is None:
        raise BrokerError("Maven (`mvn`) is not on PATH", hint=_INSTALL_HINT)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _flock(target.parent / f".{target.name}.lock"):
        if marker.is_file() and marker.read_text().strip() == digest:
            return target  # another process assembled it while we waited
        log.info("assembling Apache Kafka %s into %s with Maven", kafka_version(), target)
        staging = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        # Maven runs on a copy of the pom beside the cache: the installed package may be
        # read-only, and Maven may write a target/ folder next to the pom.
        work = target.with_name(f"{target.name}.pom-{os.getpid()}")
        work.mkdir(exist_ok=True)
        pom = work / "pom.xml"
        shutil.copyfile(POM, pom)
        cmd = [mvn, "-q", "-B", "-Dstyle.color=never", "-f", str(pom),
               "dependency:copy-dependencies", f"-Drefold.kafka.dir={staging}"]  # fmt: skip
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
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


def start(
    config: Config,
    nodes: int = 1,
    port: int | None = None,
    fresh: bool = False,
    heap_mb: int = 512,
    timeout: float = 60.0,
) -> BrokerInfo:
    """Start (or find running) a local cluster of 1 or 3 nodes; return once all of them answer.

    `port` is the first node's client port (the others try the next ones); without it 19092 is
    used when free, else any free port. Data and ports are kept across stop/start; `fresh` stops
    the cluster and wipes its data first.
    """
    if nodes not in (1, 3):
        raise BrokerError(f"a local cluster has 1 or 3 nodes, not {nodes}")
    jars, java = ensure_jars(), _java()
    with _locked(config):
        if fresh:
            try:
                old = _recorded_nodes(config)
            except BrokerError as exc:  # a broken record is one reason to start fresh
                log.warning("ignoring %s", exc)
                old = []
            _signal_and_wait(config, old, 30.0)
            _wipe(config)
            if port is None and old and _port_free(old[0].port):
                port = old[0].port  # a wiped cluster comes back at the same address
        info = _read_record(config)
        running = info is not None and any(_is_ours(n) for n in info.nodes)
        if info is not None and len(info.nodes) != nodes:
            raise BrokerError(
                f"{_broker_dir(config)} holds a {len(info.nodes)}-node cluster"
                + (" that is running" if running else ""),
                hint=f"use --nodes {len(info.nodes)}, or --fresh to wipe it",
            )
        if info is not None and port not in (None, info.nodes[0].port) and running:
            raise BrokerError(
                f"the local broker already runs on {info.bootstrap_servers}",
                hint="`refold broker stop` first to move it to another port",
            )
        if info is None or port not in (None, info.nodes[0].port) or _ports_lost(info, running):
            info = _new_layout(config, nodes, port, heap_mb, info)
        launched = [n for n in info.nodes if not _is_ours(n)]
        if launched:
            info = replace(info, heap_mb=heap_mb)
            _prepare(java, jars, info, launched)
            launched = [_launch(java, jars, n, heap_mb) for n in launched]
            info = replace(info, nodes=tuple(_pick(launched, n) for n in info.nodes))
            _write_record(config, info)
        record = info

        def relaunch(node: NodeInfo) -> NodeInfo:
            again = _launch(java, jars, node, heap_mb)
            launched[:] = [again if n.node_id == node.node_id else n for n in launched]
            _write_record(config, _with_pids(record, {n.node_id: n.pid for n in launched}))
            return again

        try:
            nodes_now = _wait_for(
                info, [n.node_id for n in info.nodes], timeout, relaunch if launched else None
            )
        except BrokerError:
            _signal_and_wait(config, launched, 10.0)
            raise
        info = replace(info, nodes=tuple(_pick(nodes_now, n) for n in info.nodes))
        log.info("Kafka %s answering on %s", kafka_version(), info.bootstrap_servers)
        return info


def stop(config: Config, timeout: float = 30.0) -> int:
    """Stop the recorded nodes (SIGTERM, SIGKILL after `timeout`); return how many were running.

    Data and recorded ports stay, so the next `start` brings back the same cluster.
    """
    with _locked(config):
        return _signal_and_wait(config, _recorded_nodes(config), timeout)


def kill_node(
    config: Config, node_id: int, sig: signal.Signals = signal.SIGKILL, timeout: float = 30.0
) -> None:
    """Send `sig` to one recorded node and wait until it is gone (for fault tests)."""
    with _locked(config):
        info = _require_record(config)
        node = _node(info, node_id)
        if node.pid is None or not _is_ours(node):
            raise BrokerError(f"Kafka node {node_id} is not running")
        log.info("sending %s to Kafka node %d (pid %d)", sig.name, node_id, node.pid)
        os.kill(node.pid, sig)
        if _wait_gone([node], timeout):
            raise BrokerError(f"Kafka node {node_id} still runs {timeout:.0f}s after {sig.name}")
        _write_record(config, _with_pids(info, {node_id: None}))


def start_node(config: Config, node_id: int, timeout: float = 60.0) -> NodeInfo:
    """Restart one recorded node and wait until the cluster lists it again."""
    jars, java = ensure_jars(), _java()
    with _locked(config):
        info = _require_record(config)
        node = _node(info, node_id)
        if not _is_ours(node):
            for port in (node.port, node.controller_port):
                if not _port_free(port):
                    raise BrokerError(
                        f"port {port} of Kafka node {node_id} was taken while the node was down",
                        hint="the local cluster's ports are fixed; free it, or start --fresh",
                    )
            _prepare(java, jars, info, [node])
            node = _launch(java, jars, node, info.heap_mb)
            info = _with_pids(info, {node_id: node.pid})
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


def active_controller(config: Config) -> int | None:
    """The node that is the KRaft active controller now (for fault tests), or None if unknown.

    Kafka clients cannot tell: in KRaft a broker answers DescribeCluster and Metadata with a
    random live broker as "the controller" (measured on this cluster: 2, 3, 3, 2, 3 for five
    calls while node 2 was active). The nodes' own logs say it: the highest epoch a running node
    announced "Becoming the active controller at" is the current one.
    """
    best: tuple[int, int] | None = None  # (epoch, node id)
    for node in _recorded_nodes(config):
        if not _is_ours(node):
            continue
        for match in _ACTIVE_CONTROLLER.finditer(_read_all(node.log)):
            seen = (int(match[2]), int(match[1]))
            best = seen if best is None or seen > best else best
    return None if best is None else best[1]


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


def wait_until_answering(
    bootstrap: str, brokers: int = 1, timeout: float = 60.0
) -> tuple[int, ...]:
    """Wait until any Kafka at `bootstrap` (ours or not) lists `brokers` brokers; return ids."""
    admin, deadline = _admin(bootstrap), time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        seen = _metadata_brokers(admin, min(2.0, remaining))
        if seen is not None and len(seen) >= brokers:
            return seen
        time.sleep(0.2)
    raise BrokerError(f"Kafka on {bootstrap} did not list {brokers} broker(s) in {timeout:.0f}s")


def free_port() -> int:
    """A loopback TCP port the OS says is free right now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _java() -> str:
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home, "bin", "java")) if home else shutil.which("java")
    if not java or not os.access(java, os.X_OK):
        raise BrokerError("Java (`java`) is not on PATH or JAVA_HOME", hint=_INSTALL_HINT)
    return java


def _new_layout(
    config: Config, nodes: int, port: int | None, heap_mb: int, old: BrokerInfo | None
) -> BrokerInfo:
    """Pick ports; keep the cluster id (and so the data) of an existing cluster."""
    if port is not None and not _port_free(port):
        raise BrokerError(f"port {port} on {HOST} is in use", hint="pick another --port or omit it")
    base = port if port is not None else (DEFAULT_PORT if _port_free(DEFAULT_PORT) else None)
    chosen: list[int] = []
    # Controller ports follow the client ports: a port picked by the OS is in the ephemeral
    # range, where any outgoing connection on the machine may take it while its node is down.
    for preferred in [None if base is None else base + i for i in range(2 * nodes)]:
        pick = preferred if preferred is not None and _port_free(preferred) else free_port()
        while pick in chosen:
            pick = free_port()
        chosen.append(pick)
    id_file = _broker_dir(config) / "cluster.id"
    if old is None and not id_file.is_file():
        id_file.write_text(_random_uuid() + "\n")
    cluster_id = old.cluster_id if old is not None else id_file.read_text().strip()
    dirs = [_broker_dir(config) / f"node-{i + 1}" for i in range(nodes)]
    infos = tuple(
        NodeInfo(i + 1, None, chosen[i], chosen[nodes + i], dirs[i]) for i in range(nodes)
    )
    return BrokerInfo(",".join(f"{HOST}:{p}" for p in chosen[:nodes]), cluster_id, infos, heap_mb)


def _ports_lost(info: BrokerInfo, running: bool) -> bool:
    """True when the cluster is down and someone else took one of its recorded ports."""
    ports = [p for n in info.nodes for p in (n.port, n.controller_port)]
    return not running and not all(_port_free(p) for p in ports)


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
        if not (node.dir / "data" / "meta.properties").is_file():
            cmd = [java, "-Xmx256m", f"-Dlog4j2.configurationFile={node.dir}/log4j2.properties",
                   "-cp", f"{jars}/*", "kafka.tools.StorageTool",
                   "format", "-t", info.cluster_id, "-c", str(node.properties)]  # fmt: skip
            out = subprocess.PIPE
            formats.append((node, subprocess.Popen(cmd, stdout=out, stderr=out, text=True)))
    for node, proc in formats:
        output, errors = proc.communicate(timeout=120)
        if proc.returncode != 0:
            raise BrokerError(
                f"could not format Kafka storage in {node.dir}:\n{_last_lines(output + errors)}",
                hint="`refold broker start --fresh` wipes the local broker data",
            )


def _launch(java: str, jars: Path, node: NodeInfo, heap_mb: int) -> NodeInfo:
    """Start the node's JVM detached from us; return the node with its pid."""
    # The JVM's temp dir (where lz4-java unpacks its native library on every start, and never
    # removes it) lives with the node's data, not in the machine's /tmp.
    (node.dir / "tmp").mkdir(parents=True, exist_ok=True)
    cmd = [java, f"-Xmx{heap_mb}m", f"-Xms{heap_mb}m", "-XX:+ExitOnOutOfMemoryError",
           "-Djava.awt.headless=true", f"-Dlog4j2.configurationFile={node.dir}/log4j2.properties",
           f"-Djava.io.tmpdir={node.dir}/tmp",
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
    pid = int(done.stdout)
    log.info("started Kafka node %d (pid %d) on %s:%d", node.node_id, pid, HOST, node.port)
    return replace(node, pid=pid)


def _admin(bootstrap: str) -> AdminClient:
    """An admin client for the nodes this launcher started (plain loopback, no user settings)."""
    conf: dict[str, Any] = {
        "reconnect.backoff.max.ms": 500,
        "socket.connection.setup.timeout.ms": 3000,
        "log_level": 2,  # refused connections are expected while the broker boots
        "error_cb": lambda err: log.debug("admin client: %s", err),
    }
    return clients.admin(Config(bootstrap_override=bootstrap), **conf)


def _metadata_brokers(admin: AdminClient, timeout: float) -> tuple[int, ...] | None:
    try:
        return tuple(sorted(admin.list_topics(timeout=timeout).brokers))
    except KafkaException as exc:
        log.debug("metadata request failed: %s", exc)
        return None


def _wait_for(
    info: BrokerInfo,
    node_ids: list[int],
    timeout: float,
    relaunch: Callable[[NodeInfo], NodeInfo] | None = None,
) -> list[NodeInfo]:
    """Wait until the metadata lists every node in `node_ids`; return those nodes. A node that
    exits while starting is started once more by `relaunch` (a KRaft node on a loaded machine
    can give up on its first quorum contact), else, or the second time, it fails at once."""
    admin, deadline = _admin(info.bootstrap_servers), time.monotonic() + timeout
    waiting = [n for n in info.nodes if n.node_id in node_ids]
    relaunched: set[int] = set()
    seen: tuple[int, ...] | None = None
    while (remaining := deadline - time.monotonic()) > 0:
        for i, node in enumerate(waiting):
            if _is_ours(node):
                continue
            why = f"Kafka node {node.node_id} exited while starting:\n{_node_tail(node)}"
            if relaunch is None or node.node_id in relaunched:
                raise BrokerError(why, hint=f"full log: {node.log}")
            log.warning("%s\nstarting it once more", why)
            relaunched.add(node.node_id)
            waiting[i] = relaunch(node)
            deadline = max(deadline, time.monotonic() + timeout / 2)
        seen = _metadata_brokers(admin, min(2.0, remaining))
        if seen is not None and set(node_ids) <= set(seen):
            return waiting
        time.sleep(0.2)
    raise BrokerError(
        f"Kafka on {info.bootstrap_servers} did not list nodes {node_ids} within {timeout:.0f}s"
        f" (it listed {list(seen or ())}):\n" + "".join(_node_tail(n) for n in waiting),
        hint=f"see the node logs under {info.nodes[0].dir.parent}",
    )


def _signal_and_wait(config: Config, nodes: list[NodeInfo], timeout: float) -> int:
    """SIGTERM our live nodes, SIGKILL those left after `timeout`, clear their recorded pids."""
    live = [n for n in nodes if n.pid is not None and _is_ours(n)]
    for node in live:
        log.info("stopping Kafka node %d (pid %s)", node.node_id, node.pid)
        os.kill(node.pid, signal.SIGTERM)  # type: ignore[arg-type]
    for node in _wait_gone(live, timeout):
        log.warning("Kafka node %d ignored SIGTERM for %.0fs; killing it", node.node_id, timeout)
        os.kill(node.pid, signal.SIGKILL)  # type: ignore[arg-type]
    if survivors := _wait_gone(live, 10.0):
        raise BrokerError(f"Kafka nodes {[n.node_id for n in survivors]} survived SIGKILL")
    if (info := _read_record(config)) is not None:
        _write_record(config, _with_pids(info, {n.node_id: None for n in nodes}))
    return len(live)


def _wait_gone(nodes: list[NodeInfo], timeout: float) -> list[NodeInfo]:
    """Wait until none of `nodes` runs; return those still running after `timeout`."""
    deadline = time.monotonic() + timeout
    while (live := [n for n in nodes if _is_ours(n)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return live


def _is_ours(node: NodeInfo) -> bool:
    """True if `node.pid` is alive and runs kafka.Kafka with this node's properties file."""
    if node.pid is None:
        return False
    try:
        args = Path(f"/proc/{node.pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except FileNotFoundError:
        return False  # gone (a zombie has an empty cmdline, so it counts as gone too)
    except OSError:  # no procfs (macOS): ask ps
        cmd = ["ps", "-o", "command=", "-p", str(node.pid)]
        args = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.split()
    return "kafka.Kafka" in args and str(node.properties) in args


def _broker_dir(config: Config) -> Path:
    return config.broker_record.parent.resolve()


@contextmanager
def _flock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock across processes (two `broker start` at once, say)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _locked(config: Config) -> contextlib.AbstractContextManager[None]:
    return _flock(_broker_dir(config) / ".lock")


def _wipe(config: Config) -> None:
    """Delete the local cluster's data and record, keeping the lock file we hold."""
    for child in _broker_dir(config).iterdir():
        if child.is_dir():
            shutil.rmtree(child)
        elif child.name != ".lock":
            child.unlink()
    log.info("wiped local Kafka data in %s", _broker_dir(config))


def _read_record(config: Config) -> BrokerInfo | None:
    try:
        raw = json.loads(config.broker_record.read_text())
        nodes = tuple(NodeInfo(**{**n, "dir": Path(n["dir"])}) for n in raw["nodes"])
        return BrokerInfo(raw["bootstrap_servers"], raw["cluster_id"], nodes, raw["heap_mb"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        raise BrokerError(
            f"broken broker record {config.broker_record}: {exc!r}",
            hint="`refold broker start --fresh` starts over",
        ) from exc


def _require_record(config: Config) -> BrokerInfo:
    if (info := _read_record(config)) is None:
        raise BrokerError(f"no local broker recorded in {config.broker_record}",
                          hint="`refold broker start` first")  # fmt: skip
    return info


def _recorded_nodes(config: Config) -> list[NodeInfo]:
    info = _read_record(config)
    return [] if info is None else list(info.nodes)


def _write_record(config: Config, info: BrokerInfo) -> None:
    """Replace broker.json atomically so readers never see half a record."""
    record = {**asdict(info), "kafka_version": kafka_version()}
    tmp = config.broker_record.with_name(config.broker_record.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(tmp, config.broker_record)


def _node(info: BrokerInfo, node_id: int) -> NodeInfo:
    if not 1 <= node_id <= len(info.nodes):
        raise BrokerError(f"no Kafka node {node_id}; the local cluster has {len(info.nodes)}")
    return info.nodes[node_id - 1]


def _pick(updated: list[NodeInfo], node: NodeInfo) -> NodeInfo:
    return next((n for n in updated if n.node_id == node.node_id), node)


def _with_pids(info: BrokerInfo, pids: dict[int, int | None]) -> BrokerInfo:
    nodes = (replace(n, pid=pids[n.node_id]) if n.node_id in pids else n for n in info.nodes)
    return replace(info, nodes=tuple(nodes))


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
    """The node's first errors (why it stopped, usually) and the ends of its logs."""
    text = _read_end(node.log, 1 << 20)
    errors = [line for line in text.splitlines() if " ERROR " in line or " FATAL " in line][:5]
    first = "first errors:\n" + "\n".join(errors) + "\n" if errors else ""
    console, server = (
        _last_lines(_read_end(p), n) for p, n in ((node.console_log, 10), (node.log, 15))
    )
    return f"--- node {node.node_id} ({node.dir}) ---\n{first}{console}{server}"


def _read_end(path: Path, size: int = 16384) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - size))
            return handle.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def _read_all(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _last_lines(text: str, count: int = 20, width: int = 300) -> str:
    return "".join(line[:width] + "\n" for line in text.strip().splitlines()[-count:])
