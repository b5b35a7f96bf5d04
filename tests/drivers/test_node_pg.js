// node-postgres (pg) through Shardline.
//
// Usage: node test_node_pg.js POSTGRES_URL   (NODE_PATH must find `pg`; run.sh sets it)
//
// Expects a proxy in transaction mode with pool_size = 2 (what run.sh starts):
// some checks hold one server connection in an open transaction so that a
// client's next transaction has to land on the other one, and assert (with
// pg_backend_pid()) that it did.
//
// Prints one line per check and, last, `RESULT node-pg passed=N failed=M xfailed=K`.
// Exits non-zero when a check failed.
'use strict'

const assert = require('assert/strict')
const crypto = require('crypto')
const pg = require('pg')

const URL = process.argv[2] || process.env.SHARDLINE_URL
const SUFFIX = crypto.randomBytes(4).toString('hex')
const CHECK_TIMEOUT_MS = 60000
const checks = []

// `knownBug`: a proxy bug the check is known to hit (tests/drivers/KNOWN_BUGS.md);
// its failure is reported as XFAIL and not counted, unless DRIVERS_STRICT=1.
function check(name, fn, knownBug) {
  checks.push({ name, fn, knownBug })
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

async function connect(extra = {}) {
  const client = new pg.Client({ connectionString: URL, connectionTimeoutMillis: 10000, ...extra })
  client.on('error', () => {}) // reported through the failing query instead
  await client.connect()
  return client
}

async function backendPid(client) {
  return (await client.query('SELECT pg_backend_pid() AS pid')).rows[0].pid
}

async function expectError(promise, code) {
  try {
    await promise
  } catch (e) {
    assert.equal(e.code, code, `expected SQLSTATE ${code}, got ${e.code}: ${e.message}`)
    return e
  }
  assert.fail(`expected an error with SQLSTATE ${code}, nothing was raised`)
}

// Two extra clients that hold server connections in open transactions. With
// pool_size = 2, holding both and then releasing one decides which server
// connection the next transaction of any other client gets.
class Pins {
  static async open() {
    const p = new Pins()
    p.clients = [await connect(), await connect()]
    return p
  }

  async close() {
    await Promise.all(this.clients.map((c) => c.end()))
  }

  async run(fn, freeIf) {
    const held = []
    try {
      for (const c of this.clients) {
        await c.query('BEGIN')
        held.push({ c, pid: await backendPid(c) })
      }
      assert.equal(new Set(held.map((h) => h.pid)).size, 2, 'two open transactions share a server: is pool_size 2?')
      const toFree = held.find((h) => freeIf(h.pid)) || held[0]
      await toFree.c.query('COMMIT')
      held.splice(held.indexOf(toFree), 1)
      return await fn()
    } finally {
      for (const h of held) await h.c.query('COMMIT')
    }
  }

  onServer(pid, fn) {
    return this.run(fn, (p) => p === pid)
  }

  offServer(pid, fn) {
    return this.run(fn, (p) => p !== pid)
  }
}

check('simple_and_parameterized', async () => {
  const pool = new pg.Pool({ connectionString: URL, max: 4 })
  try {
    const r = await pool.query("SELECT 1 AS a, 'x'::text AS b, NULL::int AS c")
    assert.deepEqual(r.rows, [{ a: 1, b: 'x', c: null }])
    // No values: the simple query protocol; several statements, several results.
    const multi = await pool.query('SELECT 1 AS one; SELECT 2 AS two')
    assert.equal(multi.length, 2)
    assert.deepEqual(multi[1].rows, [{ two: 2 }])
    const p = await pool.query(
      'SELECT $1::int + $2::int AS sum, $3::text AS t, $4::jsonb AS j, $5::int[] AS arr, $6::bytea AS b, $7::text IS NULL AS n',
      [40, 2, 'héllo', JSON.stringify({ a: 1 }), [1, 2, 3], Buffer.from([0, 255]), null]
    )
    assert.deepEqual(p.rows[0], { sum: 42, t: 'héllo', j: { a: 1 }, arr: [1, 2, 3], b: Buffer.from([0, 255]), n: true })
    const big = await pool.query("SELECT g, repeat('x', 1000) AS pad FROM generate_series(1, 2000) g")
    assert.equal(big.rows.length, 2000)
    assert.equal(big.rows[1999].pad.length, 1000)
    // Many concurrent parameterized queries through the pool.
    const vals = await Promise.all(
      Array.from({ length: 300 }, (_, i) => pool.query('SELECT $1::int * 2 AS v', [i]).then((res) => res.rows[0].v))
    )
    assert.deepEqual(vals, Array.from({ length: 300 }, (_, i) => i * 2))
  } finally {
    await pool.end()
  }
})

check('named_statements_from_several_clients', async () => {
  const pool = new pg.Pool({ connectionString: URL, max: 4 })
  try {
    const queries = [
      { name: 'drv_double', text: 'SELECT $1::int * 2 AS v, pg_backend_pid() AS pid', want: (i) => i * 2 },
      { name: 'drv_concat', text: "SELECT $1::text || '-x' AS v, pg_backend_pid() AS pid", want: (i) => `${i}-x` },
      { name: 'drv_series', text: 'SELECT count(*)::int AS v, pg_backend_pid() AS pid FROM generate_series(1, $1::int)', want: (i) => i },
    ]
    const clients = await Promise.all([pool.connect(), pool.connect(), pool.connect()])
    const seen = clients.map(() => new Set())
    try {
      await Promise.all(
        clients.map(async (client, n) => {
          for (let i = 0; i < 40; i++) {
            const q = queries[(i + n) % queries.length]
            const values = [q.name === 'drv_concat' ? String(i) : i]
            let row
            if (i % 5 === 0) {
              await client.query('BEGIN') // holds a server connection a moment
              row = (await client.query({ name: q.name, text: q.text, values })).rows[0]
              await client.query('SELECT pg_sleep(0.005)')
              const again = (await client.query({ name: q.name, text: q.text, values })).rows[0]
              assert.deepEqual(again, row)
              await client.query('COMMIT')
            } else {
              row = (await client.query({ name: q.name, text: q.text, values })).rows[0]
            }
            assert.equal(row.v, q.want(i), `client ${n} iteration ${i}: ${q.name}`)
            seen[n].add(row.pid)
          }
        })
      )
    } finally {
      clients.forEach((c) => c.release())
    }
    const every = new Set(seen.flatMap((s) => [...s]))
    assert.equal(every.size, 2, `expected both server connections in use, saw ${[...every]}`)
    assert.ok(seen.some((s) => s.size === 2), `no client ran its named statements on both server connections`)
  } finally {
    await pool.end()
  }
})

check('named_statement_crosses_servers', async () => {
  const pins = await Pins.open()
  const client = await connect()
  try {
    const q = { name: 'drv_triple', text: 'SELECT $1::int * 3 AS v, pg_backend_pid() AS pid' }
    let row = (await client.query({ ...q, values: [1] })).rows[0]
    assert.equal(row.v, 3)
    let last = row.pid
    const seen = new Set([last])
    for (let i = 2; i < 12; i++) {
      // node-postgres sends Parse only the first time: from here on, Bind of
      // a name the next server connection may not have yet.
      row = await pins.offServer(last, async () => (await client.query({ ...q, values: [i] })).rows[0])
      assert.equal(row.v, i * 3)
      assert.notEqual(row.pid, last, `expected a server other than ${last}`)
      seen.add(row.pid)
      last = row.pid
    }
    assert.equal(seen.size, 2)
  } finally {
    await client.end()
    await pins.close()
  }
})

check('transaction_error_and_rollback', async () => {
  const table = `drv_node_txn_${SUFFIX}`
  const pool = new pg.Pool({ connectionString: URL, max: 4 })
  try {
    await pool.query(`CREATE TABLE ${table} (id int PRIMARY KEY, v text)`)
    const client = await pool.connect()
    try {
      await client.query('BEGIN')
      await client.query(`INSERT INTO ${table} VALUES ($1, $2)`, [1, 'a'])
      await expectError(client.query('SELECT 1 / 0'), '22012')
      await expectError(client.query('SELECT 1'), '25P02')
      await client.query('ROLLBACK')
      assert.equal((await client.query(`SELECT count(*)::int AS n FROM ${table}`)).rows[0].n, 0)

      // A named statement failing inside a transaction; the name still works after.
      await client.query('BEGIN')
      await client.query({ name: 'drv_ins', text: `INSERT INTO ${table} VALUES ($1, $2)`, values: [2, 'b'] })
      await expectError(client.query({ name: 'drv_ins', text: `INSERT INTO ${table} VALUES ($1, $2)`, values: [2, 'dup'] }), '23505')
      await client.query('ROLLBACK')
      await client.query({ name: 'drv_ins', text: `INSERT INTO ${table} VALUES ($1, $2)`, values: [3, 'c'] })
      const rows = (await client.query(`SELECT id, v FROM ${table} ORDER BY id`)).rows
      assert.deepEqual(rows, [{ id: 3, v: 'c' }])

      // Savepoint.
      await client.query('BEGIN')
      await client.query(`INSERT INTO ${table} VALUES (4, 'kept')`)
      await client.query('SAVEPOINT s1')
      await expectError(client.query(`INSERT INTO ${table} VALUES (4, 'dup')`), '23505')
      await client.query('ROLLBACK TO SAVEPOINT s1')
      await client.query('COMMIT')
      assert.equal((await client.query(`SELECT count(*)::int AS n FROM ${table}`)).rows[0].n, 2)
    } finally {
      client.release()
    }
    // The pool's other clients are unaffected.
    assert.equal((await pool.query('SELECT 5 AS v')).rows[0].v, 5)
  } finally {
    await pool.query(`DROP TABLE IF EXISTS ${table}`)
    await pool.end()
  }
})

check('session_set_survives_transactions', async () => {
  const pins = await Pins.open()
  const a = await connect({ application_name: 'drv-node' })
  const b = await connect()
  try {
    const defaultTz = (await b.query('SHOW TimeZone')).rows[0].TimeZone
    const tz = defaultTz === 'Asia/Kathmandu' ? 'America/Lima' : 'Asia/Kathmandu'
    await a.query(`SET TIME ZONE '${tz}'`)
    let last = await backendPid(a)
    for (let i = 0; i < 4; i++) {
      const row = await pins.offServer(last, async () => (await a.query(
        "SELECT current_setting('TimeZone') AS tz, current_setting('application_name') AS app, pg_backend_pid() AS pid"
      )).rows[0])
      assert.deepEqual([row.tz, row.app], [tz, 'drv-node'])
      assert.notEqual(row.pid, last)
      last = row.pid
      const other = await pins.onServer(last, async () => (await b.query(
        "SELECT current_setting('TimeZone') AS tz, pg_backend_pid() AS pid")).rows[0])
      assert.equal(other.pid, last)
      assert.equal(other.tz, defaultTz, "another client on the same server sees this client's SET")
    }
  } finally {
    await a.end()
    await b.end()
    await pins.close()
  }
})

check('cancel', async () => {
  // node-postgres has no documented cancel API for pg.Client. It does have
  // Client.prototype.cancel(client, query), which opens a new connection and
  // sends a real CancelRequest with the target client's BackendKeyData
  // (pg-pool and pg-cursor users reach it the same way). Used here as is.
  const client = await connect()
  const watcher = await connect()
  try {
    for (let round = 0; round < 2; round++) {
      const query = new pg.Query('SELECT pg_sleep(30)')
      const result = new Promise((resolve, reject) => {
        query.on('end', resolve)
        query.on('error', reject)
      })
      const t0 = Date.now()
      client.query(query)
      await sleep(500)
      const canceller = new pg.Client({ connectionString: URL })
      canceller.connection.on('error', () => {}) // the proxy closes the cancel connection
      canceller.cancel(client, query)
      const err = await result.then(() => null, (e) => e)
      assert.ok(err, 'pg_sleep(30) was not canceled')
      assert.equal(err.code, '57014', `expected query_canceled, got ${err.code}: ${err.message}`)
      assert.ok(Date.now() - t0 < 5000, `cancel took ${Date.now() - t0} ms`)
      // node-postgres does not wait for the server to finish with a cancel
      // request (libpq does), so a late second SIGINT from PostgreSQL's cancel
      // processing could hit the next query; directly against PostgreSQL too.
      await sleep(100)
      assert.equal((await client.query('SELECT 42 AS v')).rows[0].v, 42)
    }
    const n = (await watcher.query(
      "SELECT count(*)::int AS n FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'"
    )).rows[0].n
    assert.equal(n, 0, `${n} pg_sleep(30) still running after cancel`)
  } finally {
    await client.end()
    await watcher.end()
  }
})

check('statement_timeout', async () => {
  // The documented way to bound a query in node-postgres: statement_timeout
  // (sent in the startup packet; the server cancels, SQLSTATE 57014).
  // query_timeout is client-side only: it does not cancel on the server.
  const client = await connect({ statement_timeout: 300 })
  try {
    assert.equal((await client.query('SHOW statement_timeout')).rows[0].statement_timeout, '300ms')
    const t0 = Date.now()
    await expectError(client.query('SELECT pg_sleep(5)'), '57014')
    assert.ok(Date.now() - t0 < 3000)
    await expectError(client.query({ name: 'drv_sleep', text: 'SELECT pg_sleep($1::float8)', values: [5] }), '57014')
    assert.equal((await client.query({ name: 'drv_sleep', text: 'SELECT pg_sleep($1::float8)', values: [0] })).rowCount, 1)
  } finally {
    await client.end()
  }
})

check('row_batches_portal_across_flush', async () => {
  // `rows` makes node-postgres Execute with a row limit and send Flush, not
  // Sync, between batches (pg-cursor and pg-query-stream work the same way):
  // the portal lives on one server connection until the Sync, so that
  // connection must stay with this client until then. Two other clients
  // start transactions while the portal is suspended; they have to wait.
  const a = await connect()
  const b = await connect()
  const c = await connect()
  let timer
  try {
    const query = new pg.Query({ text: 'SELECT g, pg_backend_pid() AS pid FROM generate_series(1, 30) g', rows: 10 })
    const result = new Promise((resolve, reject) => {
      query.on('end', resolve)
      query.on('error', reject)
    })
    a.query(query)
    const others = [b, c].map((cl) => cl.query('BEGIN').then(() => backendPid(cl)))
    const res = await Promise.race([
      result,
      new Promise((_, reject) => {
        timer = setTimeout(() => reject(new Error('no reply to the next batch within 8 s')), 8000)
      }),
    ])
    assert.equal(res.rows.length, 30)
    assert.equal(new Set(res.rows.map((r) => r.pid)).size, 1, 'the batches came from different server connections')
    const pids = await Promise.all(others)
    assert.equal(new Set(pids).size, 2)
  } finally {
    clearTimeout(timer)
    for (const cl of [a, b, c]) cl.connection.stream.destroy()
  }
})

async function main() {
  const strict = process.env.DRIVERS_STRICT === '1'
  let passed = 0
  let failed = 0
  let xfailed = 0
  const version = require('pg/package.json').version
  console.log(`node-postgres ${version}, node ${process.version}`)
  // An 'error' event nobody listens to, or a promise rejection nobody
  // handles, fails the check that is running instead of ending the script.
  let failCurrent = (e) => console.log('uncaught between checks:', e)
  process.on('uncaughtException', (e) => failCurrent(e))
  process.on('unhandledRejection', (e) => failCurrent(e))
  for (const { name, fn, knownBug } of checks) {
    const t0 = Date.now()
    let timer
    try {
      await Promise.race([
        fn(),
        new Promise((_, reject) => {
          timer = setTimeout(() => reject(new Error(`${name} still running after ${CHECK_TIMEOUT_MS / 1000} s`)), CHECK_TIMEOUT_MS)
          failCurrent = (e) => {
            console.log(`uncaught error during ${name}:`, e && e.stack ? e.stack : e)
            reject(e)
          }
        }),
      ])
      const note = knownBug ? ` (XPASS: known bug ${knownBug} did not show; fixed?)` : ''
      console.log(`ok   node-pg ${name} (${((Date.now() - t0) / 1000).toFixed(1)}s)${note}`)
      passed++
    } catch (e) {
      const took = ((Date.now() - t0) / 1000).toFixed(1)
      if (knownBug && !strict) {
        xfailed++
        console.log(`XFAIL node-pg ${name} (${took}s): known proxy bug ${knownBug}`)
      } else {
        failed++
        console.log(`FAIL node-pg ${name} (${took}s)`)
      }
      console.log(e && e.stack ? e.stack : e)
    } finally {
      clearTimeout(timer)
      failCurrent = (e) => console.log('uncaught between checks:', e && e.stack ? e.stack : e)
    }
  }
  console.log(`RESULT node-pg passed=${passed} failed=${failed} xfailed=${xfailed}`)
  // Clients of a hung check may still be open: do not wait for them.
  process.exit(failed ? 1 : 0)
}

main().catch((e) => {
  console.log(e && e.stack ? e.stack : e)
  process.exit(1)
})
