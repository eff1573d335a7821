// Starting a `bus server` for the browser tests.

import { spawn } from "node:child_process";

// Starts `bus server <args>` and resolves with the child and the address it listens on
// (from its log); gives up after 30 s.
export async function startBus(busBin, args) {
  const child = spawn(busBin, ["server", ...args], { stdio: ["ignore", "ignore", "pipe"] });
  let log = "";
  const listening = new Promise((resolveListening, reject) => {
    child.stderr.on("data", (chunk) => {
      log += chunk;
      const match = log.match(/bus server listening addr=(\S+)/);
      if (match) resolveListening(match[1]);
    });
    child.on("exit", (code) => reject(new Error(`bus exited with ${code}: ${log}`)));
  });
  const timeout = setTimeout(() => child.kill("SIGKILL"), 30_000);
  try {
    return { child, address: await listening };
  } finally {
    clearTimeout(timeout);
  }
}

// Stops a server started by startBus: SIGTERM, then waits until it has exited (its files
// closed, so that its data directory can be removed); SIGKILL after 10 s.
export async function stopBus(child) {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((resolveExit) => child.once("exit", resolveExit));
  child.kill("SIGTERM");
  const timeout = setTimeout(() => child.kill("SIGKILL"), 10_000);
  await exited;
  clearTimeout(timeout);
}
