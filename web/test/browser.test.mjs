// The chat page and the dashboard in a real browser (Debian's Chromium,
// driven by playwright-core), against a chatd built from this repository
// and started with --dev, as make run starts it. Screenshots go to
// web/test-output/.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync, spawn } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { createConnection, createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const web = join(import.meta.dirname, "..");
const root = join(web, "..");
const shots = join(web, "test-output");
const secret = "browser-test-secret-browser-test-secret";
const chromiumPath = process.env.CHROMIUM ?? "/usr/bin/chromium";

let work, bin, loadtest, server, browser;

function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

function reachable(port) {
  return new Promise((resolve) => {
    const c = createConnection({ port, host: "127.0.0.1" }, () => {
      c.end();
      resolve(true);
    });
    c.on("error", () => resolve(false));
  });
}

async function until(what, f, ms = 30_000) {
  const deadline = Date.now() + ms;
  while (!(await f())) {
    if (Date.now() > deadline) throw new Error(`${what}: not within ${ms} ms`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/**
 * A TCP proxy in front of the WebSocket listener that the test can cut:
 * Chromium's offline emulation leaves open WebSockets alone, a real
 * network loss does not.
 */
async function proxy(target) {
  const port = await freePort();
  const socks = new Set();
  let down = false;
  const srv = createServer((c) => {
    if (down) return c.destroy();
    const up = createConnection({ port: target, host: "127.0.0.1" });
    socks.add(c).add(up);
    const drop = () => {
      c.destroy();
      up.destroy();
      socks.delete(c);
      socks.delete(up);
    };
    c.on("error", drop).on("close", drop);
    up.on("error", drop).on("close", drop);
    c.pipe(up).pipe(c);
  });
  await new Promise((r) => srv.listen(port, "127.0.0.1", r));
  return {
    url: `ws://127.0.0.1:${port}/mqtt`,
    cut() {
      down = true;
      for (const s of socks) s.destroy();
      socks.clear();
    },
    restore() {
      down = false;
    },
    close: () => new Promise((r) => srv.close(r)),
  };
}

before(async () => {
  mkdirSync(shots, { recursive: true });
  work = mkdtempSync(join(tmpdir(), "chatd-web-"));
  bin = join(work, "chatd");
  loadtest = join(work, "loadtest");
  execFileSync("go", ["build", "-o", bin, "./cmd/chatd"], { cwd: root, stdio: "inherit" });
  execFileSync("go", ["build", "-o", loadtest, "./cmd/loadtest"], { cwd: root, stdio: "inherit" });
  const [mqtt, http, ws] = [await freePort(), await freePort(), await freePort()];
  const proc = spawn(bin, ["serve", "--dev", "--data-dir", join(work, "data"), "--listen", `127.0.0.1:${mqtt}`, "--http", `127.0.0.1:${http}`], {
    env: {
      ...process.env, CHATD_AUTH_SECRET: secret, CHATD_WEBSOCKET_LISTEN: `127.0.0.1:${ws}`,
      CHATD_WEB_DIR: join(web, "dist"), CHATD_QUEUE_MIN_FREE_BYTES: "1048576",
    },
    stdio: ["ignore", "ignore", "pipe"],
  });
  let log = "";
  proc.stderr.on("data", (b) => (log += b));
  server = { proc, mqtt, http, ws, log: () => log, base: `http://127.0.0.1:${http}/` };
  await until("chatd listening", async () => (await reachable(http)) && (await reachable(ws)));
  browser = await chromium.launch({
    executablePath: chromiumPath,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
      "--disable-component-update", "--disable-sync"],
  });
});

after(async () => {
  await browser?.close();
  if (server?.proc.exitCode === null) {
    const exited = new Promise((r) => server.proc.once("exit", r));
    server.proc.kill("SIGTERM");
    await exited;
  }
  rmSync(work, { recursive: true, force: true });
});

/** Opens the page in a fresh browser profile and signs user in. */
async function signIn(user, query = "") {
  const ctx = await browser.newContext({ viewport: { width: 1100, height: 700 } });
  const page = await ctx.newPage();
  page.on("pageerror", (err) => console.error(`${user}'s page: ${err}`));
  await page.goto(server.base + query);
  await page.fill("#signin-user", user);
  await page.click("#signin-button");
  await page.locator("#me").filter({ hasText: user }).waitFor();
  await page.locator("#conn.on").waitFor();
  return page;
}

async function openChat(page, peer) {
  const item = page.locator(`li[data-chat="u:${peer}"]`);
  if ((await item.count()) === 0) {
    await page.fill("#contact-name", peer);
    await page.press("#contact-name", "Enter");
  } else {
    await item.click();
  }
  await page.locator("#conv-title").filter({ hasText: peer }).waitFor();
}

async function say(page, text) {
  await page.fill("#text", text);
  await page.press("#text", "Enter");
  return page.locator("#messages li.mine", { hasText: text }).last();
}

const status = (bubble, s) => bubble.and(bubble.page().locator(`li[data-status="${s}"]`)).waitFor();

test("two people chat: ticks, typing, presence, and one going offline and coming back", async () => {
  const net = await proxy(server.ws);
  const alice = await signIn("alice");
  const bob = await signIn("bob", `?mqtt=${encodeURIComponent(net.url)}`);
  try {
    await openChat(bob, "alice");
    await openChat(alice, "bob");
    await alice.locator("#conv-status", { hasText: "online" }).waitFor();

    // Typing shows on the other side; a message gets its ticks: stored,
    // delivered, and read because bob has the chat open.
    await alice.type("#text", "hel");
    await bob.locator("#typing", { hasText: "alice is typing" }).waitFor();
    const hello = await say(alice, "hello bob");
    await bob.locator("#messages li", { hasText: "hello bob" }).waitFor();
    await status(hello, "read");
    await alice.screenshot({ path: join(shots, "chat-alice.png") });

    // Bob's network goes: his page says so, alice sees him offline, and
    // what alice sends is stored (one tick) but not delivered.
    net.cut();
    await bob.locator("#banner").waitFor({ state: "visible" });
    await alice.locator("#conv-status", { hasText: "last seen" }).waitFor();
    const waiting = await say(alice, "are you there?");
    await status(waiting, "sent");

    // Bob writes while offline (the clock tick), and reloads the page,
    // as an app restart: the message waits in IndexedDB.
    const tunnel = await say(bob, "in a tunnel");
    await status(tunnel, "pending");
    await bob.screenshot({ path: join(shots, "chat-bob-offline.png") });
    await bob.reload();
    await bob.locator("#banner").waitFor({ state: "visible" });
    await bob.locator('li[data-chat="u:alice"]').click();
    await status(bob.locator("#messages li.mine", { hasText: "in a tunnel" }), "pending");

    // Back online: the outbox drains and both sides catch up.
    net.restore();
    await bob.locator("#banner").waitFor({ state: "hidden" });
    await bob.locator("#messages li", { hasText: "are you there?" }).waitFor();
    await status(waiting, "read");
    await alice.locator("#messages li", { hasText: "in a tunnel" }).waitFor();
    await status(bob.locator("#messages li.mine", { hasText: "in a tunnel" }), "read");
    await alice.locator("#conv-status", { hasText: "online" }).waitFor();
    assert.equal(await alice.locator("#messages li", { hasText: "in a tunnel" }).count(), 1, "delivered once");
    await alice.screenshot({ path: join(shots, "chat.png") });
  } finally {
    await alice.context().close();
    await bob.context().close();
    await net.close();
  }
});

test("a group with a picture", async () => {
  const alice = await signIn("ann");
  const bob = await signIn("ben");
  const carol = await signIn("cid");
  try {
    await alice.fill("#group-id", "friends");
    await alice.fill("#group-members", "ben, cid");
    await alice.click("#new-group button");
    await alice.locator("#conv-title", { hasText: "# friends" }).waitFor();
    await say(alice, "hi all");
    // A 1x1 PNG.
    const png = Buffer.from("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==", "base64");
    await alice.setInputFiles("#file", { name: "dot.png", mimeType: "image/png", buffer: png });
    for (const p of [bob, carol]) {
      await p.locator('li[data-chat="g:friends"]').click();
      await p.locator("#messages li", { hasText: "hi all" }).waitFor();
      const img = p.locator("#messages li img");
      await img.waitFor();
      await until("the picture loaded", () => img.evaluate((el) => el.complete && el.naturalWidth === 1));
    }
    await status(alice.locator("#messages li.mine", { hasText: "hi all" }), "read");
  } finally {
    for (const p of [alice, bob, carol]) await p.context().close();
  }
});

test("one tab at a time has a user's chat", async () => {
  const first = await signIn("dan");
  const second = await first.context().newPage();
  try {
    await second.goto(server.base);
    await second.fill("#signin-user", "dan");
    await second.click("#signin-button");
    await second.locator("#other-tab", { hasText: "open in another tab" }).waitFor();
    await second.click("#use-here");
    await second.locator("#conn.on").waitFor();
    await first.locator("#other-tab").waitFor({ state: "visible" });
    await first.locator("#app").waitFor({ state: "hidden" });
  } finally {
    await first.context().close();
  }
});

test("the dashboard's charts move under load", async () => {
  const ctx = await browser.newContext({ viewport: { width: 1400, height: 900 } });
  const page = await ctx.newPage();
  try {
    await page.goto(server.base + "dashboard.html");
    const messages = page.locator('[data-chart="messages"]');
    await until("first points", async () => Number(await messages.getAttribute("data-points")) >= 2);
    const run = spawn(loadtest, ["run", "chat", "--broker", `tcp://127.0.0.1:${server.mqtt}`, "--users", "20",
      "--rate", "400", "--duration", "8s", "--grace", "3s", "--seed", "1", "-q"],
    { env: { ...process.env, CHATD_AUTH_SECRET: secret }, stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    run.stdout.on("data", (b) => (out += b));
    run.stderr.on("data", (b) => (out += b));
    const done = new Promise((r) => run.once("exit", r));
    for (const [chart, least] of [["messages", 100], ["connections", 10], ["latency", 0]]) {
      await until(`${chart} chart moves`, async () => Number(await page.locator(`[data-chart="${chart}"]`).getAttribute("data-max")) > least);
    }
    const code = await done;
    assert.equal(code, 0, `loadtest failed:\n${out}`);
    await page.screenshot({ path: join(shots, "dashboard.png") });
  } finally {
    await ctx.close();
  }
});
