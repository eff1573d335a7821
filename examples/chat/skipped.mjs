// Headless Chromium sees retention's "you missed events" signal: a page whose
// EventSource asks for history that retention has removed receives an `event: skipped`
// with the removed range as JSON (EventSource hides the SSE comment that says the same),
// then the oldest kept event.
//
//   cargo build && npm ci && node skipped.mjs
//
// BUS_BIN names the bus binary (default ../../target/debug/bus) and CHROMIUM the browser
// (default /usr/bin/chromium).

import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";
import { startBus, stopBus } from "./bus.mjs";
import { startStatic } from "./static.mjs";

const here = dirname(fileURLToPath(import.meta.url));
const busBin = process.env.BUS_BIN || resolve(here, "../../target/debug/bus");
const chromiumPath = process.env.CHROMIUM || "/usr/bin/chromium";
const data = mkdtempSync(join(tmpdir(), "bus-skipped-test-"));

function fail(message) {
  throw new Error(message);
}

// Small segments and a small size limit, enforced often: old events go quickly.
const { child, address } = await startBus(busBin, [
  "--addr", "127.0.0.1:0", "--path", data, "--namespaces", "app",
  "--segment-size", "64KiB", "--retention-bytes", "128KiB", "--retention-interval", "100ms",
]);
const busUrl = `http://${address}/`;
const staticServer = await startStatic(here);
const browser = await chromium.launch({ executablePath: chromiumPath, args: ["--no-sandbox"] });

try {
  // About 600 KB in batches of 50: retention keeps about 128 KiB of it.
  const pad = "p".repeat(2000);
  for (let batch = 0; batch < 6; batch++) {
    const events = Array.from({ length: 50 }, (_, i) => ({
      subject: "app.r",
      payload: { n: batch * 50 + i, pad },
    }));
    const response = await fetch(busUrl, { method: "POST", body: JSON.stringify(events) });
    if (response.status !== 202) fail(`publish answered ${response.status}`);
  }
  // The oldest kept event, once retention has removed some and then stopped (the same
  // answer twice, 300 ms apart).
  const oldest = async () => {
    const stream = await fetch(`${busUrl}?subject=app.>&start=oldest&until=now`);
    const match = (await stream.text()).match(/"index":(\d+)/);
    return match ? Number(match[1]) : 0;
  };
  let kept = 0;
  let before = -1;
  const deadline = Date.now() + 20_000;
  while (kept === 0 || kept !== before) {
    if (Date.now() > deadline) fail(`retention did not settle (oldest kept: ${kept})`);
    await new Promise((r) => setTimeout(r, 300));
    before = kept;
    kept = await oldest();
  }

  const page = await browser.newPage();
  await page.goto(`http://127.0.0.1:${staticServer.address().port}/`);
  const seen = await page.evaluate(
    (url) =>
      new Promise((resolveSeen, reject) => {
        const source = new EventSource(`${url}?subject=app.>&start_index=0`);
        const seen = {};
        setTimeout(() => reject(new Error(`only saw ${JSON.stringify(seen)}`)), 10_000);
        source.addEventListener("skipped", (e) => {
          seen.skipped = JSON.parse(e.data);
        });
        source.addEventListener("msg", (e) => {
          seen.first = JSON.parse(e.data).index;
          source.close();
          resolveSeen(seen);
        });
      }),
    busUrl,
  );
  const expected = { first_index: 0, last_index: kept - 1, next_index: kept };
  if (JSON.stringify(seen.skipped) !== JSON.stringify(expected)) {
    fail(`the page saw skipped ${JSON.stringify(seen.skipped)}, expected ${JSON.stringify(expected)}`);
  }
  if (seen.first !== kept) fail(`the first event shown is ${seen.first}, expected ${kept}`);
  console.log(`skipped example: ok (the page was told events 0 to ${kept - 1} are gone)`);
} finally {
  await browser.close();
  staticServer.close();
  await stopBus(child);
  rmSync(data, { recursive: true, force: true });
}
