// The SDK against a real chatd: the binary is built from this repository
// and started by the tests, on loopback.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync, spawn, type ChildProcess } from "node:child_process";
import { createHmac } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import { createConnection, createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ApiError, ChatApi, ChatClient, KeyValueOutbox, type ChatEvent } from "../src/index.js";

const secret = "sdk-test-secret-sdk-test-secret-0123";
const root = join(import.meta.dirname, "..", "..", "..", "..");
let work: string;
let bin: string;

before(() => {
  work = mkdtempSync(join(tmpdir(), "chatd-sdk-"));
  bin = join(work, "chatd");
  execFileSync("go", ["build", "-o", bin, "./cmd/chatd"], { cwd: root, stdio: "inherit" });
});

after(() => rmSync(work, { recursive: true, force: true }));

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
  });
}

async function until(what: string, f: () => boolean | Promise<boolean>, ms = 20_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await f())) {
    if (Date.now() > deadline) throw new Error(`${what}: not within ${ms} ms`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

function reachable(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const c = createConnection({ port, host: "127.0.0.1" }, () => {
      c.end();
      resolve(true);
    });
    c.on("error", () => resolve(false));
  });
}

/** A chatd process on a fixed port, which a restart keeps. */
class Server {
  private proc?: ChildProcess;
  constructor(readonly dir: string, readonly port: number, readonly httpPort: number) {}

  static async create(): Promise<Server> {
    const s = new Server(mkdtempSync(join(work, "data-")), await freePort(), await freePort());
    await s.start();
    return s;
  }

  get url(): string {
    return `mqtt://127.0.0.1:${this.port}`;
  }

  get httpUrl(): string {
    return `http://127.0.0.1:${this.httpPort}`;
  }

  async start(): Promise<void> {
    this.proc = spawn(bin, ["serve", "--data-dir", this.dir, "--listen", `127.0.0.1:${this.port}`, "--http", `127.0.0.1:${this.httpPort}`], {
      env: { ...process.env, CHATD_AUTH_SECRET: secret, CHATD_AUTH_LEEWAY: "0s", CHATD_QUEUE_MIN_FREE_BYTES: "1048576" },
      stdio: "ignore",
    });
    await until("chatd listening", async () => (await reachable(this.port)) && (await reachable(this.httpPort)));
  }

  async stop(): Promise<void> {
    const p = this.proc;
    if (!p || p.exitCode !== null) return;
    const exited = new Promise((r) => p.once("exit", r));
    p.kill("SIGTERM");
    await exited;
  }
}

function b64url(s: string): string {
  return Buffer.from(s).toString("base64url");
}

/** An HS256 token for user, valid for ttl seconds (PROTOCOL.md section 6). */
function mint(user: string, ttl: number): string {
  const now = Math.floor(Date.now() / 1000);
  const body = `${b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }))}.${b64url(JSON.stringify({ sub: user, iat: now, exp: now + ttl }))}`;
  return `${body}.${createHmac("sha256", secret).update(body).digest("base64url")}`;
}

/** Collects a client's events. */
function recorder(c: ChatClient): ChatEvent[] {
  const got: ChatEvent[] = [];
  c.on((e) => got.push(e));
  return got;
}

function client(s: Server, user: string, extra: Partial<ConstructorParameters<typeof ChatClient>[0]> = {}): ChatClient {
  const c = new ChatClient({ url: s.url, user, device: "phone", token: async () => mint(user, 3600), reconnectMs: 100, ...extra });
  c.start();
  return c;
}

test("send, receive once, and read", async () => {
  const s = await Server.create();
  const alice = client(s, "alice");
  const bob = client(s, "bob");
  const aliceGot = recorder(alice);
  const bobGot = recorder(bob);
  try {
    const id = await alice.send("bob", { text: "hi bob" });
    await until("stored", () => aliceGot.some((e) => e.type === "stored" && e.id === id));
    await until("bob's message", () => bobGot.some((e) => e.type === "message"));
    const m = bobGot.find((e) => e.type === "message");
    assert.ok(m && m.type === "message");
    assert.equal(m.from, "alice");
    assert.equal(m.id, id);
    assert.equal(m.msg.text, "hi bob");
    await bob.markRead("alice", [id]);
    await until("read receipt", () => aliceGot.some((e) => e.type === "receipt" && e.status === "read" && e.ids[0] === id));
  } finally {
    await alice.close();
    await bob.close();
    await s.stop();
  }
});

test("the outbox outlives a server restart and an app restart", async () => {
  const s = await Server.create();
  const bob = client(s, "bob");
  const bobGot = recorder(bob);
  const store = new Map<string, string>();
  const storage = { getItem: async (k: string) => store.get(k) ?? null, setItem: async (k: string, v: string) => void store.set(k, v) };
  let alice = client(s, "alice", { outbox: new KeyValueOutbox(storage) });
  try {
    await alice.send("bob", { id: "m-1", text: "before" });
    await until("m-1 delivered", () => bobGot.some((e) => e.type === "message" && e.id === "m-1"));
    await s.stop();
    for (const id of ["w-0", "w-1", "w-2"]) await alice.send("bob", { id, text: "while down" });
    assert.equal(await alice.pending(), 3);
    await alice.close(); // the app stops; its storage stays

    await s.start();
    alice = client(s, "alice", { outbox: new KeyValueOutbox(storage) });
    await until("all four delivered", () => bobGot.filter((e) => e.type === "message").length >= 4);
    await until("outbox empty", async () => (await alice.pending()) === 0);
    const ids = bobGot.flatMap((e) => (e.type === "message" ? [e.id] : []));
    assert.deepEqual(ids, ["m-1", "w-0", "w-1", "w-2"]);
  } finally {
    await alice.close();
    await bob.close();
    await s.stop();
  }
});

test("a token expiring mid-session is replaced", async () => {
  const s = await Server.create();
  const bob = client(s, "bob");
  const bobGot = recorder(bob);
  let calls = 0;
  const alice = client(s, "alice", { token: async () => (calls++, mint("alice", 2)) });
  try {
    await until("a second token asked for", () => calls >= 2);
    const id = await alice.send("bob", { text: "after a new token" });
    await until("delivered", () => bobGot.some((e) => e.type === "message" && e.id === id));
  } finally {
    await alice.close();
    await bob.close();
    await s.stop();
  }
});

test("presence, typing and a refusal told as an error event", async () => {
  const s = await Server.create();
  const alice = client(s, "alice", { protocolVersion: 4 });
  const aliceGot = recorder(alice);
  let bob = client(s, "bob");
  try {
    alice.watchPresence("bob");
    await until("bob online", () => aliceGot.some((e) => e.type === "presence" && e.user === "bob" && e.online));
    await until("bob connected", () => bob.connected);
    bob.typing("alice");
    bob.typing("alice"); // throttled: one signal
    await until("typing", () => aliceGot.some((e) => e.type === "typing" && e.from === "bob"));
    await bob.close();
    await until("bob offline", () => aliceGot.some((e) => e.type === "presence" && e.user === "bob" && !e.online && Math.abs(Date.now() - (e.lastSeen ?? 0)) < 60_000));
    assert.equal(aliceGot.filter((e) => e.type === "typing").length, 1);

    // MQTT 3.1.1 has no negative PUBACK: the refusal comes as an error event.
    const id = await alice.sendGroup("no-such-group", { text: "hello?" });
    await until("error event", () => aliceGot.some((e) => e.type === "error" && e.ref === id));
    const err = aliceGot.find((e) => e.type === "error");
    assert.ok(err && err.type === "error");
    assert.equal(err.code, "unknown_group");

    // Presence is watched again after a reconnect.
    bob = client(s, "bob");
    await until("bob online again", () => aliceGot.filter((e) => e.type === "presence" && e.online).length >= 2);
  } finally {
    await alice.close();
    await bob.close();
    await s.stop();
  }
});

test("groups, media and devices over HTTP", async () => {
  const s = await Server.create();
  const api = new ChatApi(s.httpUrl, async () => mint("alice", 3600));
  const alice = client(s, "alice");
  const bob = client(s, "bob");
  const carol = client(s, "carol");
  const bobGot = recorder(bob);
  const carolGot = recorder(carol);
  try {
    const g = await api.createGroup("team", ["bob", "carol"]);
    assert.deepEqual([...g.members].sort(), ["alice", "bob", "carol"]);
    assert.deepEqual(g.admins, ["alice"]);

    const file = new TextEncoder().encode("a picture's bytes");
    const up = await api.upload(file, "image/png");
    assert.equal(up.size, file.length);
    const id = await alice.sendGroup("team", { text: "look", media: up.id });
    for (const got of [bobGot, carolGot]) {
      await until("group message", () => got.some((e) => e.type === "message" && e.id === id));
      const m = got.find((e) => e.type === "message");
      assert.ok(m && m.type === "message");
      assert.equal(m.group, "team");
      assert.equal(m.msg.media, up.id);
    }
    const bobApi = new ChatApi(s.httpUrl, async () => mint("bob", 3600));
    const blob = await bobApi.download(up.id);
    assert.equal(blob.type, "image/png");
    assert.equal(await blob.text(), "a picture's bytes");

    const devices = await api.devices();
    assert.deepEqual(devices.map((d) => d.client_id), ["alice/phone"]);
    assert.equal(devices[0].online, true);

    await assert.rejects(api.group("no-such-group"), (e: unknown) => e instanceof ApiError && e.status === 404);
    await assert.rejects(new ChatApi(s.httpUrl, async () => "not-a-token").devices(), (e: unknown) => e instanceof ApiError && e.code === "not_authorized");
  } finally {
    await alice.close();
    await bob.close();
    await carol.close();
    await s.stop();
  }
});
