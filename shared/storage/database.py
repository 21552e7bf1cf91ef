"""SQLAlchemy engines: SQLite in WAL mode by default, PostgreSQL by URL.

Services use one synchronous engine and run their queries off the event loop
(``asyncio.to_thread``); the same models and queries run on both databases.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any
from weakref import WeakKeyDictionary

import sqlalchemy
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

_WRITE_OPTION = "conveyor_write"


def sqlite_url(path: Path) -> str:
    """The URL of a SQLite database file at ``path``."""
    return f"sqlite:///{path}"


def create_engine(
    url: str, *, echo: bool = False, pool_size: int = 5, sqlite_mmap_bytes: int = 0
) -> Engine:
    """An engine for ``url``.

    SQLite files get WAL journaling (readers never block the writer), foreign
    keys, ``synchronous=NORMAL`` (a committed transaction survives a process
    crash; WAL keeps the file consistent on power loss) and a busy timeout so
    concurrent writers queue instead of failing. PostgreSQL URLs
    (``postgresql+psycopg://...``) get a pre-ping pool. ``pool_size`` connections
    stay open (and as many more may open under load). ``sqlite_mmap_bytes``
    lets SQLite read up to that much of the file through a memory map instead
    of a read call per page (large values read about twice as fast).
    """
    parsed = sqlalchemy.make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return sqlalchemy.create_engine(
            url, echo=echo, pool_pre_ping=True, pool_size=pool_size, max_overflow=pool_size
        )
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = sqlalchemy.create_engine(
        url,
        echo=echo,
        pool_size=pool_size,
        max_overflow=pool_size,
        connect_args={"check_same_thread": False, "timeout": 30},
    )
    event.listen(
        engine, "connect", functools.partial(_configure_sqlite_connection, sqlite_mmap_bytes)
    )
    event.listen(engine, "begin", _begin_sqlite_transaction)
    return engine


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A transaction that will write: committed on success, rolled back on error.

    On SQLite it starts with ``BEGIN IMMEDIATE``, taking the write lock up
    front; a deferred transaction that reads first and writes later can fail
    with "database is locked" when another writer got in between. Writers of
    one process also queue on a lock first: SQLite's own busy handler sleeps in
    steps of up to 100 ms, which made tail latencies ten times the median.
    """
    with _writer_lock(engine), engine.connect() as connection:
        connection = connection.execution_options(**{_WRITE_OPTION: True})
        with connection.begin():
            yield connection


@contextmanager
def read_transaction(engine: Engine) -> Iterator[Connection]:
    """A read-only transaction: one consistent snapshot for several queries.

    PostgreSQL needs REPEATABLE READ for that (under its default, READ
    COMMITTED, every statement sees newer data); SQLite in WAL mode reads one
    snapshot per transaction anyway.
    """
    with engine.connect() as connection:
        if engine.dialect.name == "postgresql":
            connection = connection.execution_options(isolation_level="REPEATABLE READ")
        with connection.begin():
            yield connection


def _configure_sqlite_connection(mmap_bytes: int, dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy's "begin" event issue BEGIN itself (see write_transaction).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        if mmap_bytes:
            cursor.execute(f"PRAGMA mmap_size={int(mmap_bytes)}")
    finally:
        cursor.close()


_SQLITE_WRITER_LOCKS: WeakKeyDictionary[Engine, threading.Lock] = WeakKeyDictionary()


def _writer_lock(engine: Engine) -> AbstractContextManager[object]:
    if engine.dialect.name != "sqlite":
        return nullcontext()
    return _SQLITE_WRITER_LOCKS.setdefault(engine, threading.Lock())


def _begin_sqlite_transaction(connection: Connection) -> None:
    immediate = connection.get_execution_options().get(_WRITE_OPTION, False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
