// The chat page: keeps the conversation here (and in localStorage, so a reload keeps it), sends it to
// /v1/chat/completions with stream=true, and renders the server-sent events as they arrive. No build
// step; replies are rendered as Markdown with the vendored marked + DOMPurify (static/vendor/).
"use strict";

const $ = (id) => document.getElementById(id);
const el = {
  model: $("model"), system: $("system"), temperature: $("temperature"), temperatureValue: $("temperature-value"),
  maxTokens: $("max-tokens"), apiKey: $("api-key"), newChat: $("new-chat"), messages: $("messages"),
  stats: $("stats"), composer: $("composer"), input: $("input"), send: $("send"), stop: $("stop"),
  settingsToggle: $("settings-toggle"),
};
const SETTINGS = ["system", "temperature", "maxTokens", "apiKey"];
const CONVERSATION_KEY = "torchchat.conversation";

// [{role, content, tokens, dropped}] of finished turns. `tokens`: what the message took in the prompt,
// from the server's usage (null until known); `dropped`: no longer sent, to fit the context.
let history = [];
let controller = null;   // AbortController of the request in flight
let modelId = null;
let contextLength = null;
let charsPerToken = 3;   // refined from each reply's usage; only used to estimate before sending

// Markdown -> safe HTML. Raw HTML in a reply is shown as text, never parsed (the model's output is not
// trusted), and DOMPurify cleans what marked produced. The whitespace between and after blocks is
// kept as text, so the bubble's text is exactly the reply's.
const escapeHtml = (s) => s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
marked.use({
  gfm: true,
  renderer: {
    html({ text }) { return escapeHtml(text); },
    space({ raw }) { return raw; },
    paragraph({ tokens, raw }) { return `<p>${this.parser.parseInline(tokens)}</p>${raw.match(/\s*$/)[0]}`; },
  },
});

function renderMarkdown(text) {
  return DOMPurify.sanitize(marked.parse(text), { FORBID_TAGS: ["style", "form", "input"], FORBID_ATTR: ["style"] });
}

function setReply(div, text) {
  const md = document.createElement("div");
  md.className = "md";
  md.innerHTML = renderMarkdown(text);
  div.replaceChildren(md);
}

function saveConversation() {
  const saved = history.map(({ role, content, tokens, dropped }) => ({ role, content, tokens, dropped }));
  localStorage.setItem(CONVERSATION_KEY, JSON.stringify({ history: saved, charsPerToken }));
}

function restoreConversation() {
  try {
    const saved = JSON.parse(localStorage.getItem(CONVERSATION_KEY) || "null");
    if (!saved || !Array.isArray(saved.history)) return;
    history = saved.history.filter((m) => m && typeof m.content === "string" && ["user", "assistant"].includes(m.role));
    charsPerToken = Number(saved.charsPerToken) || charsPerToken;
  } catch {
    history = [];
  }
  for (const m of history) {
    const div = bubble(m.role, m.role === "user" ? m.content : "");
    if (m.role === "assistant") setReply(div, m.content);
    if (m.dropped) div.classList.add("dropped");
    m.el = div;
  }
}

function headers() {
  const h = { "Content-Type": "application/json" };
  if (el.apiKey.value) h["Authorization"] = `Bearer ${el.apiKey.value}`;
  return h;
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  div.textContent = text;
  el.messages.appendChild(div);
  el.messages.scrollTop = el.messages.scrollHeight;
  return div;
}

const active = () => history.filter((m) => !m.dropped);
const estimate = (msgs) => msgs.reduce((n, m) => n + (m.tokens ?? Math.ceil(m.content.length / charsPerToken) + 4), 0);

// Forget the oldest exchange still sent (a user message and its reply), as the terminal chat forgets
// earlier turns when the context fills; its bubbles stay, faded. Returns false when nothing is left to drop.
function dropOldest() {
  const sent = active();
  if (sent.length <= 1) return false;
  const n = sent[0].role === "user" && sent[1].role === "assistant" && sent.length > 2 ? 2 : 1;
  for (const m of sent.slice(0, n)) {
    m.dropped = true;
    m.el?.classList.add("dropped");
  }
  if (!el.messages.querySelector(".msg.note")) {
    const note = bubble("note", "Earlier turns no longer fit the model's context: the oldest are dropped " +
      "(faded), and the model no longer sees them. New chat starts afresh.");
    note.classList.add("muted");
  }
  return true;
}

// Drop the oldest turns until the conversation leaves room for a reply: the smaller of Max tokens and
// half the context, as the terminal chat reserves.
function fitContext() {
  if (!contextLength) return;
  const reserve = Math.min(Number(el.maxTokens.value) || contextLength, Math.floor(contextLength / 2));
  while (estimate(active()) + reserve > contextLength && dropOldest()) { /* drop until it fits */ }
}

// What the usage of a finished request says about the messages' sizes.
function learnTokens(usage, sentMessages) {
  if (!usage) return;
  const user = sentMessages[sentMessages.length - 1];
  const before = estimate(sentMessages.slice(0, -1).filter((m) => m.tokens != null));
  if (sentMessages.slice(0, -1).every((m) => m.tokens != null)) {
    user.tokens = Math.max(1, usage.prompt_tokens - before);
    if (user.content.length > 20) charsPerToken = Math.max(1, user.content.length / user.tokens);
  }
}

function busy(on) {
  el.send.disabled = on;
  el.stop.disabled = !on;
}

// Parses one server-sent event ("data: {...}"); returns the JSON, or null for "[DONE]".
function parseEvent(block) {
  const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
  if (!data || data === "[DONE]") return null;
  const obj = JSON.parse(data);
  if (obj.error) throw new Error(obj.error.message);
  return obj;
}

async function errorDetail(resp) {
  try {
    const body = await resp.json();
    return { message: body.error?.message || resp.statusText, code: body.error?.code };
  } catch {
    return { message: `${resp.status} ${resp.statusText}`, code: null };
  }
}

class ContextFull extends Error {}

async function send(text) {
  const user = { role: "user", content: text, tokens: null };
  user.el = bubble("user", text);
  history.push(user);
  fitContext();
  const out = bubble("assistant streaming", "");
  controller = new AbortController();
  busy(true);
  el.stats.textContent = "…";
  const t0 = performance.now();
  let tFirst = null, deltas = 0, usage = null, finish = null, reply = "", sent = [];
  try {
    for (;;) {
      sent = active();
      try {
        ({ usage, finish, reply, tFirst, deltas } = await stream(sent, out));
        break;
      } catch (e) {
        // The server counts tokens exactly: when our estimate was short, drop another turn and retry.
        if (!(e instanceof ContextFull)) throw e;
        if (!dropOldest()) {
          throw new Error(`${e.message} This message does not fit even without the earlier turns: ` +
                          "shorten it, or start a New chat.");
        }
      }
    }
  } catch (e) {
    if (e.partial) ({ usage, finish, reply, tFirst, deltas } = e.partial);  // the text before a mid-stream error stays
    if (e.name === "AbortError") finish = "stopped";
    else bubble("error", `Error: ${e.message}`);
  } finally {
    if (reply) setReply(out, reply);
    else out.remove();  // no empty reply bubble
    out.classList.remove("streaming");
    controller = null;
    busy(false);
  }
  if (reply) {
    learnTokens(usage, sent);
    history.push({ role: "assistant", content: reply, tokens: usage ? usage.completion_tokens : null, el: out });
  } else if (finish !== "stopped") {
    history.splice(history.indexOf(user), 1);
  }
  saveConversation();
  showStats(t0, tFirst, performance.now(), usage, deltas, finish);
}

// One request with `messages`; streams the reply's text into `out`. Throws ContextFull when the server
// says the prompt is longer than the context.
async function stream(messages, out) {
  const wire = messages.map(({ role, content }) => ({ role, content }));
  const system = el.system.value.trim();
  const body = {
    model: modelId, messages: system ? [{ role: "system", content: system }, ...wire] : wire, stream: true,
    stream_options: { include_usage: true },
    temperature: Number(el.temperature.value), max_tokens: Number(el.maxTokens.value) || undefined,
  };
  const resp = await fetch("/v1/chat/completions", {
    method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
  });
  if (!resp.ok) {
    const { message, code } = await errorDetail(resp);
    throw code === "context_length_exceeded" ? new ContextFull(message) : new Error(message);
  }
  let tFirst = null, deltas = 0, usage = null, finish = null, reply = "";
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const chunk = parseEvent(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
        if (!chunk) continue;
        if (chunk.usage) usage = chunk.usage;
        const choice = chunk.choices[0];
        if (!choice) continue;
        if (choice.delta?.content) {
          tFirst ??= performance.now();
          deltas += 1;
          reply += choice.delta.content;
          out.textContent = reply;  // plain text while it streams; Markdown once it is complete
          el.messages.scrollTop = el.messages.scrollHeight;
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
  } catch (e) {
    // Stopped or broken mid-reply: what arrived is kept.
    e.partial = { usage, finish, reply, tFirst, deltas };
    if (reply && e.name === "AbortError") return { ...e.partial, finish: "stopped" };
    throw e;
  }
  return { usage, finish, reply, tFirst, deltas };
}

function showStats(t0, tFirst, tEnd, usage, deltas, finish) {
  if (tFirst === null) {
    el.stats.textContent = finish ? `no text (${finish})` : "";
    return;
  }
  // With usage the server's token count is exact; after Stop there is none, and each text delta is
  // about one token.
  const tokens = usage ? usage.completion_tokens : deltas;
  const seconds = (tEnd - t0) / 1000;
  const decode = (tEnd - tFirst) / 1000;
  const rate = tokens > 1 && decode > 0 ? (tokens - 1) / decode : tokens / seconds;
  el.stats.textContent = `${usage ? "" : "~"}${tokens} tokens in ${seconds.toFixed(2)} s · ` +
    `${rate.toFixed(1)} tokens/s · first token after ${((tFirst - t0) / 1000).toFixed(2)} s · ${finish}`;
}

function saveSettings() {
  for (const k of SETTINGS) localStorage.setItem(`torchchat.${k}`, el[k].value);
}

function loadSettings() {
  for (const k of SETTINGS) {
    const v = localStorage.getItem(`torchchat.${k}`);
    if (v !== null) el[k].value = v;
  }
  el.temperatureValue.textContent = el.temperature.value;
}

async function loadModel() {
  try {
    const resp = await fetch("/health");
    const info = await resp.json();
    modelId = info.model;
    contextLength = info.context_length;
    el.model.textContent = `${info.model} · context ${info.context_length} tokens`;
    el.maxTokens.max = info.context_length;
  } catch (e) {
    el.model.textContent = `server unreachable: ${e.message}`;
  }
}

el.composer.addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = el.input.value.trim();
  if (!text || controller) return;
  el.input.value = "";
  send(text);
});
el.input.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) {
    ev.preventDefault();
    el.composer.requestSubmit();
  }
});
el.stop.addEventListener("click", () => controller?.abort());
el.newChat.addEventListener("click", () => {
  controller?.abort();
  history = [];
  el.messages.replaceChildren();
  el.stats.textContent = "";
  localStorage.removeItem(CONVERSATION_KEY);
});
el.settingsToggle.addEventListener("click", () => {
  const open = document.body.classList.toggle("show-settings");
  el.settingsToggle.setAttribute("aria-expanded", String(open));
});
el.temperature.addEventListener("input", () => { el.temperatureValue.textContent = el.temperature.value; });
for (const k of SETTINGS) el[k].addEventListener("change", saveSettings);

loadSettings();
restoreConversation();
loadModel();
