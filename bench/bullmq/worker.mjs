// The peer of orderpipe's bench section `bullmq` (bench/bullmq.py starts Redis and runs this):
// BullMQ 5 workers on Redis, measured the way bench/consumers.py measures orderpipe's consumer.
//
//   node worker.mjs --redis-port P [--redis-pid PID] [--jobs N] [--pg-url postgresql://...]
//                   [--pg-jobs N] [--concurrency 50] [--pg-pool 50] [--clk-tck 100] [--timeout 300]
//
// Cases, each on a fresh queue: all jobs are added first (Queue.addBulk in chunks, timed as `add`),
// then one Worker (concurrency 50) processes them:
//   noop        the processor returns at once: BullMQ's own cost per job (Redis Lua scripts,
//               ioredis, the event loop).
//   postgresql  (with --pg-url) each job in one transaction: a dedup row (the job id, primary key,
//               ON CONFLICT DO NOTHING) and, when it is new, an outbox row: what orderpipe's
//               idempotent consumer writes per event, one transaction per job (BullMQ has no
//               batches: a transaction per job is the idiomatic processor).
// The clock starts at the first job's `completed` event and stops at the last one's, as
// orderpipe's Meter starts after the first batch: count = jobs - 1 over that window. CPU is this
// process's (process.cpuUsage, every thread) and Redis's (/proc/<pid>/stat) over the same window.
// Prints one JSON line on stdout; exits 1 with {"error": ...} when a case fails.

import { readFileSync } from 'node:fs';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';

import { Queue, Worker } from 'bullmq';
import pg from 'pg';

const { values: args } = parseArgs({
  options: {
    'redis-port': { type: 'string' },
    'redis-host': { type: 'string', default: '127.0.0.1' },
    'redis-pid': { type: 'string' },
    jobs: { type: 'string', default: '10000' },
    'pg-url': { type: 'string' },
    'pg-jobs': { type: 'string', default: '5000' },
    concurrency: { type: 'string', default: '50' },
    'pg-pool': { type: 'string', default: '50' },
    chunk: { type: 'string', default: '1000' },
    'clk-tck': { type: 'string', default: '100' },
    timeout: { type: 'string', default: '300' },
  },
});

const connection = { host: args['redis-host'], port: Number(args['redis-port']), maxRetriesPerRequest: null };
const concurrency = Number(args.concurrency);
const chunk = Number(args.chunk);
const timeoutMs = Number(args.timeout) * 1000;
const clkTck = Number(args['clk-tck']);
const redisPid = args['redis-pid'] ? Number(args['redis-pid']) : null;

function packageVersion(name) {
  const url = new URL(`./node_modules/${name}/package.json`, import.meta.url);
  return JSON.parse(readFileSync(url, 'utf8')).version;
}

/** Redis's CPU seconds so far (user + system, all its threads), or null. */
function redisCpu() {
  if (redisPid === null) return null;
  try {
    const fields = readFileSync(`/proc/${redisPid}/stat`, 'utf8').split(')').pop().trim().split(/\s+/);
    return (Number(fields[11]) + Number(fields[12])) / clkTck; // utime, stime
  } catch {
    return null;
  }
}

function cpuSeconds() {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1e6;
}

// A small deterministic generator: an OrderCreated-like payload per job (about the size of the
// event orderpipe's consumer reads).
let seed = 5;
function rand() {
  seed = (seed * 1103515245 + 12345) % 2147483648;
  return seed / 2147483648;
}
const SKUS = ['SKU-001', 'SKU-002', 'SKU-003', 'SKU-004', 'SKU-005', 'SKU-006', 'SKU-007', 'SKU-008'];

function sampleOrder(i) {
  const lines = [];
  const n = 1 + Math.floor(rand() * 3);
  for (let k = 0; k < n; k++) {
    lines.push({ sku: SKUS[Math.floor(rand() * SKUS.length)], quantity: 1 + Math.floor(rand() * 4),
                 unit_price: (5 + Math.floor(rand() * 9500) / 100).toFixed(2) });
  }
  const total = lines.reduce((s, l) => s + l.quantity * Number(l.unit_price), 0).toFixed(2);
  return {
    order_id: `00000000-0000-4000-8000-${String(i).padStart(12, '0')}`,
    customer_id: `customer-${String(1 + Math.floor(rand() * 500)).padStart(4, '0')}`,
    customer_email: `c${1 + Math.floor(rand() * 1e6)}@example.com`,
    currency: 'EUR', lines, total, created_at: new Date().toISOString(), channel: 'web',
  };
}

async function runCase(name, count, processor) {
  const queueName = `bench-${name}-${process.pid}-${Date.now()}`;
  const queue = new Queue(queueName, { connection });
  await queue.waitUntilReady();

  // add every job first (orderpipe's consumer section pre-produces its events likewise)
  const addT0 = performance.now();
  const addCpu0 = cpuSeconds();
  const addRedis0 = redisCpu();
  for (let i = 0; i < count; i += chunk) {
    const jobs = [];
    for (let j = i; j < Math.min(count, i + chunk); j++) jobs.push({ name: 'OrderCreated', data: sampleOrder(j) });
    await queue.addBulk(jobs);
  }
  const addRedis1 = redisCpu();
  const add = { count, seconds: (performance.now() - addT0) / 1000, cpu_s: cpuSeconds() - addCpu0,
                redis_cpu_s: addRedis0 === null || addRedis1 === null ? null : addRedis1 - addRedis0 };

  let done = 0;
  let failed = 0;
  let firstError = null;
  let t0, t1, cpu0, cpu1, redis0, redis1;
  let finish;
  const finished = new Promise((resolve) => { finish = resolve; });
  const worker = new Worker(queueName, processor, { connection, concurrency, autorun: false });
  worker.on('completed', () => {
    done += 1;
    if (done === 1) {
      t0 = performance.now(); cpu0 = cpuSeconds(); redis0 = redisCpu();
    }
    if (done === count) {
      t1 = performance.now(); cpu1 = cpuSeconds(); redis1 = redisCpu();
      finish();
    }
  });
  worker.on('failed', (job, err) => {
    failed += 1;
    firstError ??= String(err && err.stack ? err.stack : err);
    finish();
  });
  worker.on('error', (err) => { firstError ??= String(err && err.stack ? err.stack : err); });
  const timer = setTimeout(finish, timeoutMs);
  worker.run().catch((err) => { firstError ??= String(err); finish(); });
  await finished;
  clearTimeout(timer);
  await worker.close();
  const counts = await queue.getJobCounts('completed', 'failed', 'waiting', 'active', 'delayed');
  await queue.obliterate({ force: true });
  await queue.close();
  if (failed || done < count) {
    throw new Error(`${name}: ${done} of ${count} jobs completed, ${failed} failed` +
                    (done < count && !failed ? ` within ${timeoutMs / 1000} s` : '') +
                    (firstError ? `; first error: ${firstError}` : '') + `; queue counts ${JSON.stringify(counts)}`);
  }
  return {
    add,
    process: { count: count - 1, seconds: (t1 - t0) / 1000, cpu_s: cpu1 - cpu0,
               redis_cpu_s: redis0 === null || redis1 === null ? null : redis1 - redis0, completed: done },
    queue_counts: counts,
  };
}

const SCHEMA = `
CREATE TABLE IF NOT EXISTS bullmq_dedup (
  job_id text PRIMARY KEY,
  processed_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS bullmq_outbox (
  id bigserial PRIMARY KEY,
  topic text NOT NULL,
  key text NOT NULL,
  payload jsonb NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now()
);`;

async function runPostgres(count) {
  const pool = new pg.Pool({ connectionString: args['pg-url'], max: Number(args['pg-pool']) });
  await pool.query(SCHEMA);
  let duplicates = 0;
  const processor = async (job) => {
    const client = await pool.connect();
    try {
      await client.query('BEGIN');
      const claim = await client.query(
        'INSERT INTO bullmq_dedup (job_id) VALUES ($1) ON CONFLICT DO NOTHING', [job.id]);
      if (claim.rowCount === 1) {
        const order = job.data;
        await client.query(
          'INSERT INTO bullmq_outbox (topic, key, payload) VALUES ($1, $2, $3)',
          ['analytics.order_recorded', order.order_id,
           JSON.stringify({ order_id: order.order_id, units: 0, revenue: order.total, currency: order.currency,
                            recorded_at: new Date().toISOString() })]);
      } else {
        duplicates += 1;
      }
      await client.query('COMMIT');
    } catch (err) {
      await client.query('ROLLBACK').catch(() => {});
      throw err;
    } finally {
      client.release();
    }
  };
  try {
    const fig = await runCase('postgresql', count, processor);
    const rows = await pool.query(
      'SELECT (SELECT count(*) FROM bullmq_dedup) AS dedup, (SELECT count(*) FROM bullmq_outbox) AS outbox');
    const { dedup, outbox } = rows.rows[0];
    if (Number(dedup) !== count || Number(outbox) !== count) {
      throw new Error(`postgresql: ${count} jobs but ${dedup} dedup rows, ${outbox} outbox rows`);
    }
    return { ...fig, duplicates, dedup_rows: Number(dedup), outbox_rows: Number(outbox) };
  } finally {
    await pool.end();
  }
}

async function main() {
  const out = {
    versions: { node: process.versions.node, bullmq: packageVersion('bullmq'), ioredis: packageVersion('ioredis'),
                pg: packageVersion('pg') },
    settings: { concurrency, add_chunk: chunk, pg_pool: Number(args['pg-pool']),
                job_options: 'BullMQ defaults (completed jobs kept in Redis, no retries)' },
  };
  out.noop = await runCase('noop', Number(args.jobs), async () => null);
  if (args['pg-url']) out.postgresql = await runPostgres(Number(args['pg-jobs']));
  process.stdout.write(JSON.stringify(out) + '\n');
}

main().then(() => process.exit(0), (err) => {
  process.stdout.write(JSON.stringify({ error: String(err && err.stack ? err.stack : err) }) + '\n');
  process.exit(1);
});
