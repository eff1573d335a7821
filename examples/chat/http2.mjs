// Headless Chromium opens 20 EventSources to one bus origin over HTTPS, where the browser
// and the server agree on HTTP/2 by ALPN: all 20 share one connection and all receive a
// live event. Over HTTP/1.1 the browser allows six connections per origin, so the same
// page against a plain-HTTP server gets events on six streams only: that run is the
// control, showing what this test would see without HTTP/2.
//
//   cargo build && npm ci && node http2.mjs
//
// The server's certificate is the test one of tests/fixtures/tls (its key protects
// nothing); Chromium trusts it by its public key (--ignore-certificate-errors-spki-list).
// BUS_BIN names the bus binary (default ../../target/debug/bus) and CHROMIUM the browser
// (default /usr/bin/chromium).

import { createHash, X509Certificate } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";
import { startBus, stopBus } from "./bus.mjs";

const here = dirname(fileURLToPath(import.meta.url));
const busBin = process.env.BUS_BIN || resolve(here, "../../target/debug/bus");
const chromiumPath = process.env.CHROMIUM || "/usr/bin/chromium";
const tls = resolve(here, "../../tests/fixtures/tls");
const STREAMS = 20;

function fail(message) {
  throw new Error(message);
}

// The SHA-256 of the certificate's public key, as Chromium's flag wants it.
const spki = new X509Certificate(readFileSync(join(tls, "cert.pem"))).publicKey.export({
  type: "spki",
  format: "der",
});
const pin = createHash("sha256").update(spki).digest("base64");

const data = mkdtempSync(join(tmpdir(), "bus-http2-test-"));
const https = await startBus(busBin, [
  "--addr", "127.0.0.1:0", "--path", join(data, "https"), "--namespaces", "app",
  "--tls-cert", join(tls, "cert.pem"), "--tls-key", join(tls, "key.pem"),
]);
const plain = await startBus(busBin, [
  "--addr", "127.0.0.1:0", "--path", join(data, "plain"), "--namespaces", "app",
]);
let browser;

// Opens STREAMS EventSources to `origin` from a page of that origin, publishes one event
// once the server counts them open (or after `settle` ms), and resolves with how many
// streams received it within `wait` ms, and the protocol the page was loaded with.
async function streamsReceiving(origin, publish, wait) {
  const page = await browser.newPage();
  try {
    await page.goto(`${origin}/healthz`);
    const protocol = await page.evaluate(
      () => performance.getEntriesByType("navigation")[0].nextHopProtocol,
    );
    await page.evaluate((count) => {
      window.received = new Array(count).fill(false);
      window.opened = 0;
      window.sources = [];
      for (let i = 0; i < count; i++) {
        const source = new EventSource("/?subject=app.live");
        source.onopen = () => window.opened++;
        source.addEventListener("msg", () => (window.received[i] = true));
        window.sources.push(source);
      }
    }, STREAMS);
    // Give the browser time to open what it will open.
    await page.waitForFunction((count) => window.opened >= count, STREAMS, { timeout: 3_000 }).catch(() => {});
    await publish(page);
    await page.waitForFunction(
      () => window.received.every((r) => r),
      null,
      { timeout: wait },
    ).catch(() => {});
    const received = await page.evaluate(() => window.received.filter((r) => r).length);
    return { protocol, received };
  } finally {
    await page.close();
  }
}

try {
  browser = await chromium.launch({
    executablePath: chromiumPath,
    args: ["--no-sandbox", `--ignore-certificate-errors-spki-list=${pin}`],
  });
  const body = JSON.stringify({ subject: "app.live", payload: { text: "hello" } });
  const overHttp2 = await streamsReceiving(
    `https://localhost:${https.address.split(":").pop()}`,
    // From the page, on the same origin: over HTTP/2 it shares the one connection.
    (page) => page.evaluate(async (body) => {
      const answer = await fetch("/", { method: "POST", body });
      if (answer.status !== 202) throw new Error(`publish answered ${answer.status}`);
    }, body),
    10_000,
  );
  if (overHttp2.protocol !== "h2") fail(`the page was loaded over ${overHttp2.protocol}, not h2`);
  if (overHttp2.received !== STREAMS) {
    fail(`over HTTP/2, ${overHttp2.received} of ${STREAMS} EventSources received the event`);
  }

  const overHttp1 = await streamsReceiving(
    `http://${plain.address}`,
    // From here: the page's own connections are all taken by its streams.
    async () => {
      const answer = await fetch(`http://${plain.address}/`, { method: "POST", body });
      if (answer.status !== 202) fail(`publish answered ${answer.status}`);
    },
    3_000,
  );
  if (overHttp1.protocol !== "http/1.1") fail(`the control page was loaded over ${overHttp1.protocol}`);
  if (overHttp1.received >= STREAMS) {
    fail(`the control over HTTP/1.1 got events on all ${STREAMS} streams: the test shows nothing`);
  }
  console.log(
    `http2 example: ok (${STREAMS} of ${STREAMS} EventSources live over h2; ` +
      `${overHttp1.received} over HTTP/1.1)`,
  );
} finally {
  // The servers are stopped whatever failed, the browser's start included.
  await browser?.close();
  await stopBus(https.child);
  await stopBus(plain.child);
  rmSync(data, { recursive: true, force: true });
}
