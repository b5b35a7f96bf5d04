"""asyncpg through Shardline.

Usage: python test_asyncpg.py POSTGRES_URL

asyncpg names every statement it prepares (`__asyncpg_stmt_N__`) and caches
them per connection (statement_cache_size, default 100); these checks keep
that default. Expects a proxy in transaction mode with pool_size = 2 (what
run.sh starts): some checks hold one server connection in an open transaction
so that a client's next transaction has to land on the other one, and assert
(with pg_backend_pid()) that it did.

Prints one line per check and, last, `RESULT asyncpg passed=N failed=M xfailed=K`.
Exits non-zero when a check failed.
"""

import asyncio
import io
import os
import sys
import time
import uuid
from decimal import Decimal

import asyncpg

import checks
from checks import CHECK_TIMEOUT, CHECKS, check

URL = sys.argv[1] if len(sys.argv) > 1 else os.environ["SHARDLINE_URL"]
SUFFIX = uuid.uuid4().hex[:8]




async def connect(**kwargs):
    kwargs.setdefault("timeout", 10)
    return await asyncpg.connect(URL, **kwargs)


async def backend_pid(conn):
    return await conn.fetchval("SELECT pg_backend_pid()")


async def expect_error(cls, coro, sqlstate):
    try:
        await coro
    except cls as e:
        assert e.sqlstate == sqlstate, f"expected SQLSTATE {sqlstate}, got {e.sqlstate}: {e}"
        return e
    except Exception as e:  # noqa: BLE001
        raise AssertionError(f"expected {cls.__name__} ({sqlstate}), got {type(e).__name__}: {e}")
    raise AssertionError(f"expected {cls.__name__} ({sqlstate}), nothing was raised")


class Pins:
    """Two extra connections that hold server connections in open transactions.

    With pool_size = 2, holding both and then releasing one decides which
    server connection the next transaction of any other client gets.
    """

    @classmethod
    async def open(cls):
        self = cls()
        self.conns = [await connect(), await connect()]
        return self

    async def close(self):
        for c in self.conns:
            await c.close()

    async def _run(self, fn, free_if):
        held = []
        try:
            for c in self.conns:
                await c.execute("BEGIN")
                held.append((c, await backend_pid(c)))
            pids = {pid for _, pid in held}
            assert len(pids) == 2, f"two open transactions share server pid {pids}: is pool_size 2?"
            to_free = ([x for x in held if free_if(x[1])] or held)[0]
            await to_free[0].execute("COMMIT")
            held.remove(to_free)
            return await fn()
        finally:
            for c, _ in held:
                await c.execute("COMMIT")

    async def on_server(self, pid, fn):
        """Runs fn() while only the server connection with backend `pid` is free."""
        return await self._run(fn, lambda p: p == pid)

    async def off_server(self, pid, fn):
        """Runs fn() while only a server connection other than `pid` is free."""
        return await self._run(fn, lambda p: p != pid)


@check
async def simple_and_parameterized():
    conn = await connect()
    try:
        assert await conn.fetchval("SELECT 1") == 1
        # execute() without arguments uses the simple query protocol.
        await conn.execute("SELECT 1; SELECT 2")
        u = uuid.uuid4()
        row = await conn.fetchrow(
            "SELECT $1::int + $2, $3::text, $4::numeric * 2, $5::uuid, $6::int[], $7::bytea, $8::jsonb, $9::text IS NULL",
            40, 2, "héllo", Decimal("1.25"), u, [1, 2, 3], b"\x00\xff", '{"a": 1}', None,
        )
        assert tuple(row) == (42, "héllo", Decimal("2.50"), u, [1, 2, 3], b"\x00\xff", '{"a": 1}', True), row
        rows = await conn.fetch("SELECT g, repeat('x', 1000) FROM generate_series(1, 2000) g")
        assert len(rows) == 2000 and tuple(rows[-1]) == (2000, "x" * 1000)
        for i in range(100):
            assert await conn.fetchval("SELECT $1::int * 2", i) == i * 2
    finally:
        await conn.close()


@check
async def pool_concurrent_fetches():
    pool = await asyncpg.create_pool(URL, min_size=4, max_size=4, timeout=10)
    try:
        queries = [
            ("SELECT $1::int + 1 AS v, pg_backend_pid() AS pid", lambda i: i + 1, lambda i: (i,)),
            ("SELECT $1::text || '-' || $2::text AS v, pg_backend_pid() AS pid",
             lambda i: f"{i}-{i * 2}", lambda i: (str(i), str(i * 2))),
            ("SELECT sum(g) AS v, pg_backend_pid() AS pid FROM generate_series(1, $1::int) g",
             lambda i: i * (i + 1) // 2 if i else None, lambda i: (i,)),
            ("SELECT $1::int[] || $2::int AS v, pg_backend_pid() AS pid",
             lambda i: [i, i + 1, i + 2], lambda i: ([i, i + 1], i + 2)),
        ]
        seen = {}  # proxy-side client pid -> server pids it ran on

        async def one(i):
            q, want, args = queries[i % len(queries)]
            async with pool.acquire() as conn:
                if i % 7 == 0:
                    async with conn.transaction():  # holds a server connection a moment
                        row = await conn.fetchrow(q, *args(i))
                        await conn.execute("SELECT pg_sleep(0.005)")
                        row2 = await conn.fetchrow(q, *args(i))
                        assert tuple(row2) == tuple(row)
                else:
                    row = await conn.fetchrow(q, *args(i))
                seen.setdefault(conn.get_server_pid(), set()).add(row["pid"])
            assert row["v"] == want(i), f"task {i}: {q} gave {row['v']!r}, expected {want(i)!r}"

        await asyncio.gather(*(one(i) for i in range(400)))
        # Also through the pool's own shortcuts.
        vals = await asyncio.gather(*(pool.fetchval("SELECT $1::int * 3", i) for i in range(100)))
        assert vals == [i * 3 for i in range(100)]
        every = set().union(*seen.values())
        assert len(seen) == 4, seen
        assert len(every) == 2, f"expected both server connections in use, saw {every}"
        assert any(len(p) == 2 for p in seen.values()), (
            f"no asyncpg connection had its statements run on both server connections: {seen}")
    finally:
        await pool.close()


@check
async def prepared_statement_reused_across_servers():
    pins = await Pins.open()
    conn = await connect()
    try:
        stmt = await conn.prepare("SELECT $1::int * 3 AS v, pg_backend_pid() AS pid")
        assert [a.name for a in stmt.get_attributes()] == ["v", "pid"]
        assert [t.name for t in stmt.get_parameters()] == ["int4"]
        row = await stmt.fetchrow(1)
        assert row["v"] == 3
        last = row["pid"]
        seen = {last}
        for i in range(2, 14):
            async def in_txn(i=i):
                async with conn.transaction():
                    a = await stmt.fetchrow(i)
                    b = await stmt.fetchval(i + 1)
                return a, b
            if i % 2:
                row, b = await pins.off_server(last, in_txn)
            else:
                row = await pins.off_server(last, lambda i=i: stmt.fetchrow(i))
                b = (i + 1) * 3
            assert row["v"] == i * 3 and b == (i + 1) * 3, (i, row, b)
            assert row["pid"] != last, f"expected a server other than {last}, ran on {row['pid']}"
            seen.add(row["pid"])
            last = row["pid"]
        assert len(seen) == 2
        # Cursor over a prepared statement (needs a transaction).
        async with conn.transaction():
            total = 0
            async for r in conn.cursor("SELECT g FROM generate_series(1, 500) g", prefetch=50):
                total += r["g"]
        assert total == sum(range(1, 501))
    finally:
        await conn.close()
        await pins.close()


@check
async def prepare_then_idle_holds_no_server():
    # conn.prepare() sends Parse, Describe and Flush; asyncpg sends the Sync
    # only with the statement's first execution. Nothing runs in between, so
    # an idle client that has prepared a statement must not keep a server
    # connection: with pool_size = 2, two other clients can still open
    # transactions. Then the statement runs on either server connection.
    pins = await Pins.open()
    conn = await connect()
    try:
        stmt = await conn.prepare("SELECT $1::text || 'z' AS v, pg_backend_pid() AS pid")
        row = await pins.off_server(-1, lambda: stmt.fetchrow("a"))
        assert row["v"] == "az"
        last = row["pid"]
        for i in range(4):
            row = await pins.off_server(last, lambda i=i: stmt.fetchrow(str(i)))
            assert row["v"] == f"{i}z" and row["pid"] != last, (dict(row), last)
            last = row["pid"]
        # A statement prepared while the other server connection is in use.
        stmt2 = await pins.off_server(last, lambda: conn.prepare("SELECT $1::int * 5"))
        for i in range(3):
            assert await pins.off_server(last, lambda i=i: stmt2.fetchval(i)) == i * 5
            assert await pins.on_server(last, lambda i=i: stmt2.fetchval(i)) == i * 5
    finally:
        await conn.close()
        await pins.close()


@check
async def statement_cache_eviction():
    # More distinct queries than the default statement cache (100): asyncpg
    # closes the statements it evicts, and prepares them again on reuse.
    pins = await Pins.open()
    conn = await connect()
    try:
        last = await backend_pid(conn)
        for k in range(130):
            assert await conn.fetchval(f"SELECT $1::int + {k}", 1) == 1 + k
        for k in range(0, 130, 13):
            v, p = await pins.off_server(last, lambda k=k: conn.fetchrow(
                f"SELECT $1::int + {k}, pg_backend_pid()", 2))
            assert v == 2 + k
            assert p != last
            last = p
    finally:
        await conn.close()
        await pins.close()


@check
async def transaction_error_and_rollback():
    table = f"drv_asyncpg_txn_{SUFFIX}"
    conn = await connect()
    await conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
    try:
        async def failing():
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {table} VALUES ($1, $2)", 1, "a")
                await conn.execute("SELECT 1 / 0")
        await expect_error(asyncpg.exceptions.DivisionByZeroError, failing(), "22012")
        assert not conn.is_in_transaction()
        assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0

        # Manual transaction: error, a failed statement, rollback.
        tr = conn.transaction()
        await tr.start()
        await conn.execute(f"INSERT INTO {table} VALUES (2, 'b')")
        await expect_error(asyncpg.exceptions.UniqueViolationError,
                           conn.execute(f"INSERT INTO {table} VALUES ($1, 'dup')", 2), "23505")
        await expect_error(asyncpg.exceptions.InFailedSQLTransactionError, conn.fetchval("SELECT 1"), "25P02")
        await tr.rollback()
        assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0

        # Savepoint: the inner block fails, the outer one commits.
        async with conn.transaction():
            await conn.execute(f"INSERT INTO {table} VALUES (3, 'kept')")
            try:
                async with conn.transaction():
                    await conn.execute(f"INSERT INTO {table} VALUES (4, 'gone')")
                    await conn.execute(f"INSERT INTO {table} VALUES (3, 'dup')")
            except asyncpg.exceptions.UniqueViolationError:
                pass
            else:
                raise AssertionError("the inner block did not fail")
        assert [tuple(r) for r in await conn.fetch(f"SELECT id, v FROM {table} ORDER BY id")] == [(3, "kept")]

        # Serializable, read-only transaction options.
        async with conn.transaction(isolation="serializable", readonly=True):
            assert await conn.fetchval("SHOW transaction_isolation") == "serializable"
            await expect_error(asyncpg.exceptions.ReadOnlySQLTransactionError,
                               conn.execute(f"INSERT INTO {table} VALUES (9, 'x')"), "25006")
        assert not conn.is_in_transaction()
        assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 1
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.close()


@check
async def executemany_and_copy():
    table = f"drv_asyncpg_copy_{SUFFIX}"
    conn = await connect()
    await conn.execute(f"CREATE TABLE {table} (id int, name text)")
    try:
        await conn.executemany(f"INSERT INTO {table} VALUES ($1, $2)", [(i, f"n{i}") for i in range(300)])
        assert tuple(await conn.fetchrow(f"SELECT count(*), sum(id) FROM {table}")) == (300, 44850)

        n = await conn.copy_records_to_table(
            table, records=[(i, "r" * 200) for i in range(1000, 21000)], columns=["id", "name"])
        assert n == "COPY 20000", n
        assert await conn.fetchval(f"SELECT count(*) FROM {table} WHERE id >= 1000") == 20000

        buf = io.BytesIO()
        res = await conn.copy_from_query(
            f"SELECT id, name FROM {table} WHERE id < 300 ORDER BY id", output=buf, format="csv")
        assert res == "COPY 300", res
        lines = buf.getvalue().decode().splitlines()
        assert len(lines) == 300 and lines[0] == "0,n0" and lines[-1] == "299,n299", lines[:2]

        big = io.BytesIO()
        await conn.copy_from_table(table, output=big, columns=["id", "name"])
        assert big.getvalue().count(b"\n") == 20300

        # copy_to_table from a file-like object.
        src = io.BytesIO("".join(f"{i}\tfile{i}\n" for i in range(-50, 0)).encode())
        assert await conn.copy_to_table(table, source=src, columns=["id", "name"]) == "COPY 50"
        assert await conn.fetchval(f"SELECT count(*) FROM {table} WHERE name LIKE 'file%'") == 50

        # Bad data: see copy_error_before_copy_done.
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.close()


@check
async def copy_error_before_copy_done():
    # The server rejects a bad row as soon as it reads it and ends the COPY
    # (ErrorResponse, ReadyForQuery) while the client is still sending; the
    # client's CopyDone comes later and is ignored. The connection goes on.
    table = f"drv_asyncpg_copyerr_{SUFFIX}"
    conn = await connect()
    await conn.execute(f"CREATE TABLE {table} (id int, name text)")
    try:
        async def rows():
            yield b"1\tok\nnope\tbad\n"
            await asyncio.sleep(0.3)  # the server's error arrives before CopyDone is sent

        await expect_error(asyncpg.exceptions.InvalidTextRepresentationError,
                           conn.copy_to_table(table, source=rows(), columns=["id", "name"]), "22P02")
        try:
            n = await asyncio.wait_for(conn.fetchval(f"SELECT count(*) FROM {table}"), timeout=5)
        except (asyncpg.exceptions.ConnectionDoesNotExistError, asyncpg.exceptions.ProtocolViolationError) as e:
            raise AssertionError(f"the proxy dropped the connection after the COPY error: {e}") from e
        assert n == 0, n
        # Once more, the whole COPY sent at once (the server may answer before
        # or after the CopyDone arrives).
        for _ in range(5):
            await expect_error(asyncpg.exceptions.InvalidTextRepresentationError, conn.copy_to_table(
                table, source=io.BytesIO(b"1\tok\nnope\tbad\n"), columns=["id", "name"]), "22P02")
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0
    finally:
        if conn.is_closed():
            conn = await connect()
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.close()


@check
async def type_introspection():
    # A user-defined type makes asyncpg run its own introspection statement.
    typ = f"drv_mood_{SUFFIX}"
    conn = await connect()
    await conn.execute(f"CREATE TYPE {typ} AS ENUM ('sad', 'ok', 'happy')")
    try:
        fresh = await connect()
        try:
            assert await fresh.fetchval(f"SELECT 'happy'::{typ}") == "happy"
            assert await fresh.fetchval(f"SELECT $1::{typ}", "ok") == "ok"
            assert await fresh.fetchval(f"SELECT ARRAY['sad', 'ok']::{typ}[]") == ["sad", "ok"]
        finally:
            await fresh.close()
    finally:
        await conn.execute(f"DROP TYPE {typ}")
        await conn.close()


@check
async def session_settings():
    pins = await Pins.open()
    try:
        a = await connect(server_settings={"application_name": "drv-asyncpg"})
        b = await connect()
        try:
            default_tz = await b.fetchval("SHOW TimeZone")
            tz = "Asia/Kathmandu" if default_tz != "Asia/Kathmandu" else "America/Lima"
            await a.execute(f"SET TIME ZONE '{tz}'")
            last = await backend_pid(a)
            for _ in range(4):
                row = await pins.off_server(last, lambda: a.fetchrow(
                    "SELECT current_setting('TimeZone') AS tz, current_setting('application_name') AS app, "
                    "pg_backend_pid() AS pid"))
                assert (row["tz"], row["app"]) == (tz, "drv-asyncpg"), dict(row)
                assert row["pid"] != last
                last = row["pid"]
                other = await pins.on_server(last, lambda: b.fetchrow(
                    "SELECT current_setting('TimeZone') AS tz, pg_backend_pid() AS pid"))
                assert other["pid"] == last and other["tz"] == default_tz, dict(other)
            # asyncpg's reset query (RESET ALL among others), as a pool runs it on release.
            await a.reset()
            for _ in range(2):
                row = await pins.off_server(last, lambda: a.fetchrow(
                    "SELECT current_setting('TimeZone') AS tz, current_setting('application_name') AS app, "
                    "pg_backend_pid() AS pid"))
                assert row["tz"] == default_tz, dict(row)
                assert row["app"] == "drv-asyncpg", dict(row)  # RESET ALL goes back to the startup value
                last = row["pid"]
        finally:
            await a.close()
            await b.close()
        # A pool of one: settings made while acquired are reset on release.
        pool = await asyncpg.create_pool(URL, min_size=1, max_size=1)
        try:
            async with pool.acquire() as c:
                await c.execute("SET TIME ZONE 'Pacific/Chatham'")
                assert await c.fetchval("SHOW TimeZone") == "Pacific/Chatham"
            async with pool.acquire() as c:
                assert await c.fetchval("SHOW TimeZone") == default_tz
        finally:
            await pool.close()
    finally:
        await pins.close()



@check
async def cancel_on_timeout():
    conn = await connect()
    watcher = await connect()
    try:
        t0 = time.monotonic()
        try:
            await asyncio.wait_for(conn.fetch("SELECT pg_sleep(30)"), timeout=0.5)
        except (asyncio.TimeoutError, TimeoutError):
            pass
        else:
            raise AssertionError("pg_sleep(30) returned")
        # asyncpg sends a CancelRequest and waits for the server to finish;
        # the connection is usable as soon as the query is canceled.
        v = await asyncio.wait_for(conn.fetchval("SELECT 41 + 1"), timeout=5)
        took = time.monotonic() - t0
        assert v == 42
        assert took < 5, f"the connection was usable again only after {took:.1f} s"
        assert not conn.is_closed()
        n = await watcher.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'")
        assert n == 0, f"{n} pg_sleep(30) still running after the cancel"
        # The statement timeout of a query method (also a cancel).
        try:
            await conn.fetchval("SELECT pg_sleep(30)", timeout=0.5)
        except (asyncio.TimeoutError, TimeoutError):
            pass
        else:
            raise AssertionError("pg_sleep(30) returned")
        assert await asyncio.wait_for(conn.fetchval("SELECT 7"), timeout=5) == 7
        # Inside a transaction: it is rolled back by the transaction block.
        try:
            async with conn.transaction():
                await conn.fetchval("SELECT pg_sleep(30)", timeout=0.5)
        except (asyncio.TimeoutError, TimeoutError):
            pass
        assert not conn.is_in_transaction()
        assert await asyncio.wait_for(conn.fetchval("SELECT 8"), timeout=5) == 8
        # A prepared statement canceled, then reused.
        stmt = await conn.prepare("SELECT pg_sleep($1::float8), $2::int")
        try:
            await stmt.fetchrow(30, 1, timeout=0.5)
        except (asyncio.TimeoutError, TimeoutError):
            pass
        row = await asyncio.wait_for(stmt.fetchrow(0, 2), timeout=5)
        assert row[1] == 2, row
    finally:
        await conn.close()
        await watcher.close()


@check
async def server_side_query_cancel_error():
    # statement_timeout makes the server cancel: QueryCanceledError, 57014.
    conn = await connect(server_settings={"statement_timeout": "300"})
    try:
        assert await conn.fetchval("SHOW statement_timeout") == "300ms"
        await expect_error(asyncpg.exceptions.QueryCanceledError, conn.fetch("SELECT pg_sleep(5)"), "57014")
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()


async def run_all(results):
    print(f"asyncpg {asyncpg.__version__}", flush=True)
    for fn in CHECKS:
        started = time.monotonic()
        try:
            await asyncio.wait_for(fn(), timeout=CHECK_TIMEOUT)
        except BaseException as e:  # noqa: BLE001
            if isinstance(e, KeyboardInterrupt):
                raise
            took = time.monotonic() - started
            if isinstance(e, (asyncio.TimeoutError, TimeoutError)) and took >= CHECK_TIMEOUT - 1:
                print(f"  {fn.__name__} still running after {CHECK_TIMEOUT} s", flush=True)
            results.record(fn, started, e)
        else:
            results.record(fn, started)


def main():
    results = checks.Results("asyncpg")
    asyncio.run(run_all(results))
    results.finish()


if __name__ == "__main__":
    main()
