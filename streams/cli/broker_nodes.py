"""One local Kafka node as a process: its config files and storage format, its JVM launched
detached from us, whether a recorded pid is still that node (`is_ours`), waiting for it to go,
and the ends of its logs; and the free ports it listens on. The cluster API on top (start, stop,
status, the record of what runs) is `refold.cli.broker`; nothing here signals a pid without
`is_ours` saying it is the node.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from refold.cli.broker_secure import node_properties as secure_properties
from refold.cli.broker_secure import scram_format_args, secure_dir
from refold.core.errors import BrokerError

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
INSTALL_HINT = (
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
    secure: bool = False  # TLS + SASL/SCRAM + ACLs (refold.cli.broker_secure)

    @property
    def secure_dir(self) -> Path | None:
        """Where the secured cluster's CA, certificate and credentials live."""
        return secure_dir(self.nodes[0].dir.parent) if self.secure else None

    @property
    def logs(self) -> tuple[Path, ...]:
        return tuple(node.log for node in self.nodes)


def java_path() -> str:
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home, "bin", "java")) if home else shutil.which("java")
    if not java or not os.access(java, os.X_OK):
        raise BrokerError("Java (`java`) is not on PATH or JAVA_HOME", hint=INSTALL_HINT)
    return java


def node_properties(info: BrokerInfo, node: NodeInfo) -> str:
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
    folder = info.secure_dir
    if folder is not None:
        passwords = json.loads((folder / "credentials.json").read_text())
        props.update(secure_properties(folder, passwords, node.port, node.controller_port))
    if len(info.nodes) > 1:
        # Fence a dead node within seconds (default 9 s), so fault tests and demos fail over fast.
        props["broker.heartbeat.interval.ms"] = 1000
        props["broker.session.timeout.ms"] = 3000
    return "".join(f"{key}={value}\n" for key, value in props.items())


def prepare_nodes(java: str, jars: Path, info: BrokerInfo, nodes: list[NodeInfo]) -> None:
    """Write the nodes' config files and format the storage of new ones (in parallel)."""
    formats: list[tuple[NodeInfo, subprocess.Popen[str]]] = []
    for node in nodes:
        node.dir.mkdir(parents=True, exist_ok=True)
        node.properties.write_text(node_properties(info, node))
        (node.dir / "log4j2.properties").write_text(_LOG4J2.format(dir=node.dir))
        if not (node.dir / "data" / "meta.properties").is_file():
            cmd = [java, "-Xmx256m", f"-Dlog4j2.configurationFile={node.dir}/log4j2.properties",
                   "-cp", f"{jars}/*", "kafka.tools.StorageTool",
                   "format", "-t", info.cluster_id, "-c", str(node.properties)]  # fmt: skip
            if info.secure_dir is not None:  # the roles' SCRAM credentials, in the metadata log
                passwords = json.loads((info.secure_dir / "credentials.json").read_text())
                cmd += scram_format_args(passwords)
            out = subprocess.PIPE
            formats.append((node, subprocess.Popen(cmd, stdout=out, stderr=out, text=True)))
    for node, proc in formats:
        output, errors = proc.communicate(timeout=120)
        if proc.returncode != 0:
            raise BrokerError(
                f"could not format Kafka storage in {node.dir}:\n{last_lines(output + errors)}",
                hint="`refold broker start --fresh` wipes the local broker data",
            )


def launch_node(java: str, jars: Path, node: NodeInfo, heap_mb: int) -> NodeInfo:
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


def is_ours(node: NodeInfo) -> bool:
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


def wait_gone(nodes: list[NodeInfo], timeout: float) -> list[NodeInfo]:
    """Wait until none of `nodes` runs; return those still running after `timeout`."""
    deadline = time.monotonic() + timeout
    while (live := [n for n in nodes if is_ours(n)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return live


def node_tail(node: NodeInfo) -> str:
    """The node's first errors (why it stopped, usually) and the ends of its logs."""
    text = read_end(node.log, 1 << 20)
    errors = [line for line in text.splitlines() if " ERROR " in line or " FATAL " in line][:5]
    first = "first errors:\n" + "\n".join(errors) + "\n" if errors else ""
    console, server = (
        last_lines(read_end(p), n) for p, n in ((node.console_log, 10), (node.log, 15))
    )
    return f"--- node {node.node_id} ({node.dir}) ---\n{first}{console}{server}"


def read_end(path: Path, size: int = 16384) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - size))
            return handle.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def read_all(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def last_lines(text: str, count: int = 20, width: int = 300) -> str:
    return "".join(line[:width] + "\n" for line in text.strip().splitlines()[-count:])


# -- ports -----------------------------------------------------------------------------------


def free_port() -> int:
    """A loopback TCP port the OS says is free right now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def ephemeral_range() -> tuple[int, int]:
    """The ports the kernel hands to outgoing connections (and to bind(port 0))."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return low, high


def quiet_port(exclude: Sequence[int] = ()) -> int:
    """A free loopback port below the ephemeral range, which no outgoing connection takes
    (any free port when that range leaves no room below it)."""
    low, _high = ephemeral_range()
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20_000, low) if low > 20_100 else free_port()
        if port not in exclude and port_free(port):
            return port
    return free_port()


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        # Java listeners set SO_REUSEADDR, so sockets in TIME_WAIT do not block them either.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True
