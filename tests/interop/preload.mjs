// Loaded into every OpenClaw process of the interop suite with `node --import` (NODE_OPTIONS).
//
// - Qwen's hosts (chat.qwen.ai: OAuth; portal.qwen.ai: the model API) are sent to the fake Qwen
//   server named by QWEN_INTEROP_FAKE_URL (http://127.0.0.1:PORT), path and query kept.
//   The fake answers OAuth and chat completions (streamed when asked), and records the bearer
//   token each chat request carried.
// - Every other connection that does not go to a loopback address is refused before any packet is
//   sent: global fetch, net/tls sockets (which also covers undici, ws, http, https), DNS lookups
//   and UDP. Each redirect and refusal is appended to QWEN_INTEROP_NET_LOG (JSON lines) so a test
//   can prove that nothing left the machine.
import dgram from "node:dgram";
import dns from "node:dns";
import fs from "node:fs";
import net from "node:net";

const FAKE = (process.env.QWEN_INTEROP_FAKE_URL ?? "").replace(/\/+$/, "");
const LOG = process.env.QWEN_INTEROP_NET_LOG ?? "";
const REDIRECTED = new Set(["chat.qwen.ai", "portal.qwen.ai"]);

function record(entry) {
  if (!LOG) return;
  try {
    fs.appendFileSync(LOG, `${JSON.stringify({ pid: process.pid, ...entry })}\n`);
  } catch {
    // The log is a diagnostic; never let it change OpenClaw's behaviour.
  }
}

function isLoopbackHost(host) {
  if (host === undefined || host === null || host === "") return true; // Node's default: localhost
  const h = String(host).toLowerCase().replace(/^\[|\]$/g, "");
  return (
    h === "localhost" ||
    h === "::1" ||
    h === "0:0:0:0:0:0:0:1" ||
    /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(h) ||
    /^::ffff:127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(h)
  );
}

function refusal(what, host) {
  record({ event: "refused", what, host: String(host) });
  const err = new Error(`interop preload: refused ${what} to non-loopback host ${host}`);
  err.code = "ECONNREFUSED";
  return err;
}

// --- fetch ------------------------------------------------------------------------------------

const realFetch = globalThis.fetch.bind(globalThis);

function requestUrl(input) {
  if (input instanceof Request) return new URL(input.url);
  return new URL(input instanceof URL ? input.href : String(input));
}

async function interopFetch(input, init) {
  let url;
  try {
    url = requestUrl(input);
  } catch {
    return realFetch(input, init);
  }
  if (url.protocol === "data:" || url.protocol === "blob:" || url.protocol === "file:") {
    return realFetch(input, init);
  }
  if (REDIRECTED.has(url.hostname)) {
    if (!FAKE) throw new TypeError("fetch failed", { cause: refusal("fetch (no fake server)", url.hostname) });
    const target = `${FAKE}${url.pathname}${url.search}`;
    record({ event: "redirected", method: init?.method ?? (input instanceof Request ? input.method : "GET"), from: `${url.origin}${url.pathname}`, to: target });
    return input instanceof Request ? realFetch(new Request(target, input), init) : realFetch(target, init);
  }
  if (!isLoopbackHost(url.hostname)) {
    throw new TypeError("fetch failed", { cause: refusal("fetch", url.hostname) });
  }
  return realFetch(input, init);
}

globalThis.fetch = interopFetch;

// --- sockets ----------------------------------------------------------------------------------

const realConnect = net.Socket.prototype.connect;
net.Socket.prototype.connect = function guardedConnect(...args) {
  let first = args[0];
  if (Array.isArray(first)) first = first[0]; // Node's internal normalized form
  let host;
  let path;
  if (first !== null && typeof first === "object") {
    host = first.host;
    path = first.path;
  } else if (typeof first === "string" && !/^\d+$/.test(first)) {
    path = first;
  } else if (typeof args[1] === "string") {
    host = args[1];
  }
  if (!path && !isLoopbackHost(host)) {
    const err = refusal("socket connect", host);
    process.nextTick(() => this.destroy(err));
    return this;
  }
  return realConnect.apply(this, args);
};

// --- DNS and UDP ------------------------------------------------------------------------------

function guardCallbackStyle(owner, name) {
  const real = owner[name];
  if (typeof real !== "function") return;
  owner[name] = function guarded(hostname, ...rest) {
    if (!isLoopbackHost(hostname)) {
      const callback = rest.findLast((arg) => typeof arg === "function");
      const err = refusal(`dns.${name}`, hostname);
      err.code = "ENOTFOUND";
      if (callback) {
        process.nextTick(() => callback(err));
        return undefined;
      }
      throw err;
    }
    return real.call(this, hostname, ...rest);
  };
}

function guardPromiseStyle(owner, name) {
  const real = owner[name];
  if (typeof real !== "function") return;
  owner[name] = async function guarded(hostname, ...rest) {
    if (!isLoopbackHost(hostname)) {
      const err = refusal(`dns.promises.${name}`, hostname);
      err.code = "ENOTFOUND";
      throw err;
    }
    return real.call(this, hostname, ...rest);
  };
}

const dnsNames = ["lookup", "resolve", "resolve4", "resolve6", "resolveAny", "resolveCname",
  "resolveMx", "resolveNs", "resolveSrv", "resolveTxt"];
for (const name of dnsNames) {
  guardCallbackStyle(dns, name);
  guardPromiseStyle(dns.promises, name);
}

const realSend = dgram.Socket.prototype.send;
dgram.Socket.prototype.send = function guardedSend(...args) {
  const address = args.find((arg, i) => i > 0 && typeof arg === "string");
  if (address !== undefined && !isLoopbackHost(address)) {
    const err = refusal("udp send", address);
    const callback = args.findLast((arg) => typeof arg === "function");
    if (callback) process.nextTick(() => callback(err));
    return;
  }
  return realSend.apply(this, args);
};
