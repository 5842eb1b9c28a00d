// The chat page: keeps the conversation here, sends it to /v1/chat/completions with stream=true, and
// renders the server-sent events as they arrive. No build step, no dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const el = {
  model: $("model"), system: $("system"), temperature: $("temperature"), temperatureValue: $("temperature-value"),
  maxTokens: $("max-tokens"), apiKey: $("api-key"), newChat: $("new-chat"), messages: $("messages"),
  stats: $("stats"), composer: $("composer"), input: $("input"), send: $("send"), stop: $("stop"),
};
const SETTINGS = ["system", "temperature", "maxTokens", "apiKey"];

let history = [];        // [{role, content}] of finished turns
let controller = null;   // AbortController of the request in flight
let modelId = null;

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

async function errorMessage(resp) {
  try {
    const body = await resp.json();
    return body.error?.message || resp.statusText;
  } catch {
    return `${resp.status} ${resp.statusText}`;
  }
}

async function send(text) {
  history.push({ role: "user", content: text });
  bubble("user", text);
  const out = bubble("assistant streaming", "");
  const messages = el.system.value.trim() ? [{ role: "system", content: el.system.value.trim() }, ...history] : history;
  const body = {
    model: modelId, messages, stream: true, stream_options: { include_usage: true },
    temperature: Number(el.temperature.value), max_tokens: Number(el.maxTokens.value) || undefined,
  };
  controller = new AbortController();
  busy(true);
  el.stats.textContent = "…";
  const t0 = performance.now();
  let tFirst = null, deltas = 0, usage = null, finish = null, reply = "";
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!resp.ok) throw new Error(await errorMessage(resp));
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
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
          out.textContent = reply;
          el.messages.scrollTop = el.messages.scrollHeight;
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
  } catch (e) {
    if (e.name === "AbortError") finish = "stopped";
    else bubble("error", `Error: ${e.message}`);
  } finally {
    out.classList.remove("streaming");
    controller = null;
    busy(false);
  }
  if (reply) history.push({ role: "assistant", content: reply });
  else if (finish !== "stopped") history.pop();
  showStats(t0, tFirst, performance.now(), usage, deltas, finish);
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
});
el.temperature.addEventListener("input", () => { el.temperatureValue.textContent = el.temperature.value; });
for (const k of SETTINGS) el[k].addEventListener("change", saveSettings);

loadSettings();
loadModel();
