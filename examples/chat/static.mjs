// The chat page served the way a user would with any static file server, for the tests.

import { once } from "node:events";
import { readFileSync } from "node:fs";
import { createServer } from "node:http";
import { join } from "node:path";

// Serves `dir`/index.html on 127.0.0.1 (any path) and resolves once it listens.
export async function startStatic(dir) {
  const page = readFileSync(join(dir, "index.html"));
  const server = createServer((request, response) => {
    response.writeHead(200, { "Content-Type": "text/html; charset=utf-8" });
    response.end(page);
  });
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  return server;
}
