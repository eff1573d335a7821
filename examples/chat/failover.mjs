// End-to-end test of the chat page in headless Chromium, against two `bus server` nodes
// sharing one NATS JetStream, behind a TCP load balancer.
//
// Both pages and a publisher reach the bus only through the balancer, which sends every
// new connection to node A while A accepts it, else to node B (as nginx or HAProxy with a
// backup server would). A publisher posts numbered messages every ~20 ms. Once 30 are
// acknowledged, node A is killed with SIGKILL while the pages stream through it; their
// EventSource reconnects with Last-Event-ID, lands on node B and resumes there. Each page
// must end up showing every acknowledged message, in order, none twice, and nothing that
// was never sent. The test prints how long after the kill each page was live again and
// showed the first message published after the kill.
//
//   cargo build && npm ci && PATH=../../target/nats-server/bin:$PATH node failover.mjs
//
// BUS_BIN names the bus binary (default ../../target/debug/bus), NATS_SERVER the NATS server
// (default nats-server, found on PATH) and CHROMIUM the browser (default /usr/bin/chromium).

import { spawn } from "node:child_process";
import { once } from "node:events";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { connect, createServer as createTcpServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";
import { startStatic } from "./static.mjs";

const here = dirname(fileURLToPath(import.meta.url));
const busBin = process.env.BUS_BIN || resolve(here, "../../target/debug/bus");
const natsBin = process.env.NATS_SERVER || "nats-server";
const chromiumPath = process.env.CHROMIUM || "/usr/bin/chromium";
const root = mkdtempSync(join(tmpdir(), "bus-chat-failover-"));

const ACKED_BEFORE_KILL = 30;
const PUBLISH_INTERVAL_MS = 20;
const AFTER_RECONNECT_MS = 2_000;
const OVERALL_TIMEOUT_MS = 90_000;

function fail(message) {
  throw new Error(message);
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Everything started, for the cleanup and for the logs printed on failure.
const processes = []; // { name, child, log }
let browser;
let staticServer;
let balancer;

function track(name, child) {
  const proc = { name, child, log: "", exited: false };
  child.stderr.on("data", (chunk) => {
    proc.log += chunk;
  });
  child.on("exit", () => {
    proc.exited = true;
  });
  child.on("error", (error) => {
    proc.log += `\n[spawn error: ${error.message}]`;
    proc.exited = true;
  });
  processes.push(proc);
  return proc;
}

async function freePort() {
  const server = createTcpServer();
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  const { port } = server.address();
  server.close();
  await once(server, "close");
  return port;
}

function accepts(port) {
  return new Promise((resolveAccepts) => {
    const socket = connect(port, "127.0.0.1");
    socket.once("connect", () => {
      socket.destroy();
      resolveAccepts(true);
    });
    socket.once("error", () => {
      socket.destroy();
      resolveAccepts(false);
    });
  });
}

// Starts nats-server with JetStream on a free loopback port and resolves with its URL once
// the port accepts connections.
async function startNats() {
  const port = await freePort();
  const store = join(root, "nats");
  mkdirSync(store);
  const config = join(root, "nats.conf");
  writeFileSync(
    config,
    `listen: 127.0.0.1:${port}\njetstream { store_dir: ${JSON.stringify(store)}, sync_interval: always }\n`,
  );
  const nats = track("nats-server", spawn(natsBin, ["-c", config], { stdio: ["ignore", "ignore", "pipe"] }));
  await waitFor("nats-server to accept connections", async () => {
    if (nats.exited) fail(`nats-server exited: ${nats.log}`);
    return accepts(port);
  }, 15_000);
  return `nats://127.0.0.1:${port}`;
}

// Starts a `bus server` on JetStream and resolves with its address once it listens.
async function startBus(name, natsUrl) {
  const path = join(root, name);
  mkdirSync(path);
  const child = spawn(
    busBin,
    ["server", "--addr", "127.0.0.1:0", "--path", path, "--namespaces", "app",
      "--store", "jetstream", "--nats-url", natsUrl],
    { stdio: ["ignore", "ignore", "pipe"] },
  );
  const proc = track(`bus ${name}`, child);
  const listening = new Promise((resolveListening, reject) => {
    child.stderr.on("data", () => {
      const match = proc.log.match(/bus server listening addr=(\S+)/);
      if (match) resolveListening(match[1]);
    });
    child.on("exit", (code, signal) => reject(new Error(`bus ${name} exited with ${code ?? signal}: ${proc.log}`)));
  });
  const timeout = setTimeout(() => child.kill("SIGKILL"), 30_000);
  try {
    const address = await listening;
    const colon = address.lastIndexOf(":");
    const [host, port] = [address.slice(0, colon), Number(address.slice(colon + 1))];
    return { proc, child, address, host, port };
  } finally {
    clearTimeout(timeout);
  }
}

// A TCP load balancer standing in for nginx or HAProxy: each connection goes to the first
// backend that accepts it. When either side closes or fails, the other is closed too, so
// a dead backend drops the browser's connection at once.
async function startBalancer(backends) {
  const sockets = new Set();
  const server = createTcpServer((client) => {
    sockets.add(client);
    client.on("close", () => sockets.delete(client));
    client.on("error", () => client.destroy());
    const tryBackend = (index) => {
      if (client.destroyed) return;
      if (index >= backends.length) {
        client.destroy();
        return;
      }
      const upstream = connect(backends[index].port, backends[index].host);
      sockets.add(upstream);
      upstream.on("close", () => sockets.delete(upstream));
      const onConnectError = () => {
        upstream.destroy();
        tryBackend(index + 1);
      };
      upstream.once("error", onConnectError);
      upstream.once("connect", () => {
        upstream.off("error", onConnectError);
        if (client.destroyed) {
          upstream.destroy();
          return;
        }
        client.pipe(upstream);
        upstream.pipe(client);
        const link = (from, to) => {
          from.on("error", () => {
            from.destroy();
            to.destroy();
          });
          // A plain close: let what was already piped reach the other side, then close it.
          from.on("close", () => to.destroySoon());
        };
        link(client, upstream);
        link(upstream, client);
      });
    };
    tryBackend(0);
  });
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  return {
    server,
    url: `http://127.0.0.1:${server.address().port}/`,
    close() {
      server.close();
      for (const socket of sockets) socket.destroy();
    },
  };
}


// Publishes m1, m2, ... one after another, every ~20 ms, never retrying a number: an
// attempt whose answer was lost may or may not have been stored.
function startPublisher(busUrl) {
  const attempts = []; // { n, startedAt, outcome: 202 | other status | "error: ..." }
  let stopped = false;
  const done = (async () => {
    for (let n = 1; !stopped; n++) {
      const attempt = { n, startedAt: Date.now(), outcome: "pending" };
      attempts.push(attempt);
      try {
        const response = await fetch(busUrl, {
          method: "POST",
          body: JSON.stringify({ subject: "app.chat.lobby", payload: { name: "server", text: `m${n}` } }),
          signal: AbortSignal.timeout(5_000),
        });
        const body = await response.text();
        attempt.outcome = response.status === 202 ? 202 : `${response.status} ${body.slice(0, 200)}`;
      } catch (error) {
        attempt.outcome = `error: ${error.cause?.code || error.cause?.message || error.message}`;
      }
      const wait = attempt.startedAt + PUBLISH_INTERVAL_MS - Date.now();
      if (wait > 0) await sleep(wait);
    }
  })();
  return {
    attempts,
    acked: () => attempts.filter((a) => a.outcome === 202).map((a) => a.n),
    stop() {
      stopped = true;
      return done;
    },
  };
}

// The messages a page shows, as [id, text] pairs.
function shown(page) {
  return page.$$eval("#messages li", (items) => items.map((li) => [li.dataset.id, li.textContent]));
}

// Records in the page when its status changes and when each message is shown.
function watch(page) {
  return page.evaluate(() => {
    const status = document.getElementById("status");
    window.statusLog = [[Date.now(), status.textContent]];
    new MutationObserver(() => window.statusLog.push([Date.now(), status.textContent]))
      .observe(status, { childList: true, characterData: true, subtree: true });
    window.shownLog = [];
    new MutationObserver((records) => {
      for (const record of records) {
        for (const node of record.addedNodes) {
          if (node.dataset) window.shownLog.push([Date.now(), node.dataset.id, node.textContent]);
        }
      }
    }).observe(document.getElementById("messages"), { childList: true });
  });
}

async function waitFor(what, check, timeoutMs = 20_000, detail = async () => "") {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const result = await check();
    if (result) return result;
    if (Date.now() > deadline) fail(`timed out after ${timeoutMs} ms waiting for ${what}${await detail()}`);
    await sleep(100);
  }
}

// When the page, after `since`, first lost its connection and then was live again.
async function reconnectedAt(page, since) {
  const log = await page.evaluate(() => window.statusLog);
  const lost = log.findIndex(([t, text]) => t >= since && text !== "live");
  if (lost < 0) return { lost: null, live: null };
  const live = log.slice(lost).find(([, text]) => text === "live");
  return { lost: log[lost][0], live: live ? live[0] : null };
}

const textOf = (n) => `server:m${n}`;

async function run() {
  const natsUrl = await startNats();
  const nodeA = await startBus("a", natsUrl);
  const nodeB = await startBus("b", natsUrl);
  balancer = await startBalancer([nodeA, nodeB]);
  const busUrl = balancer.url;
  staticServer = await startStatic(here);
  const pageUrl = (name) =>
    `http://127.0.0.1:${staticServer.address().port}/?bus=${encodeURIComponent(busUrl)}&room=lobby&name=${name}`;
  browser = await chromium.launch({ executablePath: chromiumPath, args: ["--no-sandbox"] });

  const pages = [];
  for (const name of ["ana", "bob"]) {
    const page = await browser.newPage();
    await page.goto(pageUrl(name));
    pages.push([name, page]);
  }
  for (const [name, page] of pages) {
    await waitFor(`${name} to connect`, () => page.$eval("#status", (s) => s.textContent === "live"));
    await watch(page);
  }

  // Publish through node A, then kill it while the pages stream through it.
  const publisher = startPublisher(busUrl);
  await waitFor(`${ACKED_BEFORE_KILL} publishes to be acknowledged`,
    () => publisher.acked().length >= ACKED_BEFORE_KILL, 20_000,
    async () => `; attempts: ${JSON.stringify(publisher.attempts.slice(-10))}`);
  const killedAt = Date.now();
  nodeA.child.kill("SIGKILL");

  const reconnects = {};
  for (const [name, page] of pages) {
    await waitFor(`${name} to notice that node A is gone`,
      async () => (await reconnectedAt(page, killedAt)).lost !== null, 10_000);
  }
  for (const [name, page] of pages) {
    reconnects[name] = await waitFor(`${name} to be live again through node B`, async () => {
      const { live } = await reconnectedAt(page, killedAt);
      return live;
    }, 20_000, async () => `; status log: ${JSON.stringify(await page.evaluate(() => window.statusLog))}`);
  }
  await sleep(AFTER_RECONNECT_MS);
  await publisher.stop();

  const attempts = publisher.attempts;
  const attempted = new Set(attempts.map((a) => a.n));
  const acked = publisher.acked();
  const failed = attempts.filter((a) => a.outcome !== 202);
  const firstAfterKill = attempts.find((a) => a.startedAt >= killedAt)?.n;
  const ackedAfterKill = acked.filter((n) => n >= firstAfterKill);
  if (ackedAfterKill.length === 0) {
    fail(`no publish was acknowledged after the kill; attempts after it: ${JSON.stringify(
      attempts.filter((a) => a.startedAt >= killedAt).slice(0, 20))}`);
  }

  const timings = [];
  for (const [name, page] of pages) {
    await waitFor(`${name} to show every acknowledged message`, async () => {
      const texts = new Set((await shown(page)).map(([, text]) => text));
      return acked.every((n) => texts.has(textOf(n)));
    }, 20_000, async () => {
      const list = await shown(page);
      const texts = new Set(list.map(([, text]) => text));
      const missing = acked.filter((n) => !texts.has(textOf(n)));
      return `; missing ${JSON.stringify(missing)}; kill at m${firstAfterKill}; ` +
        `last shown ${JSON.stringify(list.slice(-5))}`;
    });
    // Give a duplicate the time to arrive if one were coming.
    await sleep(500);
    const final = await shown(page);
    // The shown messages around the i-th, for the failure messages.
    const around = (i) => `${name} shows ...${JSON.stringify(final.slice(Math.max(0, i - 4), i + 5))}...`;

    const ids = final.map(([id]) => id);
    const dupId = ids.findIndex((id, i) => ids.indexOf(id) !== i);
    if (dupId >= 0) {
      fail(`${name} shows id ${ids[dupId]} twice (kill at m${firstAfterKill}): ${around(ids.indexOf(ids[dupId]))} and ${around(dupId)}`);
    }
    const texts = final.map(([, text]) => text);
    const dupText = texts.findIndex((text, i) => texts.indexOf(text) !== i);
    if (dupText >= 0) {
      fail(`${name} shows ${texts[dupText]} twice (kill at m${firstAfterKill}): ${around(texts.indexOf(texts[dupText]))} and ${around(dupText)}`);
    }

    const numbers = final.map(([id, text]) => {
      const match = /^server:m(\d+)$/.exec(text);
      if (!match || !attempted.has(Number(match[1]))) fail(`${name} shows [${id}, ${text}], which was never sent`);
      return Number(match[1]);
    });
    for (let i = 1; i < numbers.length; i++) {
      if (numbers[i] <= numbers[i - 1]) fail(`m${numbers[i]} after m${numbers[i - 1]}: ${around(i)}`);
    }
    const missing = acked.filter((n) => !numbers.includes(n));
    if (missing.length) {
      fail(`${name} lost acknowledged ${JSON.stringify(missing)} (kill at m${firstAfterKill}): ` +
        around(numbers.findIndex((n) => n > missing[0])));
    }

    const shownLog = await page.evaluate(() => window.shownLog);
    const firstNew = shownLog.find(([, , text]) => {
      const match = /^server:m(\d+)$/.exec(text);
      return match && Number(match[1]) >= firstAfterKill;
    });
    const stored = failed.filter((a) => numbers.includes(a.n)).map((a) => `m${a.n}`);
    timings.push(`${name}: shows unacknowledged [${stored.join(",")}], live again after ${reconnects[name] - killedAt} ms, ` +
      `first post-kill message after ${firstNew[0] - killedAt} ms`);
  }

  const unacked = failed.map((a) => `m${a.n}: ${a.outcome}`).join(", ");
  console.log(`chat failover: ok (${acked.length} acknowledged, ${failed.length} not [${unacked}], ` +
    `node A killed before m${firstAfterKill}; ${timings.join("; ")})`);
}

let overallTimer;
const overall = new Promise((_, reject) => {
  overallTimer = setTimeout(
    () => reject(new Error(`the test did not finish within ${OVERALL_TIMEOUT_MS / 1000} s`)),
    OVERALL_TIMEOUT_MS,
  );
});

async function stopProcess(proc) {
  if (proc.exited) return;
  proc.child.kill("SIGTERM");
  const exited = once(proc.child, "exit");
  const timer = setTimeout(() => proc.child.kill("SIGKILL"), 5_000);
  await Promise.race([exited, sleep(10_000)]);
  clearTimeout(timer);
}

let exitCode = 0;
try {
  await Promise.race([run(), overall]);
} catch (error) {
  exitCode = 1;
  console.error(`chat failover: FAILED: ${error.message}`);
  for (const proc of processes) {
    const tail = proc.log.split("\n").slice(-30).join("\n");
    console.error(`--- ${proc.name} (pid ${proc.child.pid}) stderr, last lines:\n${tail}`);
  }
} finally {
  clearTimeout(overallTimer);
  await browser?.close().catch(() => {});
  staticServer?.close();
  balancer?.close();
  // Bus nodes first, then the NATS server they use.
  await Promise.all(processes.filter((p) => p.name !== "nats-server").map(stopProcess));
  await Promise.all(processes.filter((p) => p.name === "nats-server").map(stopProcess));
  rmSync(root, { recursive: true, force: true });
}
process.exit(exitCode);
