// The chat page: one user on one device (this browser), on the TypeScript
// SDK. Conversations live in this browser only (the server keeps no
// history); what is sent waits in an IndexedDB outbox until the server
// stored it, across reloads and lost connections.
import { ChatApi, ChatClient, IndexedDBOutbox, newId, type ChatEvent } from "@chatd/client";

/** What /web/config.json says. */
interface Settings {
  websocket_port: number;
  websocket_tls: boolean;
  websocket_path: string;
  dev: boolean;
}

/** This tab's sign-in. */
interface Session {
  user: string;
  token: string;
  /** Unix seconds. */
  expires: number;
}

type Status = "pending" | "sent" | "delivered" | "read" | "refused";

/** One message shown in a conversation. */
interface Msg {
  id: string;
  from: string;
  mine: boolean;
  ts: number;
  text?: string;
  media?: string;
  status?: Status;
  reason?: string;
}

/** A conversation: with a user ("u:bob") or in a group ("g:team"). */
interface Chat {
  key: string;
  kind: "user" | "group";
  name: string;
  msgs: Msg[];
  unread: number;
}

const $ = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;
const rank: Record<Status, number> = { refused: 0, pending: 1, sent: 2, delivered: 3, read: 4 };
const ticks: Record<Status, string> = { pending: "🕓", sent: "✓", delivered: "✓✓", read: "✓✓", refused: "⚠" };
/** Messages kept per conversation in this browser. */
const keep = 200;

let settings: Settings;
let session: Session | undefined;
let client: ChatClient | undefined;
let api: ChatApi | undefined;
const chats = new Map<string, Chat>();
const presence = new Map<string, { online: boolean; lastSeen?: number }>();
const typingUntil = new Map<string, number>();
const mediaUrls = new Map<string, Promise<string>>();
let open: Chat | undefined;

function fatal(text: string): void {
  const f = $("fatal");
  f.textContent = text;
  f.hidden = false;
}

async function main(): Promise<void> {
  const res = await fetch("web/config.json");
  if (!res.ok) return fatal(`The server's page settings did not load (${res.status}).`);
  settings = (await res.json()) as Settings;
  const saved = sessionStorage.getItem("chatd:session");
  if (saved) {
    session = JSON.parse(saved) as Session;
    return start();
  }
  showSignIn();
}

function showSignIn(): void {
  $("signin").hidden = false;
  $("app").hidden = true;
  $("token-label").hidden = settings.dev;
  $("signin-note").textContent = settings.dev
    ? "Development mode (chatd serve --dev): any user name signs in, no password. Open a second browser window or profile to chat with yourself."
    : "Paste an access token your app's backend issued for this user (docs/PROTOCOL.md section 6).";
  $("signin-form").onsubmit = async (ev) => {
    ev.preventDefault();
    const user = $<HTMLInputElement>("signin-user").value.trim();
    $("signin-error").textContent = "";
    try {
      if (settings.dev) {
        session = await devToken(user);
      } else {
        const token = $<HTMLTextAreaElement>("signin-token").value.trim();
        session = { user, token, expires: Number.MAX_SAFE_INTEGER };
      }
    } catch (err) {
      $("signin-error").textContent = String(err);
      return;
    }
    sessionStorage.setItem("chatd:session", JSON.stringify(session));
    start();
  };
}

async function devToken(user: string): Promise<Session> {
  const res = await fetch("v1/dev/token", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ user }),
  });
  const body = (await res.json()) as { token?: string; expires_at?: number; reason?: string };
  if (!res.ok || !body.token) throw new Error(body.reason ?? `sign-in refused (${res.status})`);
  return { user, token: body.token, expires: body.expires_at ?? 0 };
}

/** The token for every connect and HTTP call: a fresh one near expiry in development mode. */
async function token(): Promise<string> {
  if (!session) throw new Error("signed out");
  if (settings.dev && session.expires - Date.now() / 1000 < 60) {
    session = await devToken(session.user);
    sessionStorage.setItem("chatd:session", JSON.stringify(session));
  }
  return session.token;
}

/** This browser's device name for user, kept across reloads. */
function deviceName(user: string): string {
  const k = `chatd:device:${user}`;
  let d = localStorage.getItem(k);
  if (!d) {
    d = `web-${newId().replace(/-/g, "").slice(0, 8)}`;
    localStorage.setItem(k, d);
  }
  return d;
}

function mqttUrl(): string | undefined {
  // ?mqtt=ws://host:port/mqtt points the page at another listener (a proxy,
  // a test), in development mode only: elsewhere a link could send the
  // user's token to any server.
  const forced = new URLSearchParams(location.search).get("mqtt");
  if (forced && settings.dev) return forced;
  if (!settings.websocket_port) return undefined;
  const scheme = settings.websocket_tls ? "wss" : "ws";
  return `${scheme}://${location.hostname}:${settings.websocket_port}${settings.websocket_path}`;
}

/**
 * Starts the chat in this tab, if no other tab of this browser has it for
 * the user: the tabs would share one device (its client ID, outbox and
 * history) and take its connection from each other. A Web Lock names the
 * tab that has it; another one offers to take it over.
 */
function start(): void {
  if (!session) return;
  const url = mqttUrl();
  if (!url) return fatal("This server has no MQTT-over-WebSocket listener: set websocket.listen (chatd serve --dev opens 127.0.0.1:8083).");
  const user = session.user;
  if (!("locks" in navigator)) {
    run(url, user);
    return;
  }
  const name = `chatd:${user}`;
  const hold = (lock: Lock | null) => {
    if (!lock) {
      otherTab(user);
      return;
    }
    $("other-tab").hidden = true;
    run(url, user);
    // Held while the page lives, or until another tab takes it over.
    return new Promise<void>(() => {});
  };
  const stolen = (err: unknown) => {
    if ((err as { name?: string }).name !== "AbortError") throw err;
    void client?.close();
    client = undefined;
    otherTab(user);
  };
  navigator.locks.request(name, { ifAvailable: true }, hold).catch(stolen);
  $("use-here").onclick = () => {
    navigator.locks.request(name, { steal: true }, hold).catch(stolen);
  };
}

/** Says that another tab has the chat of user, and offers to take it. */
function otherTab(user: string): void {
  $("app").hidden = true;
  $("signin").hidden = true;
  $("other-tab-user").textContent = user;
  $("other-tab").hidden = false;
}

/** Connects and shows the chat of user, at url. */
function run(url: string, user: string): void {
  const device = deviceName(user);
  $("signin").hidden = true;
  $("app").hidden = false;
  $("me").textContent = user;
  $("me").title = `${user}/${device}`;
  api = new ChatApi("", token);
  client = new ChatClient({ url, user, device, token, outbox: new IndexedDBOutbox(`chatd-outbox-${user}-${device}`) });
  chats.clear();
  load();
  client.on(onEvent);
  client.watchPresence(...[...chats.values()].filter((c) => c.kind === "user").map((c) => c.name));
  client.start();
  wire();
  render();
  if (!typingTimer) typingTimer = setInterval(renderTyping, 1000);
}

let typingTimer: ReturnType<typeof setInterval> | undefined;

function storageKey(): string {
  return `chatd:history:${session?.user}`;
}

function load(): void {
  const raw = localStorage.getItem(storageKey());
  if (!raw) return;
  for (const c of JSON.parse(raw) as Chat[]) chats.set(c.key, c);
}

let saving = false;
function save(): void {
  if (saving) return;
  saving = true;
  queueMicrotask(() => {
    saving = false;
    localStorage.setItem(storageKey(), JSON.stringify([...chats.values()]));
  });
}

function chatFor(kind: "user" | "group", name: string): Chat {
  const key = `${kind === "user" ? "u" : "g"}:${name}`;
  let c = chats.get(key);
  if (!c) {
    c = { key, kind, name, msgs: [], unread: 0 };
    chats.set(key, c);
    if (kind === "user") client?.watchPresence(name);
    save();
  }
  return c;
}

/** Finds a message of this user by id, in any conversation. */
function mine(id: string): Msg | undefined {
  for (const c of chats.values()) {
    const m = c.msgs.find((m) => m.mine && m.id === id);
    if (m) return m;
  }
  return undefined;
}

function setStatus(m: Msg | undefined, s: Status, reason?: string): void {
  if (!m || !m.status) return;
  if (s === "refused" || rank[s] > rank[m.status]) {
    m.status = s;
    m.reason = reason;
  }
}

function add(c: Chat, m: Msg): void {
  if (c.msgs.some((x) => x.id === m.id && x.from === m.from)) return;
  c.msgs.push(m);
  if (c.msgs.length > keep) c.msgs.splice(0, c.msgs.length - keep);
}

function onEvent(e: ChatEvent): void {
  switch (e.type) {
    case "online":
    case "offline":
      $("banner").hidden = e.type === "online";
      $("conn").classList.toggle("on", e.type === "online");
      return;
    case "message": {
      const text = typeof e.msg.text === "string" ? e.msg.text : undefined;
      const media = typeof e.msg.media === "string" ? e.msg.media : undefined;
      if (e.kind === "sent") {
        // A copy of what another device of this user sent.
        const c = e.group ? chatFor("group", e.group) : chatFor("user", e.to);
        add(c, { id: e.id, from: e.from, mine: true, ts: e.ts, text, media, status: "sent" });
        break;
      }
      const c = e.group ? chatFor("group", e.group) : chatFor("user", e.from);
      add(c, { id: e.id, from: e.from, mine: false, ts: e.ts, text, media });
      typingUntil.delete(e.from);
      if (c === open && document.visibilityState === "visible") {
        void client?.markRead(e.from, [e.id]);
      } else {
        c.unread++;
      }
      break;
    }
    case "stored":
      setStatus(mine(e.id), "sent");
      break;
    case "refused":
      setStatus(mine(e.id), "refused", e.code);
      break;
    case "error":
      setStatus(mine(e.ref), "refused", `${e.code}: ${e.reason}`);
      break;
    case "receipt":
      if (e.peer) {
        // Read on another device of this user.
        const c = chats.get(`u:${e.peer}`);
        if (c) c.unread = 0;
        break;
      }
      for (const id of e.ids) setStatus(mine(id), e.status);
      break;
    case "presence":
      presence.set(e.user, { online: e.online, lastSeen: e.lastSeen });
      break;
    case "typing":
      typingUntil.set(e.from, Date.now() + 4000);
      renderTyping();
      return;
  }
  save();
  render();
}

function wire(): void {
  $("signout").onclick = () => {
    sessionStorage.removeItem("chatd:session");
    void client?.close().then(() => location.reload());
  };
  $("add-contact").onsubmit = (ev) => {
    ev.preventDefault();
    const input = $<HTMLInputElement>("contact-name");
    const name = input.value.trim();
    if (!name || name === session?.user) return;
    input.value = "";
    select(chatFor("user", name));
  };
  $("new-group").onsubmit = async (ev) => {
    ev.preventDefault();
    const id = $<HTMLInputElement>("group-id").value.trim();
    const members = $<HTMLInputElement>("group-members").value.split(/[\s,]+/).filter(Boolean);
    $("side-error").textContent = "";
    try {
      await api!.createGroup(id, members);
    } catch (err) {
      $("side-error").textContent = String(err);
      return;
    }
    $<HTMLInputElement>("group-id").value = "";
    $<HTMLInputElement>("group-members").value = "";
    select(chatFor("group", id));
  };
  $("composer").onsubmit = (ev) => {
    ev.preventDefault();
    const input = $<HTMLInputElement>("text");
    const text = input.value.trim();
    if (!text || !open) return;
    input.value = "";
    send(open, { text });
  };
  $("text").oninput = () => {
    if (open?.kind === "user") client?.typing(open.name);
  };
  $("attach").onclick = () => $("file").click();
  $("file").onchange = async () => {
    const input = $<HTMLInputElement>("file");
    const f = input.files?.[0];
    input.value = "";
    if (!f || !open) return;
    const to = open;
    try {
      const up = await api!.upload(f, f.type || "application/octet-stream");
      send(to, { media: up.id, name: f.name });
    } catch (err) {
      $("side-error").textContent = `upload: ${err}`;
    }
  };
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible" && open) markOpenRead();
  });
}

function send(c: Chat, body: Record<string, unknown>): void {
  const id = newId();
  add(c, {
    id, from: session!.user, mine: true, ts: Date.now(), status: "pending",
    text: body.text as string | undefined, media: body.media as string | undefined,
  });
  save();
  render();
  const msg = { id, ...body };
  void (c.kind === "user" ? client!.send(c.name, msg) : client!.sendGroup(c.name, msg));
}

function select(c: Chat): void {
  open = c;
  markOpenRead();
  $("composer").hidden = false;
  render();
  $("text").focus();
}

/** Tells the senders of the open chat's unread messages that they are read. */
function markOpenRead(): void {
  if (!open) return;
  const unread = open.msgs.slice(open.msgs.length - open.unread).filter((m) => !m.mine);
  open.unread = 0;
  const bySender = new Map<string, string[]>();
  for (const m of unread) bySender.set(m.from, [...(bySender.get(m.from) ?? []), m.id]);
  for (const [from, ids] of bySender) void client?.markRead(from, ids);
  save();
}

function seen(user: string): string {
  const p = presence.get(user);
  if (!p) return "";
  if (p.online) return "online";
  if (!p.lastSeen) return "offline";
  const d = new Date(p.lastSeen);
  const today = d.toDateString() === new Date().toDateString();
  return `last seen ${today ? "" : d.toLocaleDateString() + " "}${d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })}`;
}

function render(): void {
  const list = $("chats");
  list.replaceChildren(
    ...[...chats.values()].map((c) => {
      const li = document.createElement("li");
      li.dataset.chat = c.key;
      li.classList.toggle("active", c === open);
      const name = document.createElement("span");
      name.textContent = c.kind === "group" ? `# ${c.name}` : c.name;
      const unread = document.createElement("span");
      unread.className = "unread";
      unread.textContent = c.unread ? String(c.unread) : "";
      const sub = document.createElement("span");
      sub.className = "sub";
      sub.textContent = c.kind === "user" ? seen(c.name) : "group";
      li.append(name, unread, sub);
      li.onclick = () => select(c);
      return li;
    }),
  );
  if (!open) return;
  $("conv-title").textContent = open.kind === "group" ? `# ${open.name}` : open.name;
  $("conv-status").textContent = open.kind === "user" ? seen(open.name) : "";
  const box = $("messages");
  const atEnd = box.scrollTop + box.clientHeight >= box.scrollHeight - 20;
  box.replaceChildren(...open.msgs.map((m) => bubble(open!, m)));
  if (atEnd) box.scrollTop = box.scrollHeight;
  renderTyping();
}

function bubble(c: Chat, m: Msg): HTMLLIElement {
  const li = document.createElement("li");
  li.dataset.id = m.id;
  if (m.mine) {
    li.classList.add("mine");
    li.dataset.status = m.status ?? "sent";
  }
  if (c.kind === "group" && !m.mine) {
    const from = document.createElement("div");
    from.className = "from";
    from.textContent = m.from;
    li.append(from);
  }
  if (m.media) {
    const img = document.createElement("img");
    img.alt = "picture";
    void mediaUrl(m.media).then((u) => (img.src = u), () => (img.alt = "picture not available"));
    li.append(img);
  }
  if (m.text) {
    const t = document.createElement("div");
    t.className = "text";
    t.textContent = m.text;
    li.append(t);
  }
  const meta = document.createElement("div");
  meta.className = "meta";
  meta.textContent = new Date(m.ts).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  if (m.mine && m.status) {
    const tick = document.createElement("span");
    tick.className = "tick";
    tick.textContent = ticks[m.status];
    tick.title = m.reason ?? m.status;
    meta.append(tick);
  }
  li.append(meta);
  return li;
}

function mediaUrl(id: string): Promise<string> {
  let u = mediaUrls.get(id);
  if (!u) {
    u = api!.download(id).then((b) => URL.createObjectURL(b));
    mediaUrls.set(id, u);
  }
  return u;
}

function renderTyping(): void {
  const now = Date.now();
  const who = open?.kind === "user" && (typingUntil.get(open.name) ?? 0) > now ? open.name : "";
  $("typing").textContent = who ? `${who} is typing…` : "";
}

main().catch((err) => fatal(`The page failed: ${err}`));
