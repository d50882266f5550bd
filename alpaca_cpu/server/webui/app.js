// alpaca-server's chat page: plain JavaScript, no build step, nothing loaded from elsewhere.
// It talks to the server's own /v1/models and /v1/chat/completions (streamed, with usage);
// conversations live in localStorage, the API key (if the server wants one) in sessionStorage.
"use strict";

// ---- Markdown, safely: everything is HTML-escaped first; the renderer only wraps escaped
// text in a fixed set of tags, so nothing the model writes can become markup or script. ------

function escapeHtml(text) {
  return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
    .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
}

// Inline spans of one escaped line: `code`, **bold**, *italic*, [text](http(s) link).
function renderInline(escaped) {
  return escaped.split(/(`[^`]+`)/).map((part, i) => {
    if (i % 2 === 1) return "<code>" + part.slice(1, -1) + "</code>";
    return part
      .replace(/\[([^\]]+)\]\((https?:\/\/[^\s()]+)\)/g,
        '<a href="$2" target="_blank" rel="noopener noreferrer">$1</a>')
      .replace(/\*\*(\S(?:.*?\S)?)\*\*/g, "<strong>$1</strong>")
      .replace(/(^|[^\w])__(\S(?:.*?\S)?)__(?!\w)/g, "$1<strong>$2</strong>")
      .replace(/(^|[^*\w])\*(\S(?:[^*]*?\S)?)\*(?!\w)/g, "$1<em>$2</em>");
  }).join("");
}

function codeBlock(lang, escapedBody) {
  const label = lang ? '<span class="lang">' + lang + "</span>" : "";
  return '<div class="codeblock">' + label +
    '<button class="copy" type="button">Copy</button><pre><code>' + escapedBody +
    "</code></pre></div>";
}

// Markdown (the common subset models write) to HTML. An unclosed ``` fence, as while an
// answer streams in, runs to the end of the text.
function renderMarkdown(source) {
  const lines = escapeHtml(source).split("\n");
  const out = [];
  let para = [];
  let list = null; // {tag: "ul" | "ol", items: [html]}
  let quote = [];
  const flush = () => {
    if (para.length) out.push("<p>" + para.map(renderInline).join("<br>") + "</p>");
    if (list) out.push("<" + list.tag + ">" + list.items.map((x) => "<li>" + x + "</li>").join("") +
      "</" + list.tag + ">");
    if (quote.length) out.push("<blockquote>" + quote.map(renderInline).join("<br>") + "</blockquote>");
    para = []; list = null; quote = [];
  };
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    let m;
    if ((m = line.match(/^\s*(```|~~~)\s*([\w+#.-]*)\s*$/))) {
      flush();
      const body = [];
      for (i++; i < lines.length && !/^\s*(```|~~~)\s*$/.test(lines[i]); i++) body.push(lines[i]);
      out.push(codeBlock(m[2], body.join("\n")));
    } else if ((m = line.match(/^(#{1,6})\s+(.*)$/))) {
      flush();
      const n = m[1].length;
      out.push("<h" + n + ">" + renderInline(m[2]) + "</h" + n + ">");
    } else if (/^\s*([-*_])(\s*\1){2,}\s*$/.test(line)) {
      flush();
      out.push("<hr>");
    } else if ((m = line.match(/^\s*(?:[-*+]|(\d+)[.)])\s+(.*)$/))) {
      const tag = m[1] === undefined ? "ul" : "ol";
      if (!list || list.tag !== tag) { flush(); list = { tag, items: [] }; }
      list.items.push(renderInline(m[2]));
    } else if ((m = line.match(/^&gt;\s?(.*)$/))) {
      if (!quote.length) flush();
      quote.push(m[1]);
    } else if (!line.trim()) {
      flush();
    } else if (list && /^\s+\S/.test(line)) {
      list.items[list.items.length - 1] += "<br>" + renderInline(line.trim());
    } else {
      if (list || quote.length) flush();
      para.push(line);
    }
  }
  flush();
  return out.join("\n");
}

// ---- the page ---------------------------------------------------------------------------

const STORE = "alpaca.conversations";
const SETTINGS = "alpaca.settings";
const KEY = "alpaca.apiKey";
const $ = (id) => document.getElementById(id);

let conversations = loadConversations();
let current = null; // the conversation shown; null: a new one, not yet saved
let model = null; // the server's model id, from /v1/models
let running = null; // {controller, conversation} while an answer streams in

function loadConversations() {
  try {
    const all = JSON.parse(localStorage.getItem(STORE) || "[]");
    if (!Array.isArray(all)) return [];
    return all.filter((c) => c && typeof c.id === "string" && Array.isArray(c.messages))
      .map((c) => ({ ...c, title: String(c.title || "Conversation"),
        messages: c.messages.filter((m) => m && typeof m.content === "string" &&
          (m.role === "user" || m.role === "assistant")) }));
  } catch (e) {
    return [];
  }
}

function saveConversations() {
  try {
    localStorage.setItem(STORE, JSON.stringify(conversations));
  } catch (e) {
    showError("This browser did not keep the conversation (" + e.message + ").");
  }
}

function loadSettings() {
  let s = {};
  try { s = JSON.parse(localStorage.getItem(SETTINGS) || "{}") || {}; } catch (e) { s = {}; }
  if (typeof s.system === "string") $("system-prompt").value = s.system;
  if (s.temperature !== undefined) $("temperature").value = s.temperature;
  if (s.maxTokens !== undefined) $("max-tokens").value = s.maxTokens;
}

function saveSettings() {
  localStorage.setItem(SETTINGS, JSON.stringify({ system: $("system-prompt").value,
    temperature: $("temperature").value, maxTokens: $("max-tokens").value }));
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = false;
}

function hideError() {
  $("error").hidden = true;
}

// ---- rendering ----------------------------------------------------------------------------

function renderSidebar() {
  const ul = $("conversations");
  ul.replaceChildren();
  for (const c of [...conversations].sort((a, b) => b.updated - a.updated)) {
    const li = document.createElement("li");
    li.dataset.id = c.id;
    if (current && current.id === c.id) li.className = "current";
    const open = document.createElement("button");
    open.type = "button";
    open.className = "open";
    open.textContent = c.title;
    open.title = c.title;
    open.addEventListener("click", () => openConversation(c));
    const del = document.createElement("button");
    del.type = "button";
    del.className = "delete";
    del.textContent = "\u00d7";
    del.title = "Delete this conversation";
    del.setAttribute("aria-label", "Delete conversation: " + c.title);
    del.addEventListener("click", () => deleteConversation(c));
    li.append(open, del);
    ul.append(li);
  }
}

function statsLine(s) {
  const parts = [s.tokens + " tokens"];
  if (s.tokensPerSecond !== null) parts.push(s.tokensPerSecond.toFixed(1) + " tokens/s");
  if (s.firstTokenMs !== null) parts.push("first token " + Math.round(s.firstTokenMs) + " ms");
  return parts.join(" \u00b7 ");
}

function messageView(message) {
  const div = document.createElement("div");
  div.className = "msg " + message.role;
  const body = document.createElement("div");
  body.className = "body";
  div.append(body);
  fillMessage(div, message);
  return div;
}

function fillMessage(div, message) {
  const body = div.querySelector(".body");
  if (message.role === "user") body.textContent = message.content;
  else body.innerHTML = renderMarkdown(message.content);
  div.querySelectorAll(".stats, .note").forEach((x) => x.remove());
  if (message.note) {
    const note = document.createElement("div");
    note.className = "note";
    note.textContent = message.note;
    div.append(note);
  }
  if (message.stats) {
    const stats = document.createElement("div");
    stats.className = "stats";
    stats.textContent = statsLine(message.stats);
    div.append(stats);
  }
}

function renderConversation() {
  const box = $("messages");
  box.replaceChildren();
  if (!current || !current.messages.length) {
    const empty = document.createElement("p");
    empty.className = "empty";
    empty.textContent = "Ask anything. Conversations are kept in this browser.";
    box.append(empty);
    return;
  }
  for (const m of current.messages) box.append(messageView(m));
  box.scrollTop = box.scrollHeight;
}

function openConversation(c) {
  if (running) running.controller.abort();
  current = c;
  hideError();
  document.body.classList.remove("drawer");
  renderSidebar();
  renderConversation();
  $("prompt").focus();
}

function newChat() {
  if (running) running.controller.abort();
  current = null;
  hideError();
  document.body.classList.remove("drawer");
  renderSidebar();
  renderConversation();
  $("prompt").focus();
}

function deleteConversation(c) {
  if (running && running.conversation === c) running.controller.abort();
  conversations = conversations.filter((x) => x !== c);
  saveConversations();
  if (current === c) current = null;
  renderSidebar();
  renderConversation();
}

// ---- the server -------------------------------------------------------------------------

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem(KEY);
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

// A readable sentence for an error answer (OpenAI's {"error": {message, code, ...}} shape).
function describeError(status, error, retryAfter) {
  const detail = (error && error.message) || "";
  if (status === 401) return "The server refused the API key.";
  if (status === 503) {
    return "The server is busy: every slot is answering someone and the queue is full. " +
      "Try again " + (retryAfter ? "in " + retryAfter + " s." : "in a moment.");
  }
  if (error && error.code === "context_length_exceeded") {
    return "The conversation no longer fits in the model's context (" + detail + "). " +
      "Start a new chat or shorten the system prompt.";
  }
  if (status === 413) return "The conversation is larger than the server accepts (" + detail + ").";
  if (status === 0) return detail;
  return "The server answered " + status + (detail ? ": " + detail : ".");
}

class ServerError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function errorOf(response) {
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  const text = describeError(response.status, body && body.error,
    response.headers.get("Retry-After"));
  return new ServerError(response.status, text);
}

// Asks for the key in a dialog; resolves to true when one was given.
function askKey(reason) {
  return new Promise((resolve) => {
    const dialog = $("key-dialog");
    $("key-reason").textContent = reason;
    $("api-key").value = "";
    const done = () => {
      dialog.removeEventListener("close", done);
      const key = $("api-key").value.trim();
      if (key) sessionStorage.setItem(KEY, key);
      resolve(Boolean(key));
    };
    dialog.addEventListener("close", done);
    dialog.showModal();
  });
}

async function fetchModel() {
  for (;;) {
    let r;
    try {
      r = await fetch("v1/models", { headers: headers() });
    } catch (e) {
      throw new ServerError(0, "Cannot reach the server (" + e.message + ").");
    }
    if (r.status === 401) {
      const had = sessionStorage.getItem(KEY);
      sessionStorage.removeItem(KEY);
      const got = await askKey(had ? "The server refused that API key; enter it again."
        : "This server needs an API key.");
      if (!got) throw new ServerError(401, "This server needs an API key: reload the page to enter it.");
      continue;
    }
    if (!r.ok) throw await errorOf(r);
    const body = await r.json();
    model = body.data[0].id;
    $("model-name").textContent = model;
    document.title = model + " \u00b7 alpaca-server";
    return;
  }
}

// The data of each server-sent event of a response body.
async function* serverSentEvents(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (data) yield data;
    }
  }
}

function numberField(id) {
  const v = parseFloat($(id).value);
  return Number.isFinite(v) ? v : undefined;
}

// ---- sending ------------------------------------------------------------------------------

async function send() {
  const text = $("prompt").value;
  if (!text.trim() || running) return;
  hideError();
  if (!model) {
    try { await fetchModel(); } catch (e) { showError(e.message); return; }
  }
  if (!current) {
    current = { id: Date.now().toString(36) + Math.random().toString(36).slice(2, 8),
      title: text.trim().split("\n")[0].slice(0, 60), created: Date.now(), messages: [] };
    conversations.push(current);
  }
  const conversation = current;
  const question = { role: "user", content: text };
  const answer = { role: "assistant", content: "" };
  conversation.messages.push(question);
  const history = conversation.messages.map((m) => ({ role: m.role, content: m.content }));
  const system = $("system-prompt").value.trim();
  if (system) history.unshift({ role: "system", content: system });
  conversation.messages.push(answer);
  conversation.updated = Date.now();
  $("prompt").value = "";
  saveConversations();
  renderSidebar();
  renderConversation();
  const view = $("messages").lastElementChild;

  const payload = { model, messages: history, stream: true,
    stream_options: { include_usage: true },
    temperature: numberField("temperature"), max_tokens: numberField("max-tokens") };
  const controller = new AbortController();
  running = { controller, conversation };
  setRunning(true);
  let pending = false;
  const redraw = () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      if (view.isConnected) {
        fillMessage(view, answer);
        const box = $("messages");
        box.scrollTop = box.scrollHeight;
      }
    });
  };
  const t0 = performance.now();
  let tFirst = null;
  let usage = null;
  let finish = null;
  let failed = null;
  try {
    let r;
    try {
      r = await fetch("v1/chat/completions", { method: "POST", headers: headers(),
        body: JSON.stringify(payload), signal: controller.signal });
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new ServerError(0, "Cannot reach the server (" + e.message + ").");
    }
    if (!r.ok) throw await errorOf(r);
    for await (const data of serverSentEvents(r.body)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ServerError(500, describeError(500, chunk.error, null));
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      const delta = choice.delta && choice.delta.content;
      if (delta) {
        if (tFirst === null) tFirst = performance.now();
        answer.content += delta;
        redraw();
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
    const tEnd = performance.now();
    if (usage) {
      const n = usage.completion_tokens;
      answer.stats = { tokens: n, firstTokenMs: tFirst === null ? null : tFirst - t0,
        tokensPerSecond: n > 1 && tEnd > tFirst ? (n - 1) / ((tEnd - tFirst) / 1000) : null };
    }
    if (finish === "length") answer.note = "The answer reached the max-tokens limit (Settings).";
  } catch (e) {
    if (e.name === "AbortError") answer.note = "Stopped.";
    else failed = e;
  } finally {
    running = null;
    setRunning(false);
  }
  const shown = current === conversation;
  if (failed) {
    if (failed.status === 401) {
      sessionStorage.removeItem(KEY);
      model = null; // the next send asks for the key again
    }
    if (!answer.content) {
      // Nothing was answered: take the question back into the text box to retry.
      conversation.messages.splice(conversation.messages.indexOf(question), 2);
      if (!$("prompt").value) $("prompt").value = text;
      if (!conversation.messages.length) {
        conversations = conversations.filter((c) => c !== conversation);
        if (current === conversation) current = null;
      }
    } else {
      answer.note = failed.message;
    }
    showError(failed.message);
  }
  conversation.updated = Date.now();
  saveConversations();
  renderSidebar();
  if (shown) renderConversation();
}

function setRunning(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
}

async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    await navigator.clipboard.writeText(text);
    return;
  }
  const area = document.createElement("textarea"); // plain http on another host
  area.value = text;
  document.body.append(area);
  area.select();
  document.execCommand("copy");
  area.remove();
}

// ---- wiring -------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  loadSettings();
  renderSidebar();
  renderConversation();
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  $("stop").addEventListener("click", () => { if (running) running.controller.abort(); });
  $("new-chat").addEventListener("click", newChat);
  $("toggle-sidebar").addEventListener("click", () => document.body.classList.toggle("drawer"));
  $("toggle-settings").addEventListener("click", () => {
    const s = $("settings");
    s.hidden = !s.hidden;
    $("toggle-settings").setAttribute("aria-expanded", String(!s.hidden));
  });
  for (const id of ["system-prompt", "temperature", "max-tokens"]) {
    $(id).addEventListener("change", saveSettings);
  }
  $("messages").addEventListener("click", async (e) => {
    const button = e.target.closest(".copy");
    if (!button) return;
    try {
      await copyText(button.parentElement.querySelector("code").textContent);
      button.textContent = "Copied";
    } catch (err) {
      button.textContent = "Copy failed";
    }
    setTimeout(() => { button.textContent = "Copy"; }, 1500);
  });
  fetchModel().catch((e) => showError(e.message));
});
