// End-to-end test of the chat page in headless Chromium, against a real `bus server`
// that requires a token, which the pages present in a cookie (--auth-cookie), never in a
// URL.
//
// Two pages open the chat on two rooms, each with one event stream for both; one sends a
// message and the other shows it. Then the server is stopped and started again on the
// same data; messages are published to both rooms while the pages are disconnected; each
// page's EventSource reconnects with Last-Event-ID (a cursor over both rooms) and shows
// them, none twice.
//
//   cargo build && npm ci && node test.mjs
//
// BUS_BIN names the bus binary (default ../../target/debug/bus) and CHROMIUM the browser
// (default /usr/bin/chromium).

import { once } from "node:events";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";
import { startBus } from "./bus.mjs";
import { startStatic } from "./static.mjs";

const here = dirname(fileURLToPath(import.meta.url));
const busBin = process.env.BUS_BIN || resolve(here, "../../target/debug/bus");
const chromiumPath = process.env.CHROMIUM || "/usr/bin/chromium";
const data = mkdtempSync(join(tmpdir(), "bus-chat-test-"));
const authFile = join(data, "tokens");
writeFileSync(authFile, "chat-token  app  publish,subscribe\nops-token   *    metrics\n");
let origin = "";

function fail(message) {
  throw new Error(message);
}

// Starts `bus server` on `addr` with the test's data, tokens and page origin.
function startTestBus(addr) {
  return startBus(busBin, [
    "--addr", addr, "--path", join(data, "bus"), "--namespaces", "app",
    "--auth-file", authFile, "--auth-cookie", "bus_token", "--cors-origins", origin,
  ]);
}

async function stopBus(bus) {
  bus.child.kill("SIGTERM");
  const [code] = await once(bus.child, "exit");
  if (code !== 0) fail(`bus exited with ${code} on SIGTERM`);
}


async function publish(busUrl, room, text) {
  const response = await fetch(busUrl, {
    method: "POST",
    headers: { Authorization: "Bearer chat-token" },
    body: JSON.stringify({ subject: `app.chat.${room}`, payload: { name: "server", text } }),
  });
  if (response.status !== 202) fail(`publish answered ${response.status}: ${await response.text()}`);
}

// The messages a page shows, as [id, "#room text"] pairs.
function shown(page) {
  return page.$$eval("#messages li", (items) =>
    items.map((li) => [li.dataset.id, `#${li.dataset.room} ${li.textContent}`]));
}

// Event streams open on the server.
async function openStreams(busUrl) {
  const response = await fetch(`${busUrl}metrics`, { headers: { Authorization: "Bearer ops-token" } });
  const match = (await response.text()).match(/^bus_subscriptions_active(?:{[^}]*})? (\d+)/m);
  return match ? Number(match[1]) : NaN;
}

async function waitFor(what, check, timeoutMs = 20_000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const result = await check();
    if (result) return result;
    if (Date.now() > deadline) fail(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

const staticServer = await startStatic(here);
origin = `http://127.0.0.1:${staticServer.address().port}`;
let bus = await startTestBus("127.0.0.1:0");
const busUrl = `http://${bus.address}/`;
const pageUrl = (name) =>
  `${origin}/?bus=${encodeURIComponent(busUrl)}&rooms=lobby,random&name=${name}&token=chat-token`;
const browser = await chromium.launch({ executablePath: chromiumPath, args: ["--no-sandbox"] });

try {
  const ana = await browser.newPage();
  const bob = await browser.newPage();
  await ana.goto(pageUrl("ana"));
  await bob.goto(pageUrl("bob"));
  for (const page of [ana, bob]) {
    await waitFor("the page to connect", () => page.$eval("#status", (s) => s.textContent === "live"));
  }

  // The token is in a cookie, not in the page's address (nor in the stream's).
  for (const page of [ana, bob]) {
    if (page.url().includes("token")) fail(`the token stayed in the address: ${page.url()}`);
  }
  // Two pages, two rooms each: two streams.
  const streams = await openStreams(busUrl);
  if (streams !== 2) fail(`${streams} event streams are open for two pages, expected 2`);

  // One page sends, the other shows it; then in the other room.
  await ana.fill("#text", "hello from ana");
  await ana.click("button");
  await waitFor("bob to see ana's message", async () =>
    (await shown(bob)).some(([, text]) => text === "#lobby ana:hello from ana"));
  await bob.selectOption("#room", "random");
  await bob.fill("#text", "hi in random");
  await bob.click("button");
  await waitFor("ana to see bob's message", async () =>
    (await shown(ana)).some(([, text]) => text === "#random bob:hi in random"));

  // Without the cookie the bus refuses the stream.
  const stranger = await fetch(`${busUrl}?subject=app.chat.lobby`);
  if (stranger.status !== 401) fail(`a stream without a token answered ${stranger.status}`);
  await stranger.body?.cancel();

  // Restart the server on the same address and data; publish while the pages are
  // disconnected.
  await stopBus(bus);
  for (const page of [ana, bob]) {
    await waitFor("the page to notice", () => page.$eval("#status", (s) => s.textContent !== "live"));
  }
  bus = await startTestBus(bus.address);
  const missed = [
    ["lobby", "while you were away 1"],
    ["random", "while you were away 2"],
    ["lobby", "while you were away 3"],
  ];
  for (const [room, text] of missed) await publish(busUrl, room, text);

  for (const [name, page] of [["ana", ana], ["bob", bob]]) {
    const messages = await waitFor(`${name} to catch up`, async () => {
      const list = await shown(page);
      return list.length >= 5 ? list : null;
    });
    // Give a duplicate the time to arrive if one were coming.
    await new Promise((r) => setTimeout(r, 500));
    const final = await shown(page);
    const texts = final.map(([, text]) => text);
    const expected = [
      "#lobby ana:hello from ana",
      "#random bob:hi in random",
      ...missed.map(([room, t]) => `#${room} server:${t}`),
    ];
    if (JSON.stringify(texts) !== JSON.stringify(expected)) {
      fail(`${name} shows ${JSON.stringify(texts)}, expected ${JSON.stringify(expected)}`);
    }
    const ids = new Set(final.map(([id]) => id));
    if (ids.size !== final.length || messages.length !== final.length) fail(`${name} shows a message twice`);
    await waitFor(`${name} to be live again`, () => page.$eval("#status", (s) => s.textContent === "live"));
  }
  console.log("chat example: ok (cookie auth, two rooms in one stream per page, one restart, no message lost or repeated)");
} finally {
  await browser.close();
  staticServer.close();
  // Its data directory is removed once it has exited (closed its files).
  if (bus.child.exitCode === null && bus.child.signalCode === null) {
    bus.child.kill("SIGTERM");
    await once(bus.child, "exit");
  }
  rmSync(data, { recursive: true, force: true });
}
