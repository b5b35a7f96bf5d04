"""psycopg 3 through Shardline.

Usage: python test_psycopg.py POSTGRES_URL

Expects a proxy in transaction mode with pool_size = 2 (what run.sh starts):
several checks hold one server connection in an open transaction so that a
client's next transaction has to land on the other one, and assert (with
pg_backend_pid()) that it did.

Prints one line per check and, last, `RESULT psycopg passed=N failed=M xfailed=K`.
Exits non-zero when a check failed.
"""

import io
import os
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import psycopg

import checks
from checks import CHECK_TIMEOUT, CHECKS, check
from psycopg import errors, pq

URL = sys.argv[1] if len(sys.argv) > 1 else os.environ["SHARDLINE_URL"]
SUFFIX = uuid.uuid4().hex[:8]






def connect(**kwargs):
    kwargs.setdefault("autocommit", True)
    kwargs.setdefault("connect_timeout", 10)
    return psycopg.connect(URL, **kwargs)


def backend_pid(conn):
    return conn.execute("SELECT pg_backend_pid()").fetchone()[0]


def expect_error(cls, fn, sqlstate):
    """Runs fn, which must raise psycopg error class `cls` with `sqlstate`."""
    try:
        fn()
    except cls as e:
        assert e.sqlstate == sqlstate, f"expected SQLSTATE {sqlstate}, got {e.sqlstate}: {e}"
        return e
    except Exception as e:  # noqa: BLE001 - report what came instead
        raise AssertionError(f"expected {cls.__name__} ({sqlstate}), got {type(e).__name__}: {e}")
    raise AssertionError(f"expected {cls.__name__} ({sqlstate}), nothing was raised")


class Pins:
    """Two extra clients that hold server connections in open transactions.

    With pool_size = 2, holding both and then releasing one decides which
    server connection the next transaction of any other client gets.
    """

    def __init__(self):
        self.conns = [connect(), connect()]

    def close(self):
        for c in self.conns:
            c.close()

    def _run(self, fn, free_if):
        held = []
        try:
            for c in self.conns:
                c.execute("BEGIN")
                held.append((c, backend_pid(c)))
            pids = {pid for _, pid in held}
            assert len(pids) == 2, (
                f"two open transactions share server pid {pids}: is pool_size 2?"
            )
            to_free = [x for x in held if free_if(x[1])][:1] or held[:1]
            to_free[0][0].execute("COMMIT")
            held.remove(to_free[0])
            return fn()
        finally:
            for c, _ in held:
                c.execute("COMMIT")

    def on_server(self, pid, fn):
        """Runs fn while only the server connection with backend `pid` is free."""
        return self._run(fn, lambda p: p == pid)

    def off_server(self, pid, fn):
        """Runs fn while only a server connection other than `pid` is free."""
        return self._run(fn, lambda p: p != pid)


@check
def simple_query():
    with connect() as conn:
        assert conn.execute("SELECT 1, 'a'::text, NULL::int").fetchone() == (1, "a", None)
        # No parameters: psycopg uses the simple query protocol, so several
        # statements in one string are allowed.
        cur = conn.execute("SELECT 1 AS a; SELECT 'two' AS b, 3 AS c")
        assert cur.fetchall() == [(1,)]
        assert cur.nextset()
        assert cur.fetchall() == [("two", 3)]
        assert conn.execute("SELECT count(*) FROM generate_series(1, 10000)").fetchone() == (10000,)
        # A result larger than the proxy's 64 KiB streaming threshold.
        rows = conn.execute("SELECT g, repeat('x', 1000) FROM generate_series(1, 2000) g").fetchall()
        assert len(rows) == 2000 and rows[-1] == (2000, "x" * 1000)
        big = conn.execute("SELECT repeat('y', 300000)").fetchone()[0]
        assert big == "y" * 300000


@check
def parameterized_queries():
    with connect() as conn:
        u = uuid.uuid4()
        row = conn.execute(
            "SELECT %s::int + %s, %s::text, %s::numeric * 2, %s::uuid, %s::int[], %s::bytea, %s::text IS NULL",
            (40, 2, "héllo", Decimal("1.25"), u, [1, 2, 3], b"\x00\xff", None),
        ).fetchone()
        assert row == (42, "héllo", Decimal("2.50"), u, [1, 2, 3], b"\x00\xff", True), row
        # Binary parameters and results.
        cur = conn.cursor(binary=True)
        cur.execute("SELECT %b::int8 * 3, %b::text", (7, "bin"))
        assert cur.fetchone() == (21, "bin")
        # Many distinct parameter values through the unnamed statement.
        for i in range(200):
            assert conn.execute("SELECT %s::int * 2", (i,)).fetchone() == (i * 2,)


@check
def explicit_prepare_crosses_servers():
    pins = Pins()
    try:
        with connect() as conn:
            q = "SELECT %s::int * 2, pg_backend_pid()"
            v, pid = conn.execute(q, (1,), prepare=True).fetchone()
            assert v == 2
            seen = {pid}
            last = pid
            for i in range(2, 12):
                # Alternate: force the next execution onto the other server.
                v, p = pins.off_server(last, lambda: conn.execute(q, (i,), prepare=True).fetchone())
                assert v == i * 2, (i, v)
                assert p != last, f"expected to run on a server other than {last}, ran on {p}"
                seen.add(p)
                last = p
            assert len(seen) == 2, seen
            # Same statement inside explicit transactions on both servers.
            for i in range(4):
                def in_txn(i=i):
                    with conn.transaction():
                        a = conn.execute(q, (i,), prepare=True).fetchone()
                        b = conn.execute(q, (i + 1,), prepare=True).fetchone()
                    return a, b
                a, b = pins.off_server(last, in_txn)
                assert a[0] == i * 2 and b[0] == (i + 1) * 2
                assert a[1] == b[1] != last, (a, b, last)
                last = a[1]
    finally:
        pins.close()


@check
def explicit_prepare_concurrent_clients():
    queries = [
        ("SELECT %s::int + 1, pg_backend_pid()", lambda i: i + 1),
        ("SELECT %s::int * %s::int, pg_backend_pid()", lambda i: i * i),
        ("SELECT length(%s::text), pg_backend_pid()", lambda i: len(str(i))),
    ]

    start = threading.Barrier(4)

    def worker(n):
        pids = set()
        with connect() as conn:
            start.wait(10)  # all four clients run at the same time
            for i in range(60):
                q, want = queries[(i + n) % 3]
                args = (i, i) if q.count("%s") == 2 else ((str(i),) if "text" in q else (i,))
                if i % 4 == 0:
                    # Hold the server connection a moment, so the others have to use the other one.
                    with conn.transaction():
                        v, pid = conn.execute(q, args, prepare=True).fetchone()
                        conn.execute("SELECT pg_sleep(0.005)")
                        v2, pid2 = conn.execute(q, args, prepare=True).fetchone()
                        assert (v2, pid2) == (v, pid)
                else:
                    v, pid = conn.execute(q, args, prepare=True).fetchone()
                assert v == want(i), f"client {n} iteration {i}: {q} gave {v}, expected {want(i)}"
                pids.add(pid)
        return pids

    with ThreadPoolExecutor(4) as ex:
        per_client = list(ex.map(worker, range(4)))
    every = set().union(*per_client)
    assert len(every) == 2, f"expected both server connections in use, saw {every}"
    assert any(len(p) == 2 for p in per_client), (
        f"no client had its statements run on both server connections: {per_client}"
    )


@check
def automatic_prepare():
    pins = Pins()
    try:
        with connect() as conn:
            conn.prepare_threshold = 2
            q = "SELECT %s::int + 100, pg_backend_pid()"
            last = backend_pid(conn)
            seen = set()
            for i in range(12):  # well past the threshold, alternating servers
                v, p = pins.off_server(last, lambda: conn.execute(q, (i,)).fetchone())
                assert v == i + 100, (i, v)
                assert p != last
                seen.add(p)
                last = p
            assert len(seen) == 2
            # psycopg keeps its prepared names in a private map; check, if it
            # is still there, that the query really was prepared.
            names = getattr(getattr(conn, "_prepared", None), "_names", None)
            if names is not None:
                assert any(k[0].startswith(b"SELECT $1::int + 100") for k in names), names
        # The default threshold (5) with the default connection settings.
        with connect() as conn:
            for i in range(20):
                assert conn.execute("SELECT %s::text || 'x'", (str(i),)).fetchone() == (f"{i}x",)
    finally:
        pins.close()


@check
def prepared_statement_eviction_and_deallocate_all():
    with connect() as conn:
        conn.prepared_max = 3  # psycopg Closes the oldest beyond this
        for round_ in range(3):
            for k in range(8):
                q = f"SELECT %s::int + {k}"
                assert conn.execute(q, (round_,), prepare=True).fetchone() == (round_ + k,)
        # DEALLOCATE ALL: psycopg forgets its statements; so must the proxy.
        conn.execute("DEALLOCATE ALL")
        for k in range(8):
            assert conn.execute(f"SELECT %s::int + {k}", (5,), prepare=True).fetchone() == (5 + k,)
        # Another client's statements keep working after this DEALLOCATE ALL.
        with connect() as other:
            for i in range(10):
                assert other.execute("SELECT %s::int - 1", (i,), prepare=True).fetchone() == (i - 1,)
            conn.execute("DEALLOCATE ALL")
            for i in range(10):
                assert other.execute("SELECT %s::int - 1", (i,), prepare=True).fetchone() == (i - 1,)


@check
def transaction_error_and_rollback():
    table = f"drv_psycopg_txn_{SUFFIX}"
    with connect() as conn:
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
        try:
            # Context-manager transaction: the error rolls it back.
            def failing_block():
                with conn.transaction():
                    conn.execute(f"INSERT INTO {table} VALUES (1, 'a')")
                    conn.execute("SELECT 1 / 0")
            expect_error(errors.DivisionByZero, failing_block, "22012")
            assert conn.info.transaction_status == pq.TransactionStatus.IDLE
            assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)

            # Explicit BEGIN / error / further statement / ROLLBACK.
            with connect(autocommit=False) as c2:
                c2.execute(f"INSERT INTO {table} VALUES (2, 'b')")
                expect_error(errors.UniqueViolation, lambda: (
                    c2.execute(f"INSERT INTO {table} VALUES (2, 'dup')")), "23505")
                assert c2.info.transaction_status == pq.TransactionStatus.INERROR
                expect_error(errors.InFailedSqlTransaction, lambda: c2.execute("SELECT 1"), "25P02")
                c2.rollback()
                assert c2.info.transaction_status == pq.TransactionStatus.IDLE
                assert c2.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)
                c2.rollback()

            # Savepoint: the inner block fails, the outer one commits.
            with conn.transaction():
                conn.execute(f"INSERT INTO {table} VALUES (3, 'kept')")
                try:
                    with conn.transaction():
                        conn.execute(f"INSERT INTO {table} VALUES (4, 'gone')")
                        conn.execute(f"INSERT INTO {table} VALUES (3, 'dup')")
                except errors.UniqueViolation:
                    pass
                else:
                    raise AssertionError("the inner block did not fail")
            assert conn.execute(f"SELECT id, v FROM {table} ORDER BY id").fetchall() == [(3, "kept")]

            # An error in an implicit (autocommit) transaction leaves no trace either.
            expect_error(errors.UndefinedTable, lambda: conn.execute("SELECT * FROM no_such_table_x"), "42P01")
            assert conn.execute("SELECT 7").fetchone() == (7,)
        finally:
            conn.execute(f"DROP TABLE IF EXISTS {table}")


@check
def session_set_survives_transactions():
    pins = Pins()
    try:
        with connect() as a, connect() as b:
            default_tz = b.execute("SHOW TimeZone").fetchone()[0]
            tz = "Asia/Kathmandu" if default_tz != "Asia/Kathmandu" else "America/Lima"
            a.execute(f"SET TIME ZONE '{tz}'")
            a.execute("SET search_path TO pg_catalog, public")
            a.execute("SET application_name = 'drv-a'")
            q = ("SELECT current_setting('TimeZone'), current_setting('search_path'), "
                 "current_setting('application_name'), pg_backend_pid()")
            last = backend_pid(a)
            seen = set()
            for _ in range(6):
                tz_, sp, app, p = pins.off_server(last, lambda: a.execute(q).fetchone())
                assert (tz_, sp, app) == (tz, "pg_catalog, public", "drv-a"), (tz_, sp, app)
                assert p != last
                seen.add(p)
                last = p
                # Client b, now on the server a just used, sees none of a's settings.
                btz, bapp, bp = pins.on_server(p, lambda: b.execute(
                    "SELECT current_setting('TimeZone'), current_setting('application_name'), "
                    "pg_backend_pid()").fetchone())
                assert bp == p
                assert btz == default_tz and bapp != "drv-a", (btz, bapp)
            assert len(seen) == 2
            # Timestamps are rendered in a's time zone on the other server too.
            ts = pins.off_server(last, lambda: a.execute(
                "SELECT to_char('2024-01-01 00:00:00+00'::timestamptz, 'TZH:TZM')").fetchone()[0])
            expected_offset = {"Asia/Kathmandu": "+05:45", "America/Lima": "-05:00"}[tz]
            assert ts == expected_offset, ts

            # SET LOCAL and a rolled-back SET do not stick.
            with a.transaction():
                a.execute("SET LOCAL TimeZone = 'UTC'")
                assert a.execute("SHOW TimeZone").fetchone() == ("UTC",)
            assert a.execute("SHOW TimeZone").fetchone() == (tz,)
            a.execute("BEGIN")
            a.execute("SET TIME ZONE 'Europe/Paris'")
            a.execute("ROLLBACK")
            for _ in range(3):
                assert a.execute("SHOW TimeZone").fetchone() == (tz,)
            # RESET goes back to the default, on every server.
            a.execute("RESET TIME ZONE")
            for _ in range(2):
                r, p = pins.off_server(last, lambda: a.execute(
                    "SELECT current_setting('TimeZone'), pg_backend_pid()").fetchone())
                assert r == default_tz, r
                last = p
        # A startup parameter (application_name in the startup packet).
        with connect(application_name="drv-startup") as c:
            last = backend_pid(c)
            for _ in range(2):
                app, p = pins.off_server(last, lambda: c.execute(
                    "SELECT current_setting('application_name'), pg_backend_pid()").fetchone())
                assert app == "drv-startup", app
                last = p
    finally:
        pins.close()


@check
def copy_in_and_out():
    table = f"drv_psycopg_copy_{SUFFIX}"
    with connect() as conn:
        conn.execute(f"CREATE TABLE {table} (id int, name text)")
        try:
            cur = conn.cursor()
            with cur.copy(f"COPY {table} (id, name) FROM STDIN") as copy:
                for i in range(1000):
                    copy.write_row((i, f"name {i}"))
            assert conn.execute(f"SELECT count(*), sum(id) FROM {table}").fetchone() == (1000, 499500)

            # Several MB in, well over the 64 KiB streaming threshold.
            payload = "z" * 500
            with cur.copy(f"COPY {table} (id, name) FROM STDIN") as copy:
                buf = io.StringIO()
                for i in range(1000, 11000):
                    buf.write(f"{i}\t{payload}\n")
                copy.write(buf.getvalue())
            assert conn.execute(f"SELECT count(*), sum(length(name)) FROM {table} WHERE id >= 1000").fetchone() == (
                10000, 10000 * 500)

            # COPY TO STDOUT, rows typed.
            with cur.copy(f"COPY (SELECT id, name FROM {table} WHERE id < 1000 ORDER BY id) TO STDOUT") as copy:
                copy.set_types(["int4", "text"])
                rows = list(copy.rows())
            assert len(rows) == 1000 and rows[0] == (0, "name 0") and rows[-1] == (999, "name 999")

            # COPY TO STDOUT, raw, large.
            total = 0
            with cur.copy(f"COPY (SELECT id, name FROM {table} WHERE id >= 1000) TO STDOUT") as copy:
                for block in copy:
                    total += len(block)
            assert total == sum(len(f"{i}\t{payload}\n") for i in range(1000, 11000)), total

            # Binary COPY both ways.
            with cur.copy(f"COPY {table} (id, name) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(["int4", "text"])
                copy.write_row((-1, "binary"))
            with cur.copy(f"COPY (SELECT id, name FROM {table} WHERE id = -1) TO STDOUT (FORMAT BINARY)") as copy:
                copy.set_types(["int4", "text"])
                assert list(copy.rows()) == [(-1, "binary")]

            # Bad data: copy_error_before_copy_done below.

            # The client aborts a COPY (CopyFail) by raising inside the block.
            try:
                with cur.copy(f"COPY {table} (id, name) FROM STDIN") as copy:
                    copy.write_row((5, "never"))
                    raise KeyError("client-side abort")
            except KeyError:
                pass
            except errors.QueryCanceled:
                pass  # psycopg reports the server's "COPY from stdin failed"
            assert conn.execute(f"SELECT count(*) FROM {table} WHERE name = 'never'").fetchone() == (0,)
            assert conn.info.transaction_status == pq.TransactionStatus.IDLE
        finally:
            conn.execute(f"DROP TABLE IF EXISTS {table}")


@check
def copy_error_before_copy_done():
    # The server rejects a bad row as soon as it reads it and ends the COPY
    # (ErrorResponse, ReadyForQuery) while the client is still inside its COPY
    # block; the client's CopyDone comes later and is ignored. The connection
    # must go on.
    table = f"drv_psycopg_copyerr_{SUFFIX}"
    with connect() as conn:
        conn.execute(f"CREATE TABLE {table} (id int, name text)")
        try:
            def bad_copy():
                with conn.cursor().copy(f"COPY {table} (id, name) FROM STDIN") as copy:
                    copy.write("not-a-number\tbad\n")
                    # psycopg sends data in 32 KiB blocks: fill one so the bad row goes now.
                    copy.write("".join(f"{i}\tfill\n" for i in range(10000)))
                    time.sleep(0.3)  # the server's error arrives before CopyDone is sent
            expect_error(errors.InvalidTextRepresentation, bad_copy, "22P02")
            try:
                n = simple_query_with_timeout(conn, f"SELECT count(*) FROM {table}", timeout=5)[0][0]
            except (TimeoutError, psycopg.OperationalError) as e:
                conn.close()
                raise AssertionError(f"no answer to the next query after the COPY error: {e}") from e
            assert n == "0", n
        finally:
            if conn.closed:
                conn = connect()
            conn.execute(f"DROP TABLE IF EXISTS {table}")
            conn.close()


@check
def pipeline_and_executemany():
    table = f"drv_psycopg_many_{SUFFIX}"
    with connect() as conn:
        conn.execute(f"CREATE TABLE {table} (id int, v text)")
        try:
            cur = conn.cursor()
            cur.executemany(f"INSERT INTO {table} VALUES (%s, %s)", [(i, str(i)) for i in range(300)])
            assert conn.execute(f"SELECT count(*), sum(id) FROM {table}").fetchone() == (300, 44850)
            with conn.pipeline():
                curs = []
                for i in range(30):  # past the prepare threshold inside the pipeline
                    c = conn.cursor()
                    c.execute("SELECT %s::int * 10", (i,))
                    curs.append(c)
            assert [c.fetchone()[0] for c in curs] == [i * 10 for i in range(30)]
            # An error inside a pipeline fails the rest of that pipeline only,
            # whether the server reports it before or after the Sync is sent
            # (pipeline_error_before_sync forces the former).
            for _ in range(5):
                try:
                    with conn.pipeline():
                        conn.execute("SELECT 1")
                        conn.execute("SELECT 1 / 0")
                        conn.execute("SELECT 2")
                except errors.DivisionByZero:
                    pass
                else:
                    raise AssertionError("pipeline error not raised")
                assert conn.execute("SELECT 3").fetchone() == (3,)
            assert conn.execute("SELECT 3").fetchone() == (3,)
        finally:
            conn.execute(f"DROP TABLE IF EXISTS {table}")


def simple_query_with_timeout(conn, sql, timeout=3.0):
    """Runs `sql` (simple query protocol, libpq level) and returns its rows as
    text; raises TimeoutError when no complete reply comes within `timeout`."""
    pg = conn.pgconn
    pg.send_query(sql.encode())
    while pg.flush() == 1:
        select.select([], [pg.socket], [], timeout)
    deadline = time.monotonic() + timeout
    results = []
    while True:
        pg.consume_input()
        while not pg.is_busy():
            r = pg.get_result()
            if r is None:
                break
            results.append(r)
        else:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no reply to {sql!r} within {timeout} s")
            select.select([pg.socket], [], [], left)
            continue
        break
    for r in results:
        if r.status == pq.ExecStatus.FATAL_ERROR:
            raise errors.error_from_result(r)
    last = results[-1]
    return [[last.get_value(i, j).decode() for j in range(last.nfields)] for i in range(last.ntuples)]


@check
def pipeline_error_before_sync():
    # psycopg's pipeline sends each query as it is executed; the server reports
    # an error at once, before the client's Sync. The server then ignores
    # everything up to that Sync, so its connection must stay with this client
    # until then. Afterwards both server connections must answer normally.
    conn, other = connect(), connect()
    try:
        try:
            with conn.pipeline():
                conn.execute("SELECT 1")
                conn.execute("SELECT 1 / 0")
                time.sleep(0.3)  # the ErrorResponse arrives before the Sync is sent
        except errors.DivisionByZero:
            pass
        else:
            raise AssertionError("the pipeline did not raise DivisionByZero")
        # Hold one server connection with each client, so both get probed.
        hung = []
        pids = []
        for c in (conn, other):
            try:
                simple_query_with_timeout(c, "BEGIN")
                pids.append(simple_query_with_timeout(c, "SELECT pg_backend_pid()")[0][0])
            except TimeoutError as e:
                hung.append(str(e))
                c.close()  # the proxy drops the server connection of a client that left mid-query
        for c in (conn, other):
            if not c.closed:
                simple_query_with_timeout(c, "COMMIT")
        assert not hung, (
            f"a server connection answered nothing after this client's pipeline error "
            f"(it was pooled while still skipping to Sync): {hung}; answered: {pids}")
        assert len(set(pids)) == 2, pids
    finally:
        conn.close()
        other.close()


@check
def pipeline_fetch_keeps_server():
    # Fetching a result inside a pipeline sends Flush, not Sync: the INSERT's
    # implicit transaction is still open on the server, so no other client
    # may use that server connection until the pipeline's Sync.
    table = f"drv_psycopg_pipefetch_{SUFFIX}"
    with connect() as a, connect() as b:
        a.execute(f"CREATE TABLE {table} (id int)")
        try:
            b_on_a_server = []
            with a.pipeline():
                a_pid = a.execute(
                    f"INSERT INTO {table} VALUES (1) RETURNING pg_backend_pid()").fetchone()[0]
                for _ in range(4):
                    try:
                        # Fails only when run on A's server connection.
                        b.execute(f"SELECT 1 / (pg_backend_pid() - {a_pid})")
                    except errors.DivisionByZero:
                        b_on_a_server.append(a_pid)
                        break
            rows = a.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            assert not b_on_a_server and rows == 1, (
                f"another client ran on server pid {a_pid} inside this client's open pipeline "
                f"(its error rolled back our INSERT: {rows} rows, expected 1)")
        finally:
            a.execute(f"DROP TABLE IF EXISTS {table}")


@check
def server_side_cursor():
    with connect(autocommit=False) as conn:
        with conn.cursor(name="drv_named_cursor") as cur:
            cur.itersize = 100
            cur.execute("SELECT g FROM generate_series(1, 1000) g")
            assert cur.fetchmany(10) == [(i,) for i in range(1, 11)]
            assert sum(r[0] for r in cur) == sum(range(11, 1001))
        conn.commit()



def _cancel_sleep(conn, cancel, after=0.5, sql="SELECT pg_sleep(30)"):
    """Runs `sql` on conn in a thread, calls cancel() after `after` seconds.
    Returns (exception raised by the query or None, seconds the query took)."""
    out = {}

    def run():
        t0 = time.monotonic()
        try:
            conn.execute(sql)
            out["exc"] = None
        except Exception as e:  # noqa: BLE001
            out["exc"] = e
        out["took"] = time.monotonic() - t0

    t = threading.Thread(target=run, daemon=True)
    t.start()
    time.sleep(after)
    cancel()
    t.join(15)
    assert not t.is_alive(), "query still running 15 s after the cancel"
    return out["exc"], out["took"]


@check
def cancel():
    with connect() as conn:
        # conn.cancel(): libpq's PQcancel with the proxy's BackendKeyData.
        exc, took = _cancel_sleep(conn, conn.cancel)
        assert isinstance(exc, errors.QueryCanceled), f"expected QueryCanceled, got {exc!r}"
        assert exc.sqlstate == "57014"
        assert took < 5, f"cancel took {took:.1f} s"
        assert conn.execute("SELECT 1").fetchone() == (1,)
        # cancel_safe() (libpq 17's PQcancelCreate; falls back to cancel()).
        if hasattr(conn, "cancel_safe"):
            exc, took = _cancel_sleep(conn, lambda: conn.cancel_safe(timeout=5))
            assert isinstance(exc, errors.QueryCanceled), f"expected QueryCanceled, got {exc!r}"
            assert took < 5
            assert conn.execute("SELECT 2").fetchone() == (2,)
        # Inside an explicit transaction: the transaction is failed, then rolled back.
        conn.execute("BEGIN")
        exc, _ = _cancel_sleep(conn, conn.cancel)
        assert isinstance(exc, errors.QueryCanceled), exc
        assert conn.info.transaction_status == pq.TransactionStatus.INERROR
        conn.execute("ROLLBACK")
        assert conn.execute("SELECT 3").fetchone() == (3,)
        # No pg_sleep(30) is left running on the server.
        with connect() as other:
            n = other.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'"
            ).fetchone()[0]
            assert n == 0, f"{n} pg_sleep(30) still running after cancel"


@check
def cancel_of_idle_client_does_not_hit_others():
    # A cancels while idle (it holds no server connection); B runs a query on
    # the server connection A used last. B's query must not be canceled.
    pins = Pins()
    try:
        with connect() as a, connect() as b:
            a_pid = backend_pid(a)

            def b_sleeps_on_a_server():
                return _cancel_sleep(b, a.cancel, after=0.3,
                                     sql="SELECT pg_sleep(1.5), pg_backend_pid()")

            exc, took = pins.on_server(a_pid, b_sleeps_on_a_server)
            assert exc is None, f"B's query failed after A's cancel: {exc!r}"
            assert took >= 1.4, took
            assert b.execute("SELECT 4").fetchone() == (4,)
    finally:
        pins.close()


@check
def cancel_returns_after_server_processed_it():
    # libpq's PQcancel (conn.cancel()) returns when the server closes the
    # cancel connection, i.e. once PostgreSQL has signalled the backend.
    # PostgreSQL signals it twice (the process, then its process group), so a
    # client that goes on earlier can have its next query, or through a
    # pool another client's query, canceled by the second signal. To see
    # whether the proxy waits for PostgreSQL, PostgreSQL's postmaster is
    # paused (SIGSTOP, then SIGCONT) while the cancel is sent: cancel() must
    # not return before the postmaster runs again. run.sh passes the
    # postmaster's pid in SHARDLINE_PG_PID; without it this check is skipped.
    pg_pid = os.environ.get("SHARDLINE_PG_PID")
    if not pg_pid:
        print("  (skipped: SHARDLINE_PG_PID not set)", flush=True)
        return
    pg_pid = int(pg_pid)
    paused_for = 1.0
    with connect() as conn:
        out = {}

        def sleeper():
            try:
                conn.execute("SELECT pg_sleep(30)")
                out["exc"] = None
            except Exception as e:  # noqa: BLE001
                out["exc"] = e

        def canceller():
            conn.cancel()
            out["cancel_returned"] = time.monotonic()

        q = threading.Thread(target=sleeper, daemon=True)
        q.start()
        time.sleep(0.3)
        c = threading.Thread(target=canceller, daemon=True)
        # The postmaster is resumed by a separate process: conn.cancel() may
        # block this whole interpreter (libpq's PQcancel can hold the GIL).
        resumer = subprocess.Popen(
            ["sh", "-c", f"sleep {paused_for}; kill -CONT {pg_pid}"], start_new_session=True)
        os.kill(pg_pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            c.start()
            resumer.wait(paused_for + 10)
        finally:
            os.kill(pg_pid, signal.SIGCONT)
        c.join(10)
        q.join(10)
        assert not c.is_alive() and not q.is_alive(), "the cancel did not complete after the postmaster resumed"
        assert isinstance(out["exc"], errors.QueryCanceled), f"expected QueryCanceled, got {out['exc']!r}"
        waited = out["cancel_returned"] - t0
        assert waited >= paused_for / 2, (
            f"conn.cancel() returned {waited:.3f} s after it was called, while PostgreSQL's postmaster "
            f"was paused for {paused_for} s: the proxy ended the client's cancel connection before "
            f"PostgreSQL had processed the CancelRequest")
        assert conn.execute("SELECT 5").fetchone() == (5,)


@check
def concurrent_mixed_load():
    # Many clients, fewer server connections: queueing for a connection works.
    def worker(n):
        with connect() as conn:
            for i in range(40):
                if i % 5 == 0:
                    with conn.transaction():
                        conn.execute("SELECT pg_sleep(0.002)")
                        assert conn.execute("SELECT %s::int", (n * 1000 + i,), prepare=True).fetchone() == (n * 1000 + i,)
                else:
                    assert conn.execute("SELECT %s::int + 0", (i,)).fetchone() == (i,)
        return n

    with ThreadPoolExecutor(8) as ex:
        assert sorted(ex.map(worker, range(8))) == list(range(8))


def run_with_timeout(fn):
    """Runs fn in a thread; raises TimeoutError (with fn's stack) if it hangs."""
    out = {}

    def target():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001
            out["exc"] = e

    t = threading.Thread(target=target, daemon=True, name=fn.__name__)
    t.start()
    t.join(CHECK_TIMEOUT)
    if t.is_alive():
        frame = sys._current_frames().get(t.ident)
        stack = "".join(traceback.format_stack(frame)) if frame else ""
        raise TimeoutError(f"{fn.__name__} still running after {CHECK_TIMEOUT} s; it is at:\n{stack}")
    if "exc" in out:
        raise out["exc"]


def main():
    results = checks.Results("psycopg")
    print(f"psycopg {psycopg.__version__}, libpq {pq.version()} ({pq.__impl__})", flush=True)
    for fn in CHECKS:
        started = time.monotonic()
        try:
            run_with_timeout(fn)
        except BaseException as e:  # noqa: BLE001
            results.record(fn, started, e)
        else:
            results.record(fn, started)
    results.finish()


if __name__ == "__main__":
    main()
