// Serves the instrumented page on 127.0.0.1:PAGE_PORT and opens it in headless Chromium once
// per origin in ORIGINS (hostnames for that port, so each is an origin of its own), each load
// exporting one span marked with its origin's name to COLLECTOR. Prints one JSON line per load.
import { createServer } from "node:http";
import { build } from "esbuild";
import { chromium } from "playwright-core";

const here = new URL(".", import.meta.url).pathname;
const port = Number(process.env.PAGE_PORT);
const collector = process.env.COLLECTOR;
const origins = process.env.ORIGINS.split(",");

const bundle = await build({
  entryPoints: [`${here}page.js`],
  bundle: true,
  format: "iife",
  write: false,
  logLevel: "silent",
});
const script = bundle.outputFiles[0].text;
const html = '<!doctype html><html><head><meta charset="utf-8"><title>tailgate e2e</title></head>'
  + '<body><script src="/page.js"></script></body></html>';
const server = createServer((req, res) => {
  if (req.url.startsWith("/page.js")) {
    res.writeHead(200, { "content-type": "text/javascript" }).end(script);
  } else if (req.url === "/favicon.ico") {
    res.writeHead(404).end();
  } else {
    res.writeHead(200, { "content-type": "text/html" }).end(html);
  }
});
await new Promise((ok) => server.listen(port, "127.0.0.1", ok));

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
try {
  for (const host of origins) {
    const page = await browser.newPage();
    const console = [];
    page.on("console", (m) => console.push(m.text()));
    const url = `http://${host}:${port}/?collector=${encodeURIComponent(collector)}&mark=${host}`;
    await page.goto(url);
    await page.waitForFunction(() => window.__result !== undefined, null, { timeout: 30000 });
    const result = await page.evaluate(() => window.__result);
    process.stdout.write(JSON.stringify({ host, ...result, console }) + "\n");
    await page.close();
  }
} finally {
  await browser.close();
  server.close();
}
