"""Local Apache Kafka: assemble the broker from Maven Central and run it in KRaft mode on loopback.

Each node is one JVM acting as broker and controller, with its data under
`<data_dir>/broker/node-<id>/`. What runs is recorded in `<data_dir>/broker/broker.json` (the file
`Config.bootstrap_servers` reads); `stop` and `kill_node` signal only the pids recorded there, and
only after checking that the pid still runs `kafka.Kafka` with that node's properties file.
Each node's process (config files, launch, that check, its logs) is `refold.cli.broker_nodes`.
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
from refold.cli.broker_nodes import (
    HOST,
    INSTALL_HINT,
    BrokerInfo,
    NodeInfo,
    ephemeral_range,
    free_port,
    is_ours,
    java_path,
    last_lines,
    launch_node,
    node_tail,
    port_free,
    prepare_nodes,
    quiet_port,
    read_all,
    wait_gone,
)
from refold.cli.broker_secure import client_settings, create_acls, env_lines, secure_dir
from refold.cli.broker_secure import prepare as prepare_secure
from refold.core.config import Config
from refold.core.errors import BrokerError
from refold.kafka import clients

log = logging.getLogger(__name__)

#: The Maven assembly of the broker, shipped in the package (refold.deploy), not read from a
#: checkout.
POM = Path(str(resources.files("refold.deploy") / "kafka" / "pom.xml"))
DEFAULT_PORT = 19092
_MARKER = ".refold-complete"
_ACTIVE_CONTROLLER = re.compile(
    r"\[QuorumController id=(\d+)\] Becoming the active controller at epoch (\d+)"
)
_POM_NS = "http://maven.apache.org/POM/4.0.0"


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
    java_path()
    if (mvn := shutil.which("mvn")) is None:
        raise BrokerError("Maven (`mvn`) is not on PATH", hint=INSTALL_HINT)
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
                f"Maven could not assemble Kafka:\n{last_lines(done.stdout + done.stderr)}",
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
    secure: bool = False,
) -> BrokerInfo:
    """Start (or find running) a local cluster of 1 or 3 nodes; return once all of them answer.

    `secure`: clients connect over TLS with SASL/SCRAM and ACLs (refold.cli.broker_secure);
    chosen when the cluster is made (its data holds the credentials), kept across restarts.

    `port` is the first node's client port (the others try the next ones); without it 19092 is
    used when free, else any free port. Data and ports are kept across stop/start; `fresh` stops
    the cluster and wipes its data first.
    """
    if nodes not in (1, 3):
        raise BrokerError(f"a local cluster has 1 or 3 nodes, not {nodes}")
    jars, java = ensure_jars(), java_path()
    with _locked(config):
        if fresh:
            try:
                old = _recorded_nodes(config)
            except BrokerError as exc:  # a broken record is one reason to start fresh
                log.warning("ignoring %s", exc)
                old = []
            _signal_and_wait(config, old, 30.0)
            _wipe(config)
            if port is None and old and port_free(old[0].port):
                port = old[0].port  # a wiped cluster comes back at the same address
        info = _read_record(config)
        running = info is not None and any(is_ours(n) for n in info.nodes)
        if info is not None and len(info.nodes) != nodes:
            raise BrokerError(
                f"{_broker_dir(config)} holds a {len(info.nodes)}-node cluster"
                + (" that is running" if running else ""),
                hint=f"use --nodes {len(info.nodes)}, or --fresh to wipe it",
            )
        if info is not None and info.secure != secure:
            raise BrokerError(
                f"{_broker_dir(config)} holds a {'secured' if info.secure else 'plain'} cluster",
                hint="start it as it was made, or --fresh to wipe it",
            )
        if info is not None and port not in (None, info.nodes[0].port) and running:
            raise BrokerError(
                f"the local broker already runs on {info.bootstrap_servers}",
                hint="`refold broker stop` first to move it to another port",
            )
        if info is None or port not in (None, info.nodes[0].port) or _ports_lost(info, running):
            info = _new_layout(config, nodes, port, heap_mb, info)
        if secure:
            prepare_secure(secure_dir(_broker_dir(config)))
            info = replace(info, secure=True)
        launched = [n for n in info.nodes if not is_ours(n)]
        if launched:
            info = replace(info, heap_mb=heap_mb)
            prepare_nodes(java, jars, info, launched)
            launched = [launch_node(java, jars, n, heap_mb) for n in launched]
            info = replace(info, nodes=tuple(_pick(launched, n) for n in info.nodes))
            _write_record(config, info)
        record = info

        def relaunch(node: NodeInfo) -> NodeInfo:
            nonlocal record
            # A controller port in the ephemeral range can be taken by any outgoing connection
            # between picking it and the node binding it ("Unable to start acceptor for
            # CONTROLLER"): a single node moves to another one (its voters are only itself).
            if len(record.nodes) == 1 and not port_free(node.controller_port):
                moved = quiet_port([node.port])
                log.warning(
                    "controller port %d is taken: node 1 moves to %d", node.controller_port, moved
                )
                node = replace(node, controller_port=moved)
                record = replace(record, nodes=(node,))
                prepare_nodes(java, jars, record, [node])
            again = launch_node(java, jars, node, heap_mb)
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
        if info.secure_dir is not None:
            create_acls(info.secure_dir, info.bootstrap_servers, config.app_id)
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
        if node.pid is None or not is_ours(node):
            raise BrokerError(f"Kafka node {node_id} is not running")
        log.info("sending %s to Kafka node %d (pid %d)", sig.name, node_id, node.pid)
        os.kill(node.pid, sig)
        if wait_gone([node], timeout):
            raise BrokerError(f"Kafka node {node_id} still runs {timeout:.0f}s after {sig.name}")
        _write_record(config, _with_pids(info, {node_id: None}))


def start_node(config: Config, node_id: int, timeout: float = 60.0) -> NodeInfo:
    """Restart one recorded node and wait until the cluster lists it again."""
    jars, java = ensure_jars(), java_path()
    with _locked(config):
        info = _require_record(config)
        node = _node(info, node_id)
        if not is_ours(node):
            for port in (node.port, node.controller_port):
                if not port_free(port):
                    raise BrokerError(
                        f"port {port} of Kafka node {node_id} was taken while the node was down",
                        hint="the local cluster's ports are fixed; free it, or start --fresh",
                    )
            prepare_nodes(java, jars, info, [node])
            node = launch_node(java, jars, node, info.heap_mb)
            info = _with_pids(info, {node_id: node.pid})
            _write_record(config, info)
        _wait_for(info, [node_id], timeout)
        return node


def status(config: Config) -> BrokerStatus:
    """Which recorded nodes run, and whether the cluster metadata answers."""
    info = _read_record(config)
    if info is None:
        return BrokerStatus(None, (), False, ())
    nodes = tuple(NodeStatus(n.node_id, is_ours(n), n.pid, n.port) for n in info.nodes)
    brokers: tuple[int, ...] = ()
    if any(n.running for n in nodes):
        brokers = _metadata_brokers(_admin(info.bootstrap_servers, info.secure_dir), 3.0) or ()
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
        if not is_ours(node):
            continue
        for match in _ACTIVE_CONTROLLER.finditer(read_all(node.log)):
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


def _new_layout(
    config: Config, nodes: int, port: int | None, heap_mb: int, old: BrokerInfo | None
) -> BrokerInfo:
    """Pick ports; keep the cluster id (and so the data) of an existing cluster."""
    if port is not None and not port_free(port):
        raise BrokerError(f"port {port} on {HOST} is in use", hint="pick another --port or omit it")
    base = port if port is not None else (DEFAULT_PORT if port_free(DEFAULT_PORT) else None)
    chosen: list[int] = []
    # Controller ports follow the client ports, unless those are in the ephemeral range (a port
    # the OS picked), where any outgoing connection on the machine may take one between our
    # choice and the node's bind, or while its node is down: then they come from below it.
    low, high = ephemeral_range()
    for i, preferred in enumerate([None if base is None else base + i for i in range(2 * nodes)]):
        if i >= nodes and (preferred is None or low <= preferred <= high):
            pick = quiet_port(chosen)
        else:
            pick = preferred if preferred is not None and port_free(preferred) else free_port()
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
    return not running and not all(port_free(p) for p in ports)


def _random_uuid() -> str:
    """A Kafka cluster id, as `kafka-storage random-uuid` makes them, without starting a JVM."""
    while True:
        text = base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("=")
        if not text.startswith("-"):  # Kafka rejects ids that would parse as a CLI flag
            return text


def _admin(bootstrap: str, secure: Path | None = None) -> AdminClient:
    """An admin client for the nodes this launcher started (loopback, no user settings; the
    admin role's credentials when the cluster is secured)."""
    conf: dict[str, Any] = {
        "reconnect.backoff.max.ms": 500,
        "socket.connection.setup.timeout.ms": 3000,
        "log_level": 2,  # refused connections are expected while the broker boots
        "error_cb": lambda err: log.debug("admin client: %s", err),
    }
    overrides = {}
    if secure is not None:
        overrides = client_settings(secure, "admin", bootstrap)
        del overrides["bootstrap.servers"]
    config = Config(bootstrap_override=bootstrap, client_overrides=overrides)
    return clients.admin(config, **conf)


def credentials(config: Config, role: str) -> list[str]:
    """`REFOLD_KAFKA_*` lines with the settings `role`'s clients need for the local secured
    cluster (`refold broker credentials ROLE`)."""
    info = _require_record(config)
    if info.secure_dir is None:
        raise BrokerError(
            "the local broker is not secured: its clients need no credentials",
            hint="`refold broker start --secure --fresh` makes a secured one",
        )
    return env_lines(client_settings(info.secure_dir, role, info.bootstrap_servers))


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
    admin, deadline = _admin(info.bootstrap_servers, info.secure_dir), time.monotonic() + timeout
    waiting = [n for n in info.nodes if n.node_id in node_ids]
    relaunched: set[int] = set()
    seen: tuple[int, ...] | None = None
    while (remaining := deadline - time.monotonic()) > 0:
        for i, node in enumerate(waiting):
            if is_ours(node):
                continue
            why = f"Kafka node {node.node_id} exited while starting:\n{node_tail(node)}"
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
        f" (it listed {list(seen or ())}):\n" + "".join(node_tail(n) for n in waiting),
        hint=f"see the node logs under {info.nodes[0].dir.parent}",
    )


def _signal_and_wait(config: Config, nodes: list[NodeInfo], timeout: float) -> int:
    """SIGTERM our live nodes, SIGKILL those left after `timeout`, clear their recorded pids."""
    live = [n for n in nodes if n.pid is not None and is_ours(n)]
    for node in live:
        log.info("stopping Kafka node %d (pid %s)", node.node_id, node.pid)
        os.kill(node.pid, signal.SIGTERM)  # type: ignore[arg-type]
    for node in wait_gone(live, timeout):
        log.warning("Kafka node %d ignored SIGTERM for %.0fs; killing it", node.node_id, timeout)
        os.kill(node.pid, signal.SIGKILL)  # type: ignore[arg-type]
    if survivors := wait_gone(live, 10.0):
        raise BrokerError(f"Kafka nodes {[n.node_id for n in survivors]} survived SIGKILL")
    if (info := _read_record(config)) is not None:
        _write_record(config, _with_pids(info, {n.node_id: None for n in nodes}))
    return len(live)


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
        return BrokerInfo(
            raw["bootstrap_servers"],
            raw["cluster_id"],
            nodes,
            raw["heap_mb"],
            bool(raw.get("secure", False)),
        )
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
