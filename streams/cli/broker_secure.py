"""A secured local broker (`refold broker start --secure`): clients connect over TLS and
authenticate with SASL/SCRAM-SHA-512; Kafka's `StandardAuthorizer` lets each principal do only
what its role needs (ACLs created at start).

Everything lives in `<data dir>/broker/secure/`, readable by its owner only: a CA and the
broker's certificate (made with `cryptography`), and `credentials.json`, the password of each
role. Roles:

- `admin`: the super user (the broker itself uses it between its listeners); creates ACLs.
- `worker`: reads every topic; writes and creates topics (a worker ensures its internal
  topics, and its command processors write events); its consumer groups and transactional ids
  are those of the deployment (`<app id>.` prefixed).
- `publisher`: writes and describes topics; reads only the schemas topic (`_<app id>.schemas`,
  where writer schemas are registered); no groups.
- `reader`: reads and describes topics, with the deployment's consumer groups; writes nothing.

The controller listener stays on loopback, authenticated with SASL/PLAIN (SCRAM credentials
live in the metadata log, which a controller reads only once it runs). `refold broker
credentials ROLE` prints what that role's client sets, as `REFOLD_KAFKA_*` lines.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import secrets
from pathlib import Path
from typing import Any

from refold.core.errors import BrokerError

MECHANISM = "SCRAM-SHA-512"
ROLES = ("admin", "worker", "publisher", "reader")


def secure_dir(broker_dir: Path) -> Path:
    return broker_dir / "secure"


def _private(path: Path, data: bytes) -> None:
    """Write `data` to `path`, readable and writable by the owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def prepare(folder: Path) -> dict[str, str]:
    """The CA, the broker's key and certificate, and the roles' passwords (made once, kept
    across restarts); returns the passwords."""
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    if not (folder / "server.pem").is_file():
        _certificates(folder)
    creds = folder / "credentials.json"
    if not creds.is_file():
        passwords = {role: secrets.token_urlsafe(24) for role in ROLES}
        _private(creds, json.dumps(passwords, indent=2).encode())
    return dict(json.loads(creds.read_text()))


def _certificates(folder: Path) -> None:
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError as exc:  # a dependency of refold; a broken install says so
        raise BrokerError(
            "the secured broker needs the `cryptography` package", hint="pip install cryptography"
        ) from exc
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "refold local CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    unencrypted = serialization.NoEncryption()
    pkcs8 = serialization.PrivateFormat.PKCS8
    _private(folder / "ca.key", ca_key.private_bytes(pem, pkcs8, unencrypted))
    (folder / "ca.pem").write_bytes(ca.public_bytes(pem))
    # Kafka's PEM keystore: the private key, then the certificate chain.
    chain = (
        key.private_bytes(pem, pkcs8, unencrypted) + cert.public_bytes(pem) + ca.public_bytes(pem)
    )
    _private(folder / "server.pem", chain)


def scram_format_args(passwords: dict[str, str]) -> list[str]:
    """`kafka-storage format` arguments that add every role's SCRAM credential."""
    out: list[str] = []
    for role in ROLES:
        out += ["--add-scram", f"{MECHANISM}=[name={role},password={passwords[role]}]"]
    return out


def _jaas(module: str, user: str, password: str, **users: str) -> str:
    extra = "".join(f' user_{name}="{pw}"' for name, pw in users.items())
    return f'{module} required username="{user}" password="{password}"{extra};'


def node_properties(
    folder: Path, passwords: dict[str, str], port: int, controller_port: int
) -> dict[str, object]:
    """What a secured node sets beside (and over) the plain ones."""
    admin = passwords["admin"]
    scram = "org.apache.kafka.common.security.scram.ScramLoginModule"
    plain = "org.apache.kafka.common.security.plain.PlainLoginModule"
    return {
        "listeners": f"SASL_SSL://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
        "advertised.listeners": f"SASL_SSL://127.0.0.1:{port}",
        "inter.broker.listener.name": "SASL_SSL",
        "listener.security.protocol.map": "SASL_SSL:SASL_SSL,CONTROLLER:SASL_PLAINTEXT",
        "sasl.enabled.mechanisms": MECHANISM,
        "sasl.mechanism.inter.broker.protocol": MECHANISM,
        "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config": _jaas(scram, "admin", admin),
        "sasl.mechanism.controller.protocol": "PLAIN",
        "listener.name.controller.sasl.enabled.mechanisms": "PLAIN",
        "listener.name.controller.plain.sasl.jaas.config": _jaas(
            plain, "admin", admin, admin=admin
        ),
        "ssl.keystore.type": "PEM",
        "ssl.keystore.location": folder / "server.pem",
        "ssl.truststore.type": "PEM",
        "ssl.truststore.location": folder / "ca.pem",
        "ssl.client.auth": "none",
        "ssl.endpoint.identification.algorithm": "",
        "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "super.users": "User:admin",
        "allow.everyone.if.no.acl.found": "false",
    }


def client_settings(folder: Path, role: str, bootstrap: str) -> dict[str, str]:
    """The librdkafka settings of `role`'s client."""
    passwords = json.loads((folder / "credentials.json").read_text())
    if role not in passwords:
        raise BrokerError(f"no role {role!r}", hint="roles: " + ", ".join(ROLES))
    return {
        "bootstrap.servers": bootstrap,
        "security.protocol": "SASL_SSL",
        "sasl.mechanisms": MECHANISM,
        "sasl.username": role,
        "sasl.password": passwords[role],
        "ssl.ca.location": str(folder / "ca.pem"),
    }


def env_lines(settings: dict[str, str]) -> list[str]:
    """`REFOLD_KAFKA_<NAME>=value` lines (shell-quoted) for `settings`, and the bootstrap."""
    import shlex

    lines = [f"REFOLD_BOOTSTRAP_SERVERS={shlex.quote(settings['bootstrap.servers'])}"]
    for name, value in settings.items():
        if name != "bootstrap.servers":
            env = "REFOLD_KAFKA_" + name.upper().replace(".", "_")
            lines.append(f"{env}={shlex.quote(value)}")
    return lines


def create_acls(folder: Path, bootstrap: str, app_id: str, timeout: float = 30.0) -> int:
    """The roles' ACLs (idempotent: Kafka keeps one binding per distinct ACL); returns how
    many bindings were asked for."""
    from confluent_kafka.admin import (
        AclBinding,
        AclOperation,
        AclPermissionType,
        AdminClient,
        ResourcePatternType,
        ResourceType,
    )

    admin = AdminClient(dict(client_settings(folder, "admin", bootstrap)))
    topic, group, txn = ResourceType.TOPIC, ResourceType.GROUP, ResourceType.TRANSACTIONAL_ID
    cluster = ResourceType.BROKER
    lit, pre = ResourcePatternType.LITERAL, ResourcePatternType.PREFIXED
    op = AclOperation
    wanted: list[tuple[str, Any, str, Any, Any]] = []

    def allow(role: str, kind: Any, name: str, pattern: Any, *ops: Any) -> None:
        wanted.extend((role, kind, name, pattern, o) for o in ops)

    app = f"{app_id}."
    # DESCRIBE_CONFIGS: a command processor reads its event topic's max.message.bytes, so an
    # event too large for it rejects its command before any transaction (refold.engine.
    # command_limits); without it each such event costs an aborted batch.
    allow("worker", topic, "*", lit, op.READ, op.WRITE, op.DESCRIBE, op.CREATE, op.DESCRIBE_CONFIGS)
    allow("worker", group, app, pre, op.READ, op.DESCRIBE)
    allow("worker", txn, app, pre, op.WRITE, op.DESCRIBE)
    allow("worker", cluster, "kafka-cluster", lit, op.IDEMPOTENT_WRITE, op.DESCRIBE)
    allow("publisher", topic, "*", lit, op.WRITE, op.DESCRIBE)
    allow("publisher", topic, f"_{app_id}.schemas", lit, op.READ)
    allow("publisher", group, app, pre, op.READ)  # its schema reader's (never committed) group
    allow("publisher", cluster, "kafka-cluster", lit, op.IDEMPOTENT_WRITE)
    allow("reader", topic, "*", lit, op.READ, op.DESCRIBE)
    allow("reader", group, app, pre, op.READ, op.DESCRIBE)
    bindings = [
        AclBinding(kind, name, pattern, f"User:{role}", "*", operation, AclPermissionType.ALLOW)
        for role, kind, name, pattern, operation in wanted
    ]
    for future in admin.create_acls(bindings, request_timeout=timeout).values():
        future.result()
    return len(bindings)
