"""The CLI loads a command's module only when it runs: every command still parses and resolves
to its function, and `refold publish` does not import the task, saga or projection commands."""

from __future__ import annotations

import argparse
import subprocess
import sys

from refold.cli import main as cli


def _commands(parser: argparse.ArgumentParser) -> set[str]:
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return set(sub.choices)


def test_every_command_parses_and_resolves_to_its_function() -> None:
    full = _commands(cli.build_parser())
    lazy = {name for names in cli.LAZY_COMMANDS.values() for name in names}
    assert full == set(cli.COMMANDS) | lazy
    for name in full:
        assert callable(cli._command(name))
        assert cli._command_named(["--data-dir", "x", name, "--help"]) == name
    # A command of main.py's own: the parser skips the other modules' commands.
    assert _commands(cli.build_parser("publish")) == set(cli.COMMANDS)
    assert cli._command_named([]) is None


def test_refold_publish_imports_no_other_commands_module() -> None:
    probe = (
        "import sys\n"
        "from refold.cli import main\n"
        "main.build_parser(main._command_named(['publish', 't', '--file', 'f']))\n"
        "print(sorted(m for m in sys.modules if m.startswith(('refold.cli.', 'refold.engine.'))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    expected = ["refold.cli.main", "refold.cli.output", "refold.cli.publish_commands"]
    assert done.stdout.strip() == str(expected)


def test_task_submit_refuses_an_empty_id_before_reaching_any_broker(tmp_path) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "REFOLD_APP": "refold.examples.bank",
        "REFOLD_BOOTSTRAP_SERVERS": "127.0.0.1:9",  # nothing listens: it must not be asked
        "REFOLD_DATA_DIR": str(tmp_path),
    }
    argv = ["task", "submit", "statements", "--data", '{"account": "a"}', "--id", ""]
    done = subprocess.run(
        [sys.executable, "-m", "refold.cli.main", *argv],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "task_id must be a non-empty string" in done.stderr


def test_saga_ids_that_are_no_record_key_are_one_line_errors(tmp_path) -> None:
    """A non-UTF-8 saga id from argv raised UnicodeEncodeError in the producer (a traceback);
    an empty one was replaced by a new random id. Both are refused before any broker."""
    env = {
        "PATH": "/usr/bin:/bin",
        "REFOLD_APP": "refold.examples.bank",
        "REFOLD_BOOTSTRAP_SERVERS": "127.0.0.1:9",  # nothing listens: it must not be asked
        "REFOLD_DATA_DIR": str(tmp_path),
    }
    data = '{"from": "a", "to": "b", "amount_cents": 5}'
    for argv, why in (
        ([b"start", b"transfers", b"\xff", b"--data", data.encode()], b"not UTF-8 text"),
        ([b"status", b"transfers", b"t-\xff"], b"not UTF-8 text"),
        ([b"start", b"transfers", b"", b"--data", data.encode()], b"non-empty string"),
    ):
        done = subprocess.run(
            [sys.executable.encode(), b"-m", b"refold.cli.main", b"saga", *argv],
            env=env, capture_output=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 2, done.stderr
        assert why in done.stderr and len(done.stderr.splitlines()) == 1, done.stderr


def test_waiting_commands_refuse_negative_nan_and_infinite_timeouts(tmp_path) -> None:
    """`--timeout -1` gave up at once (a task or saga "is accepted after -1.0s"), `nan` waited
    for ever, `inf` raised a traceback in `command --wait`: each is an argparse error now, exit 2
    before any broker is asked (nothing listens at the address given)."""
    env = {
        "PATH": "/usr/bin:/bin",
        "REFOLD_APP": "refold.examples.bank",
        "REFOLD_BOOTSTRAP_SERVERS": "127.0.0.1:9",
        "REFOLD_DATA_DIR": str(tmp_path),
    }
    deposit = ["accounts", "--type", "bank.Deposit", "--key", "a", "--data", '{"amount_cents": 5}']
    transfer = ["transfers", "--data", '{"from": "a", "to": "b", "amount_cents": 5}']
    statement = ["statements", "--data", '{"account": "a"}']
    cases = [
        (["command", *deposit, "--wait"], "--timeout", "-1"),
        (["task", "submit", *statement, "--wait"], "--timeout", "nan"),
        (["saga", "start", *transfer, "--wait"], "--timeout", "inf"),
        (["saga", "start", *transfer, "--wait"], "--timeout", "-0.5"),
        (["task", "submit", *statement, "--wait"], "--timeout", "soon"),
        (["replay", "balances"], "--stall-timeout", "0"),
    ]  # fmt: skip
    for argv, option, value in cases:
        done = subprocess.run(
            [sys.executable, "-m", "refold.cli.main", *argv, f"{option}={value}"],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 2, (argv, value, done.stderr)
        last = done.stderr.strip().splitlines()[-1]
        assert f"argument {option}: must be a finite number of seconds" in last, last
        assert repr(value) in last, last
    # What a user means by a timeout still parses.
    parser = cli.build_parser()
    args = parser.parse_args(["task", "submit", "q", "--timeout", "0"])
    assert args.timeout == 0.0
    assert parser.parse_args(["saga", "start", "s", "--timeout", "2.5"]).timeout == 2.5
    assert parser.parse_args(["replay", "p", "--stall-timeout", "30"]).stall_timeout == 30.0


def test_task_ids_that_are_no_record_key_are_one_line_errors(tmp_path) -> None:
    """`task status` with a non-UTF-8 id raised UnicodeEncodeError in the fold (a traceback);
    `task cancel` reads the same fold. Both are refused before any broker, as for sagas."""
    env = {
        "PATH": "/usr/bin:/bin",
        "REFOLD_APP": "refold.examples.bank",
        "REFOLD_BOOTSTRAP_SERVERS": "127.0.0.1:9",  # nothing listens: it must not be asked
        "REFOLD_DATA_DIR": str(tmp_path),
    }
    for argv, why in (
        ([b"status", b"statements", b"t-\xff"], b"not UTF-8 text"),
        ([b"cancel", b"statements", b"\xff"], b"not UTF-8 text"),
        ([b"cancel", b"statements"], b"task cancel needs a TASK_ID"),
    ):
        done = subprocess.run(
            [sys.executable.encode(), b"-m", b"refold.cli.main", b"task", *argv],
            env=env, capture_output=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 2, done.stderr
        assert why in done.stderr and len(done.stderr.splitlines()) == 1, done.stderr
