"""README.md's examples, executed, so the README cannot drift from the code.

Every ```python block runs against the session broker, in order, in one namespace per `## `
section (its `### ` subsections included), from a temp folder holding `schemas/` (the bank's, as
a user's project would), with `REFOLD_APP=refold.examples.bank` and the broker in the environment.
A block right after `<!-- doctest: skip -->` is not run. Every `refold ...` line of a ```sh block
must parse with the CLI's own parser, every `refold <command>` named in the prose must exist, and
the repo paths and `refold.*` names the README cites must exist too.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import os
import re
import shlex
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import refold
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient
from refold import Decider, Projection
from refold.cli.main import build_parser
from refold.core.config import Config
from refold.kafka.topics import Topics, event_topic, internal_topics

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
SKIP = "<!-- doctest: skip -->"


def bank_topics(admin: AdminClient) -> set[str]:
    """bank.accounts and the topics named after it (its decider's commands, results, claims),
    and those of the bank's transfers saga and `statements` task queue."""
    names = admin.list_topics(timeout=10).topics
    return {
        t
        for t in names
        if t == "bank.accounts" or t.startswith(("bank.accounts.", "transfers.saga", "statements."))
    }


@dataclass(frozen=True, slots=True)
class Block:
    section: str
    lang: str
    line: int  # of the block's first code line in README.md
    code: str
    skip: bool


def blocks(text: str) -> list[Block]:
    """The fenced code blocks of a Markdown text, with their `## ` section."""
    found: list[Block] = []
    section, lang, start, body, skip, previous = "", None, 0, [], False, ""
    for number, line in enumerate(text.splitlines(), 1):
        if lang is None and line.startswith("```"):
            lang, start, body, skip = line[3:].strip(), number + 1, [], previous.strip() == SKIP
        elif lang is not None and line.startswith("```"):
            found.append(Block(section, lang, start, "\n".join(body) + "\n", skip))
            lang = None
        elif lang is not None:
            body.append(line)
        elif line.startswith("## "):
            section = line[3:].strip()
        if line.strip():
            previous = line
    assert lang is None, f"README.md: the block opened at line {start - 1} is never closed"
    return found


README_BLOCKS = blocks(README.read_text())
SECTIONS = list(dict.fromkeys(b.section for b in README_BLOCKS if b.lang == "python"))


# -- the python blocks ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def readme_env(bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Config]:
    """A user's folder (schemas/, no repo), the environment the README sets, the bank topics.

    The bank topics are deleted again afterwards when this module created them, so the session
    broker is left as it was (test_user_app shows a worker needs no bank topic).
    """
    home = tmp_path_factory.mktemp("readme")
    shutil.copytree(
        Path(str(resources.files("refold.schemas") / "bank")), home / "schemas" / "bank"
    )
    admin = AdminClient({"bootstrap.servers": bootstrap})
    existed = bank_topics(admin)
    with pytest.MonkeyPatch.context() as mp:
        for name in [k for k in os.environ if k.startswith("REFOLD_")]:
            if not name.startswith("REFOLD_KAFKA"):  # client settings, the jars' cache: kept
                mp.delenv(name)
        mp.setenv("REFOLD_BOOTSTRAP_SERVERS", bootstrap)
        mp.setenv("REFOLD_APP", "refold.examples.bank")
        mp.setenv("REFOLD_DATA_DIR", str(home / ".refold"))
        mp.chdir(home)
        config = Config.from_env()
        Topics(config).ensure([*internal_topics(config), event_topic("bank.accounts")])
        try:
            yield config
        finally:
            _delete_topics(admin, sorted(bank_topics(admin) - existed))


def _delete_topics(admin: AdminClient, present: list[str]) -> None:
    if not present:
        return
    for future in admin.delete_topics(present, operation_timeout=30).values():
        future.result()
    deadline = time.monotonic() + 30
    while set(present) & set(admin.list_topics(timeout=10).topics):
        assert time.monotonic() < deadline, f"topics {present} still listed 30 s after deletion"
        time.sleep(0.2)


@pytest.mark.parametrize("section", SECTIONS)
def test_readme_python_runs(section: str, readme_env: Config) -> None:
    namespace: dict[str, Any] = {"__name__": "readme_" + re.sub(r"\W+", "_", section)}
    ran = 0
    for block in README_BLOCKS:
        if block.section != section or block.lang != "python" or block.skip:
            continue
        code = compile("\n" * (block.line - 1) + block.code, str(README), "exec")
        with contextlib.redirect_stdout(io.StringIO()):
            exec(code, namespace)
        ran += 1
    assert ran, f"every python block of section {section!r} is skipped"
    # What the README defines must be runnable: a worker would reject it otherwise.
    for obj in list(namespace.values()):
        ours = inspect.isclass(obj) and obj.__module__ == namespace["__name__"]
        if ours and issubclass(obj, Projection | Decider):
            obj.validate()
    check = SECTION_CHECKS.get(section)
    if check is not None:
        check(namespace, readme_env)


def _check_publishing(ns: dict[str, Any], config: Config) -> None:
    """The publisher's positions are real, and the plain-fastavro decoder reads our records."""
    pos, data = ns["pos"], {"account_id": "acc-1", "amount_cents": 5000, "memo": "salary"}
    assert str(pos) == f"bank.accounts[{pos.partition}]@{pos.offset}"
    assert ns["summary"].count == len(ns["triples"]) == 1000
    consumer = Consumer(config.kafka(**{"group.id": "readme", "enable.auto.commit": False}))
    try:
        consumer.assign([TopicPartition(pos.topic, pos.partition, pos.offset)])
        msg = consumer.poll(10)
        assert msg is not None and msg.error() is None and msg.offset() == pos.offset
        assert ns["decode"](msg.value()) == data
    finally:
        consumer.close()


def _check_commands(ns: dict[str, Any], _config: Config) -> None:
    accounts, command = ns["Accounts"](), ns["withdraw"]
    assert accounts.decide(command, {"balance_cents": 700})[0][0] == "bank.MoneyWithdrawn"
    with pytest.raises(refold.Rejected):
        accounts.decide(command, {"balance_cents": 499})


def _check_sagas(ns: dict[str, Any], config: Config) -> None:
    """The transfer compensates its withdrawal with the refund the prose names."""
    ns["Transfers"].validate()
    undo = ns["nxt"].commands[0]
    assert undo.command_id == "saga:transfers/t-1/withdraw/undo"
    assert undo.send.data == {"amount_cents": 500, "memo": "refund t-1"}


SECTION_CHECKS: dict[str, Callable[[dict[str, Any], Config], None]] = {
    "Publishing and reading events": _check_publishing,
    "Commands": _check_commands,
    "Sagas": _check_sagas,
}


def test_the_section_checks_name_real_sections() -> None:
    assert set(SECTION_CHECKS) <= set(SECTIONS), set(SECTION_CHECKS) - set(SECTIONS)


# -- the shell blocks and the prose -----------------------------------------------------------


def refold_command_lines() -> list[tuple[int, list[str]]]:
    """(README line, argv after `refold`) of every `refold ...` line of the ```sh blocks."""
    found = []
    for block in README_BLOCKS:
        if block.lang != "sh":
            continue
        lines = block.code.replace("\\\n", " ").splitlines()
        for offset, line in enumerate(lines):
            words = shlex.split(line, comments=True)
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value prefixes
                words.pop(0)
            if words and (words[0] == "refold" or words[0].endswith("/refold")):
                found.append((block.line + offset, words[1:]))
    return found


def _parses(argv: list[str]) -> str | None:
    """None when the CLI parser takes `argv`, else what it said."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args(argv)
    except SystemExit as exc:
        return None if exc.code == 0 else err.getvalue().strip().splitlines()[-1]
    return None


def test_every_refold_line_of_the_sh_blocks_parses() -> None:
    lines = refold_command_lines()
    commands = {argv[0] for _, argv in lines}
    assert {"broker", "topics", "publish", "worker", "query", "command"} <= commands, commands
    bad = [f"README.md:{n}: refold {shlex.join(argv)}: {why}" for n, argv in lines
           if (why := _parses(argv))]  # fmt: skip
    assert not bad, "\n".join(bad)


def test_every_refold_command_named_in_the_prose_exists() -> None:
    named = set(re.findall(r"`(?:\.venv/bin/)?refold\s+([a-z][a-z-]*)", README.read_text()))
    assert {"demo", "replay", "rollback", "drop"} <= named, named
    missing = sorted(c for c in named if _parses([c, "--help"]) is not None)
    assert not missing, f"README.md names refold command(s) the CLI lacks: {missing}"


def test_the_paths_and_names_the_readme_cites_exist() -> None:
    text = README.read_text()
    paths = set(re.findall(r"`((?:streams|projections|schemas|deploy|tests|bench)/[^`\s]*)`", text))
    assert "deploy/kafka/pom.xml" in paths
    generated = ("bench/out/",)  # written by `make bench`, not kept in the repo
    missing = sorted(p for p in paths if not (REPO / p).exists() and not p.startswith(generated))
    assert not missing, f"README.md cites paths that do not exist: {missing}"
    names = set(re.findall(r"`(refold(?:\.[A-Za-z_]\w*)+)`", text))
    assert "refold.examples.bank" in names
    unresolved = sorted(n for n in names if not _resolves(n))
    assert not unresolved, f"README.md cites names that do not import: {unresolved}"


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def test_the_stable_surface_the_readme_lists_is_refold_all() -> None:
    text = README.read_text()
    start = text.index("What you write against is importable from `refold` itself")
    listed = re.findall(r"`([A-Z]\w+)`", text[start : text.index("(and, for store authors", start)])
    assert sorted(listed) == sorted(refold.__all__)
