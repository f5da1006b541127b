"""Which replica runs the reaper: the one holding the leader lease, a PostgreSQL session advisory lock.

`pg_try_advisory_lock(LEADER_LOCK)` on a connection of its own is held as long as that session lives, so
a leader that dies (kill -9, a lost network) frees it and another replica takes it at its next tick.
Before each tick the leader checks its session is alive (a lost one is a lost lease: reconnect, try
again). Two replicas may both tick only in the moment between a leader's session dying and its next
check; every step of a tick is a write transaction of its own under the write lock (postgres.py), as a
tick beside the requests always was, so even that overlap repeats a step and never interleaves one.
On SQLite there is one process, and it always leads.

    leader = Leader(database_url)   # None: SQLite
    if leader.holds(): reaper.tick(state)
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from iota_orchestrator import postgres

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger("iota_orchestrator")
# A leader cut off by the network must notice within seconds (the lease's check would block on it).


class Leader:
    def __init__(self, database: str | None) -> None:
        self.dsn = postgres.libpq_url(database) if database else None
        self.conn: psycopg.Connection | None = None
        self.held = False

    def holds(self) -> bool:
        """Whether this replica leads now (taking the lease when it is free)."""
        if self.dsn is None:
            return True
        import psycopg

        try:
            if self.conn is None or self.conn.closed:
                self.held = False
                self.conn = psycopg.connect(
                    self.dsn,
                    autocommit=True,
                    application_name="iota-leader",
                    connect_timeout=10,
                    keepalives_idle=5,
                    keepalives_interval=2,
                    keepalives_count=3,
                )
            if self.held:
                self.conn.execute("SELECT 1")
            else:
                row = self.conn.execute("SELECT pg_try_advisory_lock(%s)", (postgres.LEADER_LOCK,)).fetchone()
                self.held = bool(row and row[0])
                if self.held:
                    log.info("this replica runs the reaper now")
        except psycopg.Error as e:
            if self.held:
                log.warning("lost the reaper's leader lease (%s)", e)
            self.close()
        return self.held

    def close(self) -> None:
        """Give the lease up (closing the session frees the lock)."""
        self.held = False
        if self.conn is not None:
            conn, self.conn = self.conn, None
            conn.close()
