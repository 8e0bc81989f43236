"""``cxr-triage users``: the worklist's users (add, list, remove); passwords are stored as argon2 hashes only.

``add NAME`` asks for the password twice on a terminal, or reads one line from standard input with
``--password-stdin`` (scripts), as it also does when standard input is not a terminal (a pipe: ``printf
'%s\n' "$PW" | cxr-triage users add rad1``). A name that exists already is refused before any password is asked
for. There is no default user and no default password.
"""

from __future__ import annotations

import argparse
import getpass
import sys

from sqlalchemy import select

from cxr_triage.core import db
from cxr_triage.core.bootstrap import CURRENT, CommandError, Context, run_command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("add", "list", "remove"), help="what to do")
    parser.add_argument("name", nargs="?", help="the user name (add, remove)")
    parser.add_argument("--config", default=None, help="configuration file (TOML)")
    parser.add_argument(
        "--password-stdin",
        action="store_true",
        help="add: read the password (one line) from standard input, not from a terminal prompt; the default when "
        "standard input is not a terminal",
    )


def _password(args: argparse.Namespace) -> str:
    if args.password_stdin or not sys.stdin.isatty():  # a pipe or a file: no prompt to answer, one line to read
        line = sys.stdin.readline()
        if not line:
            raise CommandError("no password on standard input: pipe one line, or run on a terminal (--password-stdin)")
        return line.rstrip("\r\n")
    try:
        first = getpass.getpass(f"password for {args.name}: ")
        again = getpass.getpass("again: ")
    except EOFError as exc:
        raise CommandError("no password given (--password-stdin reads one line from standard input)") from exc
    if again != first:
        raise CommandError("the two passwords differ")
    return first


def _users(args: argparse.Namespace, context: Context) -> int:
    from cxr_triage.web import auth

    sessions = db.session_factory(context.db)
    if args.action == "list":
        with db.read_session(context.db) as session:
            for user in session.scalars(select(db.User).order_by(db.User.username)):
                print(f"{user.username}\tadded {user.created_at.isoformat()}")
        return 0
    if not args.name:
        raise CommandError(f"{args.action} needs a user name")
    with sessions() as session, session.begin():
        if args.action == "remove":
            if not auth.remove_user(session, args.name):
                raise CommandError(f"no user {args.name!r}")
            auth.audit(session, "user-removed", None, None, args.name)
            print(f"removed {args.name}")
            return 0
        if session.scalar(select(db.User).where(db.User.username == args.name.strip())) is not None:
            raise CommandError(f"user {args.name.strip()!r} exists already")  # before the password is asked for
        try:
            auth.add_user(session, args.name, _password(args))
        except auth.AuthError as exc:
            raise CommandError(str(exc)) from exc
        auth.audit(session, "user-added", None, None, args.name)
    print(f"added {args.name}")
    return 0


def run(args: argparse.Namespace) -> int:
    return run_command(args, "users", lambda context: _users(args, context), database=CURRENT)
