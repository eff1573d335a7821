// End-to-end test of the web console (/console) in headless Chromium, against a real
// `bus server`:
//
// - the overview lists each namespace with the number of events published over HTTP;
// - the live tail shows an event published (over HTTP, from here) after the page opened,
//   holds events back while paused, filters, and reads from a position and from a time;
// - the publish form stores an event (read back over HTTP), and a payload that is not
//   JSON shows the parser's error and sends nothing;
// - deleting a durable consumer asks first: dismissed, the consumer stays; accepted, it
//   is gone (checked over HTTP);
// - at 375 px wide in dark mode nothing overflows sideways, and the page is dark;
// - with --auth-file, the page asks for a token, and shows the namespaces once given one.
//
// The page must log no error (a Content-Security-Policy violation would be one).
// Screenshots go to target/console-screenshots/.
//
//   cargo build && npm ci && node console.mjs
//
// BUS_BIN names the bus binary (default ../../target/debug/bus) and CHROMIUM the browser
// (default /usr/bin/chromium).

import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";
import { startBus, stopBus } from "../../examples/chat/bus.mjs";

const here = dirname(fileURLToPath(import.meta.url));
const busBin = process.env.BUS_BIN || resolve(here, "../../target/debug/bus");
const chromiumPath = process.env.CHROMIUM || "/usr/bin/chromium";
const shots = resolve(here, "../../target/console-screenshots");
mkdirSync(shots, { recursive: true });
const data = mkdtempSync(join(tmpdir(), "bus-console-test-"));

function fail(message) {
  throw new Error(message);
}

async function waitFor(what, check, timeoutMs = 15_000) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    last = await check();
    if (last) return last;
    if (Date.now() > deadline) fail(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function publish(busUrl, event, token) {
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  const response = await fetch(busUrl, { method: "POST", headers, body: JSON.stringify(event) });
  if (response.status !== 202) fail(`publish answered ${response.status}: ${await response.text()}`);
  return response.headers.get("x-bus-event-id");
}

async function getJson(url) {
  const response = await fetch(url);
  if (response.status !== 200) fail(`GET ${url} answered ${response.status}`);
  return response.json();
}

// The events of `subject` stored now, read as a client would (a finite stream).
async function stored(busUrl, subject) {
  const response = await fetch(`${busUrl}?subject=${encodeURIComponent(subject)}&start=oldest&until=now`);
  const text = await response.text();
  return text.split("\n").filter((l) => l.startsWith("data: {")).map((l) => JSON.parse(l.slice(6)));
}

// Creates a durable consumer by attaching to it once; it stays after the stream closes.
async function createConsumer(busUrl, pattern, name) {
  const stop = new AbortController();
  const response = await fetch(`${busUrl}?subject=${encodeURIComponent(pattern)}&consumer=${name}&ack=manual&start=oldest`, {
    signal: stop.signal,
  });
  if (response.status !== 200) fail(`attaching ${name} answered ${response.status}`);
  stop.abort();
}

// Opens a page that fails the test on any error it logs.
async function openPage(context, url, errors) {
  const page = await context.newPage();
  page.on("pageerror", (e) => errors.push(`page error: ${e.message}`));
  page.on("response", (r) => {
    if (r.status() >= 400) errors.push(`${r.request().method()} ${r.url()} answered ${r.status()}`);
  });
  page.on("console", (m) => {
    if (m.type() === "error") errors.push(`console error: ${m.text()} (${m.location().url})`);
  });
  await page.goto(url);
  return page;
}

function noErrors(errors, when) {
  if (errors.length) fail(`the page logged errors (${when}):\n${errors.join("\n")}`);
}

// Whether the document is wider than the window (sideways scrolling).
function overflows(page) {
  return page.evaluate(() => document.documentElement.scrollWidth > window.innerWidth);
}

async function eventsShown(page, ns) {
  return page.$eval(`#namespaces article[data-namespace="${ns}"] [data-field="events"]`, (d) => d.textContent)
    .catch(() => null);
}

let bus = await startBus(busBin, ["--addr", "127.0.0.1:0", "--path", join(data, "open"), "--namespaces", "app,orders"]);
const busUrl = `http://${bus.address}/`;
const browser = await chromium.launch({ executablePath: chromiumPath, args: ["--no-sandbox"] });

try {
  for (let i = 0; i < 3; i++) await publish(busUrl, { subject: "app.signup", payload: { user: `u${i}` } });
  let appEvents = 3;
  await publish(busUrl, { subject: "orders.created", payload: { order: 1 } });
  await publish(busUrl, { subject: "orders.created", payload: { order: 2 } });
  await createConsumer(busUrl, "orders.>", "billing");
  await createConsumer(busUrl, "orders.>", "audit");

  const errors = [];
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 }, colorScheme: "light" });
  const page = await openPage(context, `${busUrl}console`, errors);

  // 1. The overview shows what was published.
  await waitFor("the overview to list app with 3 events", async () => (await eventsShown(page, "app")) === "3");
  await waitFor("the overview to list orders with 2 events", async () => (await eventsShown(page, "orders")) === "2");
  const health = await page.textContent("#health");
  if (health !== "ready") fail(`the health badge says ${JSON.stringify(health)}`);
  const version = await page.textContent("#version");
  if (!/^\d+\.\d+\.\d+/.test(version)) fail(`the version shown is ${JSON.stringify(version)}`);
  // A subscriber while traffic flows in bursts: the overview counts it and draws rates.
  const watcher = new AbortController();
  const watching = await fetch(`${busUrl}?subject=app.>`, { signal: watcher.signal });
  if (watching.status !== 200) fail(`a subscriber was answered ${watching.status}`);
  watching.body.pipeTo(new WritableStream()).catch(() => {});
  const appCard = '#namespaces article[data-namespace="app"]';
  const ratesShown = () =>
    page.$$eval(`${appCard} .rate-value`, (values) => values.length === 2 && values.every((v) => Number(v.textContent) > 0));
  // Bursts for 8 s at least (for the charts), and until the page shows both rates above 0
  // (each is the change since the previous frame, so the traffic goes on until then).
  for (let i = 0; i < 16 || !(await ratesShown()); i++) {
    if (i > 80) fail("the overview never showed publish and delivery rates above 0");
    const burst = [1, 3, 2, 5][i % 4];
    for (let j = 0; j < burst; j++) await publish(busUrl, { subject: "app.tick", payload: { i, j } });
    appEvents += burst;
    await sleep(500);
  }
  await waitFor("a subscriber on app", async () => (await page.textContent(`${appCard} [data-field="subscribers"]`)) === "1");
  await waitFor(`app's ${appEvents} events`, async () => (await eventsShown(page, "app")) === String(appEvents));
  await page.screenshot({ path: join(shots, "overview.png") });
  watcher.abort();

  // 2. The live tail gets an event published after it started.
  await page.click("#tab-tail");
  await page.fill("#tail-pattern", "app.>");
  await page.selectOption("#tail-from", "newest");
  await page.click("#tail-start");
  await waitFor("the tail to stream", async () => (await page.textContent("#tail-status")).startsWith("Streaming"));
  const liveId = await publish(busUrl, { subject: "app.live", payload: { text: "after the page opened", n: 42 } });
  await waitFor("the tail to show the new event", () => page.$(`#tail-events li[data-id="${liveId}"]`));
  const row = `#tail-events li[data-id="${liveId}"]`;
  if ((await page.textContent(`${row} .subject`)) !== "app.live") fail("the tail's row has another subject");
  await page.click(`${row} summary`);
  const payload = JSON.parse(await page.textContent(`${row} pre`));
  if (payload.n !== 42) fail(`the tail shows the payload ${JSON.stringify(payload)}`);
  if (!(await page.isVisible(`${row} pre`))) fail("the payload did not open");

  // Paused, a new event waits; resumed, it is shown.
  await page.click("#tail-pause");
  const heldId = await publish(busUrl, { subject: "app.live", payload: { held: true } });
  await waitFor("the tail to count the waiting event", async () =>
    (await page.textContent("#tail-status")).includes("1 new event(s) waiting"));
  if (await page.$(`#tail-events li[data-id="${heldId}"]`)) fail("a paused tail showed an event");
  await page.click("#tail-pause");
  await waitFor("the held event after resuming", () => page.$(`#tail-events li[data-id="${heldId}"]`));

  // The filter hides what does not match.
  await page.fill("#tail-filter", "held");
  if (await page.isVisible(row)) fail("the filter left a row that does not match");
  if (!(await page.isVisible(`#tail-events li[data-id="${heldId}"]`))) fail("the filter hid a matching row");
  await page.fill("#tail-filter", "");

  appEvents += 2; // the live one and the held one

  // From a position: app's events from index 1 on, newest first.
  await page.selectOption("#tail-from", "index");
  await page.fill("#tail-index", "1");
  await page.click("#tail-clear");
  await page.click("#tail-start");
  const indexes = await waitFor("the events from position 1", async () => {
    const shown = await page.$$eval("#tail-events li .index", (items) => items.map((i) => i.textContent));
    return shown.length >= appEvents - 1 ? shown : null;
  });
  const expected = Array.from({ length: appEvents - 1 }, (_, i) => `#${appEvents - 1 - i}`);
  if (JSON.stringify(indexes) !== JSON.stringify(expected)) {
    fail(`from position 1 the tail shows ${JSON.stringify(indexes)}, expected ${JSON.stringify(expected)}`);
  }

  // From a time: an hour ago (the browser's local time, as the input takes it) is before
  // every event, so all of app's come, the oldest (#0) last.
  const hourAgo = new Date(Date.now() - 3600_000);
  const pad = (n) => String(n).padStart(2, "0");
  const local = `${hourAgo.getFullYear()}-${pad(hourAgo.getMonth() + 1)}-${pad(hourAgo.getDate())}T` +
    `${pad(hourAgo.getHours())}:${pad(hourAgo.getMinutes())}:${pad(hourAgo.getSeconds())}`;
  await page.selectOption("#tail-from", "time");
  if (await page.isVisible("#tail-index")) fail("the position field stays with a time chosen");
  await page.fill("#tail-time", local);
  await page.click("#tail-clear");
  await page.click("#tail-start");
  const fromTime = await waitFor("the events from an hour ago", async () => {
    const shown = await page.$$eval("#tail-events li .index", (items) => items.map((i) => i.textContent));
    return shown.length >= appEvents ? shown : null;
  });
  if (fromTime.length !== appEvents || fromTime[fromTime.length - 1] !== "#0") {
    fail(`from an hour ago the tail shows ${JSON.stringify(fromTime)}`);
  }
  await page.click("#tail-events li:first-child summary");
  await page.screenshot({ path: join(shots, "tail.png") });

  // 3. The publish form stores an event.
  await page.click("#tab-publish");
  await page.fill("#pub-subject", "app.console");
  await page.fill("#pub-payload", '{\n  "hello": "world",\n  "n": [1, 2, 3]\n}');
  await page.fill("#pub-key", "console-key-1");
  await page.fill("#pub-trace", "trace-7");
  await page.click("#pub-send");
  const answer = await waitFor("the publish answer", async () => {
    const out = await page.$eval("#pub-result", (o) => [o.dataset.kind, o.textContent]);
    return out[0] === "ok" || out[0] === "error" ? out : null;
  });
  if (answer[0] !== "ok") fail(`publishing answered ${answer[1]}`);
  const publishedId = answer[1].match(/id (e_\S+),/)?.[1] || fail(`no id in ${answer[1]}`);
  if (!answer[1].includes(`index ${appEvents},`)) fail(`the answer does not give index ${appEvents}: ${answer[1]}`);
  appEvents += 1;
  const [storedEvent] = await stored(busUrl, "app.console");
  if (!storedEvent || storedEvent.id !== publishedId) fail(`app.console holds ${JSON.stringify(storedEvent)}`);
  if (storedEvent.payload.hello !== "world" || storedEvent.key !== "console-key-1" || storedEvent.trace_id !== "trace-7") {
    fail(`the stored event is ${JSON.stringify(storedEvent)}`);
  }
  await page.screenshot({ path: join(shots, "publish.png") });

  // A payload that is not JSON: the parser's error, and nothing sent.
  const before = (await getJson(`${busUrl}namespaces/app`)).next_index;
  const posts = [];
  page.on("request", (r) => {
    if (r.method() === "POST") posts.push(r.url());
  });
  await page.fill("#pub-payload", '{"hello": }');
  await page.click("#pub-send");
  await waitFor("the JSON error", () => page.isVisible("#pub-payload-error"));
  const jsonError = await page.textContent("#pub-payload-error");
  if (!jsonError.startsWith("Not valid JSON, nothing was sent:") || jsonError.length < 40) {
    fail(`the JSON error reads ${JSON.stringify(jsonError)}`);
  }
  if ((await page.getAttribute("#pub-payload", "aria-invalid")) !== "true") fail("the payload is not marked invalid");
  await sleep(1000);
  if (posts.length) fail(`a bad payload was sent: ${posts.join(", ")}`);
  const after = (await getJson(`${busUrl}namespaces/app`)).next_index;
  if (after !== before) fail(`app went from ${before} to ${after} events after a bad payload`);
  await page.screenshot({ path: join(shots, "publish-error.png") });

  // 4. Deleting a consumer asks first.
  await page.click("#tab-consumers");
  const billingRow = 'tr[data-consumer="orders/billing"]';
  await waitFor("the consumers to be listed", async () =>
    (await page.$(billingRow)) && (await page.$('tr[data-consumer="orders/audit"]')));
  const lag = await page.textContent(`${billingRow} td[data-label="Lag"]`);
  if (lag !== "2") fail(`billing's lag shows ${lag}, expected 2`);
  await page.screenshot({ path: join(shots, "consumers.png") });

  let asked = "";
  page.once("dialog", (dialog) => {
    asked = dialog.message();
    dialog.dismiss();
  });
  await page.click(`${billingRow} button.danger`);
  await waitFor("the confirmation", () => asked);
  if (namedInQuotes(asked) !== "billing") fail(`the confirmation reads ${JSON.stringify(asked)}`);
  await waitFor("the page to say it kept it", async () => (await page.textContent("#consumers-message")) === "Kept billing.");
  const kept = (await getJson(`${busUrl}consumers/orders`)).map((c) => c.name).sort();
  if (JSON.stringify(kept) !== '["audit","billing"]') fail(`after dismissing, orders has ${JSON.stringify(kept)}`);
  if (!(await page.$(billingRow))) fail("after dismissing, billing is no longer listed");

  page.once("dialog", (dialog) => dialog.accept());
  await page.click(`${billingRow} button.danger`);
  await waitFor("billing to leave the list", async () => !(await page.$(billingRow)));
  const left = (await getJson(`${busUrl}consumers/orders`)).map((c) => c.name);
  if (JSON.stringify(left) !== '["audit"]') fail(`after deleting, orders has ${JSON.stringify(left)}`);
  // The live figures agree a moment later (the list is redrawn from them every 2 s).
  await sleep(2500);
  if (await page.$(billingRow)) fail("billing came back in the list");
  if (!(await page.$('tr[data-consumer="orders/audit"]'))) fail("audit left the list");
  noErrors(errors, "light, wide");
  await context.close();

  // 5. A narrow window in dark mode: nothing overflows sideways.
  const narrow = await browser.newContext({ viewport: { width: 375, height: 812 }, colorScheme: "dark" });
  const errorsNarrow = [];
  const small = await openPage(narrow, `${busUrl}console`, errorsNarrow);
  await waitFor("the narrow overview", async () => (await eventsShown(small, "app")) === String(appEvents));
  const background = await small.evaluate(() => getComputedStyle(document.body).backgroundColor);
  const [r, g, b] = background.match(/\d+/g).map(Number);
  if (r + g + b > 150) fail(`dark mode draws on ${background}`);
  await small.screenshot({ path: join(shots, "narrow-dark-overview.png"), fullPage: true });
  for (const tab of ["tail", "publish", "consumers", "overview"]) {
    await small.click(`#tab-${tab}`);
    if (tab === "tail") {
      await small.selectOption("#tail-from", "oldest");
      await small.fill("#tail-pattern", "app.>");
      await small.click("#tail-start");
      await waitFor("the narrow tail", async () => (await small.$$("#tail-events li")).length >= appEvents);
      await small.click("#tail-events li:first-child summary");
    }
    if (tab === "consumers") await waitFor("the narrow consumer list", () => small.$('tr[data-consumer="orders/audit"]'));
    if (await overflows(small)) {
      const width = await small.evaluate(() => document.documentElement.scrollWidth);
      await small.screenshot({ path: join(shots, `narrow-dark-${tab}-overflow.png`), fullPage: true });
      fail(`at 375 px the ${tab} tab is ${width} px wide`);
    }
    if (tab !== "overview") await small.screenshot({ path: join(shots, `narrow-dark-${tab}.png`), fullPage: true });
  }
  noErrors(errorsNarrow, "dark, narrow");
  await narrow.close();
  await stopBus(bus.child);

  // 6. With authentication the page asks for a token, keeps it in the tab only, and
  // shows what the token administers.
  const tokens = join(data, "tokens");
  writeFileSync(tokens, "console-admin  *  admin,publish,subscribe\n");
  bus = await startBus(busBin, [
    "--addr", "127.0.0.1:0", "--path", join(data, "auth"), "--namespaces", "app,orders", "--auth-file", tokens,
  ]);
  const authUrl = `http://${bus.address}/`;
  await publish(authUrl, { subject: "orders.created" }, "console-admin");
  const locked = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const guarded = await locked.newPage();
  await guarded.goto(`${authUrl}console`);
  await waitFor("the token form", () => guarded.isVisible("#auth"));
  await guarded.screenshot({ path: join(shots, "token.png") });
  await guarded.fill("#auth-token", "console-admin");
  await guarded.click('#auth button[type="submit"]');
  await waitFor("the overview with the token", async () => (await eventsShown(guarded, "orders")) === "1");
  if (await guarded.isVisible("#auth")) fail("the token form stayed");
  const kept2 = await guarded.evaluate(() => [sessionStorage.length, localStorage.length]);
  if (JSON.stringify(kept2) !== "[1,0]") fail(`the token is stored as ${JSON.stringify(kept2)} (session, local)`);
  await locked.close();

  console.log(
    "console: ok (overview counts, live tail with pause, filter, position and time, publish stored, bad JSON not sent, " +
      "consumer deleted after confirmation, 375 px dark without overflow, token asked and used)",
  );
} finally {
  await browser.close();
  await stopBus(bus.child);
  rmSync(data, { recursive: true, force: true });
}

// The consumer a confirmation names (the text between the first quotes).
function namedInQuotes(message) {
  return message.match(/"([^"]+)"/)?.[1] || "";
}
