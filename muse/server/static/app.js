// The Muse web app: chat, documents and the writing desk over the /api endpoints of `muse serve`.
// Plain JavaScript, no build step. Markdown from the model goes through marked, then DOMPurify.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const el = (tag, props = {}, ...children) => {
  const node = Object.assign(document.createElement(tag), props);
  for (const c of children) node.append(c);
  return node;
};
const store = {
  get: (k, d = null) => localStorage.getItem("muse." + k) ?? d,
  set: (k, v) => localStorage.setItem("muse." + k, v),
};

// -- language --------------------------------------------------------------------------

let lang = store.get("lang") || ((navigator.language || "en").toLowerCase().startsWith("zh") ? "zh" : "en");

// The string for `key` in the current language, its {name} placeholders filled from `vars`.
function t(key, vars = null) {
  const text = (window.MUSE_I18N[lang] || {})[key] ?? window.MUSE_I18N.en[key] ?? key;
  return vars ? text.replace(/\{(\w+)\}/g, (m, name) => vars[name] ?? m) : text;
}

// An element showing t(key, vars) that applyLanguage translates again: for every string the app composes.
function tel(tag, key, vars = null, props = {}) {
  const node = el(tag, Object.assign({ textContent: t(key, vars) }, props));
  node.dataset.i18n = key;
  if (vars) node.dataset.i18nVars = JSON.stringify(vars);
  return node;
}

function applyLanguage() {
  document.documentElement.lang = lang === "zh" ? "zh-CN" : "en";
  for (const node of document.querySelectorAll("[data-i18n]")) {
    node.textContent = t(node.dataset.i18n, node.dataset.i18nVars ? JSON.parse(node.dataset.i18nVars) : null);
  }
  for (const node of document.querySelectorAll("[data-i18n-placeholder]")) node.placeholder = t(node.dataset.i18nPlaceholder);
  for (const node of document.querySelectorAll("[data-i18n-title]")) {
    node.title = t(node.dataset.i18nTitle);
    if (node.hasAttribute("aria-label")) node.setAttribute("aria-label", node.title);
  }
  renderModels();
  renderBanner();
  fillDeskOptions();
  renderConversationList();
  renderPersonas();
  renderDocuments();
  renderHistory();
}

// -- the API ---------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.error && body.error.message) || t("error.http", { status }));
    this.status = status;
  }
}

// This launch's token (the server renders it into the page); the server refuses browser calls without it.
const LAUNCH_TOKEN = (document.querySelector('meta[name="muse-token"]') || {}).content || "";

// fetch with the launch token and the API key; a 401 asks for the key (once, then kept in localStorage) and retries.
async function api(path, options = {}) {
  for (;;) {
    const headers = Object.assign({ "X-Muse-Token": LAUNCH_TOKEN }, options.headers || {});
    const key = store.get("apiKey");
    if (key) headers.Authorization = "Bearer " + key;
    const res = await fetch(path, Object.assign({}, options, { headers }));
    if (res.status !== 401) return res;
    await askForKey(Boolean(key));
  }
}

async function apiJSON(path, options = {}) {
  if (options.json !== undefined) {
    options = Object.assign({}, options, {
      method: options.method || "POST",
      body: JSON.stringify(options.json),
      headers: { "Content-Type": "application/json" },
    });
  }
  const res = await api(path, options);
  const body = await res.json().catch(() => null);
  if (!res.ok) throw new ApiError(res.status, body);
  return body;
}

// POST a JSON body and call onEvent for each server-sent event ({type: start|citations|delta|done|error}).
async function streamEvents(path, body, signal, onEvent) {
  const res = await api(path, {
    method: "POST", body: JSON.stringify(body), signal, headers: { "Content-Type": "application/json" },
  });
  if (!res.ok) throw new ApiError(res.status, await res.json().catch(() => null));
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const event = JSON.parse(line.slice(6));
        if (event.type === "error") throw new ApiError(event.error ? 500 : 0, event);
        onEvent(event);
      }
    }
  }
}

let keyPromise = null;

function askForKey(wrong) {
  if (keyPromise) return keyPromise;
  const dialog = $("#key-dialog");
  $("#key-error").hidden = !wrong;
  $("#key-input").value = "";
  keyPromise = new Promise((resolve) => {
    $("#key-form").onsubmit = (e) => {
      e.preventDefault();
      const key = $("#key-input").value.trim();
      if (!key) return;
      store.set("apiKey", key);
      dialog.close();
      keyPromise = null;
      resolve();
    };
  });
  dialog.showModal();
  return keyPromise;
}

function sampling(model = $("#model").value) {
  const out = {};
  const max = parseInt($("#max-tokens").value, 10);
  if (max > 0) out.max_tokens = max;
  if (model) out.model = model;
  return out;
}

function toast(message, isError = false) {
  const box = $("#toast");
  box.textContent = (isError ? t("error") + ": " : "") + message;
  box.classList.toggle("error", isError);
  box.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => (box.hidden = true), isError ? 8000 : 3000);
}

const isAbort = (e) => e && e.name === "AbortError";

function renderMarkdown(node, text) {
  node.innerHTML = DOMPurify.sanitize(marked.parse(text || "", { gfm: true, breaks: true }));
}

// -- tabs ------------------------------------------------------------------------------

function showView(name) {
  for (const tab of document.querySelectorAll(".tabs [data-view]")) {
    tab.setAttribute("aria-selected", String(tab.dataset.view === name));
  }
  for (const view of document.querySelectorAll(".view")) view.hidden = view.id !== "view-" + name;
  store.set("view", name);
  if (name === "docs") loadDocuments();
  if (name === "desk") loadHistory();
}

// -- the models served and the languages they read ---------------------------------------

// From /api/info: the served models (the first is the default), the languages each reads, and the
// bundled bilingual model to install when none of them reads Chinese.
const served = { models: [], languages: {}, bilingual: "" };

const HAN = /[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]/g;

// Chinese when Han characters are at least a fifth of the letters (the server's muse.text.language).
function looksChinese(text) {
  const han = (text.match(HAN) || []).length;
  const letters = han + (text.match(/[A-Za-z]/g) || []).length;
  return han > 0 && han / letters >= 0.2;
}

const readsChinese = (model) => (served.languages[model] || []).includes("zh");

// The model for a request: the picked one, or for Chinese that it cannot read, a served model that can
// ({model, routed: true}); null when no served model reads Chinese (then nothing is sent: see langNotice).
function modelFor(chinese) {
  const picked = $("#model").value;
  if (!chinese || readsChinese(picked) || !served.models.length) return { model: picked, routed: false };
  const other = served.models.find(readsChinese);
  return other ? { model: other, routed: true } : null;
}

async function loadModels() {
  const info = await apiJSON("/api/info");
  Object.assign(served, { models: info.models, languages: info.languages || {}, bilingual: info.bilingual || "" });
  renderModels();
  const saved = store.get("model");
  if (saved && served.models.includes(saved)) $("#model").value = saved;
  renderBanner();
}

function renderModels() {
  const select = $("#model");
  const chosen = select.value;
  select.replaceChildren();
  for (const m of served.models) {
    const label = served.languages[m] ? `${m} (${t(readsChinese(m) ? "model.bilingual" : "model.english")})` : m;
    select.append(el("option", { value: m, textContent: label }));
  }
  if (chosen) select.value = chosen;
}

// What to do when Chinese meets English-only models, in the web app's own terms: a sentence for the
// person using the page and, marked as such, the commands for whoever runs the server.
function langNotice(key, commands = true) {
  const vars = { model: served.models.join(", "), bilingual: served.bilingual };
  const box = el("div", { className: "notice lang-notice" }, tel("p", key, vars));
  if (commands && served.bilingual) {
    const serve = [...served.models, served.bilingual].map((m) => "-m " + m).join(" ");
    // each word unbroken (a browser would break "qwen2.5-0.5b" at its hyphens): lines wrap between words only
    const line = (text) => text.split(" ").flatMap((w, i) => [i ? " " : "", el("span", { className: "word", textContent: w })]);
    box.append(tel("p", "lang.forAdmin", null, { className: "for-admin" }),
               el("pre", { className: "commands" }, ...line(`muse models install ${served.bilingual}`), "\n",
                  ...line(`muse serve ${serve}`)));
  }
  return box;
}

// In Chinese, a banner says at once when no served model reads Chinese (it can be dismissed).
function renderBanner() {
  const banner = $("#lang-banner");
  const hideKey = "hideLangBanner." + served.models.join(",");
  banner.hidden = lang !== "zh" || !served.models.length || served.models.some(readsChinese) || Boolean(store.get(hideKey));
  if (banner.hidden) return;
  const close = el("button", { type: "button", className: "ghost small", textContent: "×", title: t("close"),
                               onclick: () => { store.set(hideKey, "1"); banner.hidden = true; } });
  close.setAttribute("aria-label", t("close"));
  banner.replaceChildren(langNotice("lang.banner"), close);
}

// Replace `box`'s notice (if any) with a new one and show it (the commands only if the banner does not).
function showLangNotice(box, key) {
  box.querySelector(".lang-notice")?.remove();
  const notice = langNotice(key, $("#lang-banner").hidden);
  box.append(notice);
  notice.scrollIntoView({ block: "nearest" });
}

// -- chat ------------------------------------------------------------------------------

const chat = { id: null, conversations: [], personas: [], controller: null };

async function loadConversations() {
  const q = $("#conv-search").value.trim();
  const path = q ? "/api/conversations/search?q=" + encodeURIComponent(q) : "/api/conversations";
  chat.conversations = (await apiJSON(path)).data;
  renderConversationList();
}

function renderConversationList() {
  const list = $("#conv-list");
  list.replaceChildren();
  if (!chat.conversations.length) list.append(el("li", { className: "empty", textContent: t("chat.noConversations") }));
  for (const c of chat.conversations) {
    const item = el("li", { className: c.id === chat.id ? "active" : "" },
      el("button", { className: "conv", textContent: c.title || t("chat.untitled"), title: c.title || "",
                     onclick: () => openConversation(c.id) }));
    item.dataset.id = c.id;
    list.append(item);
  }
}

// The header of the open conversation (none open: "New conversation", buttons off).
function showTitle(title) {
  const node = $("#conv-title");
  if (title) { node.removeAttribute("data-i18n"); node.textContent = title; }
  else { node.dataset.i18n = "chat.untitled"; node.textContent = t("chat.untitled"); }
  for (const b of ["#rename-chat", "#export-chat", "#delete-chat"]) $(b).disabled = !chat.id;
}

async function openConversation(id) {
  const conv = await apiJSON("/api/conversations/" + encodeURIComponent(id));
  chat.id = conv.id;
  showTitle(conv.title);
  const box = $("#messages");
  box.replaceChildren();
  for (const m of conv.messages) {
    if (m.role === "user" || m.role === "assistant") {
      addMessage(m.role, m.content, m.id, m.meta && m.meta.finish_reason === "stopped");
    }
  }
  if (!conv.messages.length) box.append(tel("p", "chat.empty", null, { className: "empty" }));
  renderConversationList();
  box.scrollTop = box.scrollHeight;
}

function resetChat() {
  chat.id = null;
  showTitle(null);
  $("#messages").replaceChildren(tel("p", "chat.empty", null, { className: "empty" }));
  renderConversationList();
  $("#chat-input").focus();
}

// One message bubble; assistant bubbles render Markdown and get feedback buttons once saved.
function addMessage(role, text, id = null, stopped = false) {
  $("#messages .empty")?.remove();
  const body = el("div", { className: "body" });
  const who = el("div", { className: "who", textContent: role === "user" ? t("chat.you") : t("chat.muse") });
  who.dataset.i18n = role === "user" ? "chat.you" : "chat.muse";
  const bubble = el("div", { className: "message " + role }, who, body);
  if (role === "user") body.textContent = text;
  else renderMarkdown(body, text);
  if (stopped) bubble.append(stoppedNote());
  if (role === "assistant" && id) addFeedback(bubble, id);
  $("#messages").append(bubble);
  return bubble;
}

function stoppedNote() {
  const note = el("div", { className: "note", textContent: t("chat.stopped") });
  note.dataset.i18n = "chat.stopped";
  return note;
}

// Thumbs icons (paths from Feather icons, MIT): emoji fonts are not everywhere.
const THUMB_UP = "M14 9V5a3 3 0 0 0-3-3l-4 9v11h11.28a2 2 0 0 0 2-1.7l1.38-9a2 2 0 0 0-2-2.3zM7 22H4a2 2 0 0 1-2-2v-7a2 2 0 0 1 2-2h3";
const THUMB_DOWN = "M10 15v4a3 3 0 0 0 3 3l4-9V2H5.72a2 2 0 0 0-2 1.7l-1.38 9a2 2 0 0 0 2 2.3zm7-13h2.67A2.31 2.31 0 0 1 22 4v7a2.31 2.31 0 0 1-2.33 2H17";

function thumbButton(className, path, key) {
  const button = el("button", { className: "rate " + className, type: "button", title: t(key) });
  button.dataset.i18nTitle = key;
  button.setAttribute("aria-label", t(key));
  button.innerHTML = `<svg viewBox="0 0 24 24" width="16" height="16" fill="none" stroke="currentColor" ` +
    `stroke-width="2" stroke-linecap="round" stroke-linejoin="round" aria-hidden="true"><path d="${path}"/></svg>`;
  return button;
}

function addFeedback(bubble, messageId) {
  bubble.dataset.messageId = messageId;
  const input = el("input", { name: "comment", placeholder: t("fb.comment"), maxLength: 4000 });
  input.dataset.i18nPlaceholder = "fb.comment";
  // A thumbs-down may carry the answer wanted instead: fine-tuning data and an eval item's reference.
  const fix = el("textarea", { name: "correction", placeholder: t("fb.correction"), maxLength: 32000, rows: 2,
                               hidden: true });
  fix.dataset.i18nPlaceholder = "fb.correction";
  const send = el("button", { type: "submit", textContent: t("fb.send") });
  send.dataset.i18n = "fb.send";
  const form = el("form", { className: "comment", hidden: true }, input, fix, send);
  let rating = 0;
  const rate = (value, button) => {
    rating = value;
    for (const b of bubble.querySelectorAll(".rate")) b.classList.toggle("chosen", b === button);
    form.hidden = false;
    fix.hidden = value !== -1;
    form.comment.focus();
  };
  const up = thumbButton("up", THUMB_UP, "fb.good");
  const down = thumbButton("down", THUMB_DOWN, "fb.bad");
  up.onclick = () => rate(1, up);
  down.onclick = () => rate(-1, down);
  form.onsubmit = async (e) => {
    e.preventDefault();
    try {
      const correction = rating === -1 ? fix.value.trim() || null : null;
      await apiJSON("/api/feedback", { json: { conversation: chat.id, message_id: Number(messageId), rating,
                                               comment: form.comment.value.trim() || null, correction } });
      form.hidden = true;
      toast(t("fb.thanks"));
    } catch (err) { toast(err.message, true); }
  };
  bubble.append(el("div", { className: "feedback" }, up, down, form));
}

async function sendMessage(text, route) {
  if (!chat.id) {
    const persona = $("#persona-select").value || null;
    chat.id = (await apiJSON("/api/conversations", { json: { persona } })).id;
    showTitle(null);
  }
  const cid = chat.id;
  $("#messages .lang-notice")?.remove();
  addMessage("user", text);
  if (route.routed) $("#messages").append(tel("p", "lang.routed", { model: route.model, picked: $("#model").value },
                                              { className: "notice" }));
  const bubble = addMessage("assistant", "");
  bubble.classList.add("streaming");
  const body = $(".body", bubble);
  const box = $("#messages");
  let reply = "";
  chat.controller = new AbortController();
  setChatBusy(true);
  try {
    await streamEvents(`/api/conversations/${encodeURIComponent(cid)}/messages`,
      Object.assign({ content: text }, sampling(route.model)), chat.controller.signal, (event) => {
        if (event.type === "start" && event.context && event.context.notice) {
          box.insertBefore(el("p", { className: "notice", textContent: event.context.notice }), bubble);
        } else if (event.type === "delta") {
          reply += event.text;
          renderMarkdown(body, reply);
          box.scrollTop = box.scrollHeight;
        } else if (event.type === "done") {
          renderMarkdown(body, event.content);
          addFeedback(bubble, event.message_id);
        }
      });
  } catch (err) {
    if (isAbort(err)) {
      bubble.append(stoppedNote());
      setTimeout(() => cid === chat.id && openConversation(cid), 400);  // the partial reply is saved: get its id
    } else {
      bubble.append(el("div", { className: "error-text", textContent: err.message }));
    }
  } finally {
    bubble.classList.remove("streaming");
    chat.controller = null;
    setChatBusy(false);
    await loadConversations().catch(() => {});
    const conv = chat.conversations.find((c) => c.id === cid);
    if (conv && cid === chat.id) showTitle(conv.title);
  }
}

function setChatBusy(busy) {
  $("#send").hidden = busy;
  $("#stop").hidden = !busy;
  $("#chat-input").disabled = busy;
}

async function loadPersonas() {
  chat.personas = (await apiJSON("/api/personas")).data;
  renderPersonas();
}

function renderPersonas() {
  const select = $("#persona-select");
  const chosen = select.value;
  select.replaceChildren(el("option", { value: "", textContent: t("chat.noPersona") }));
  const list = $("#persona-list");
  list.replaceChildren();
  if (!chat.personas.length) list.append(el("li", { className: "empty", textContent: t("personas.none") }));
  for (const p of chat.personas) {
    select.append(el("option", { value: p.name, textContent: p.name }));
    list.append(el("li", { title: p.system_prompt },
      el("span", { textContent: p.name }),
      el("button", { className: "ghost small", textContent: "×", title: t("personas.delete"),
                     onclick: () => deletePersona(p.name) })));
  }
  select.value = chosen;
}

async function deletePersona(name) {
  try {
    await apiJSON("/api/personas/" + encodeURIComponent(name), { method: "DELETE" });
    await loadPersonas();
  } catch (err) { toast(err.message, true); }
}

function setupChat() {
  $("#new-chat").onclick = resetChat;
  $("#composer").onsubmit = (e) => {
    e.preventDefault();
    const input = $("#chat-input");
    const text = input.value.trim();
    if (!text || chat.controller) return;
    const route = modelFor(looksChinese(text));
    if (!route) {  // an English-only model would answer Chinese with noise: say what to do, send nothing
      $("#messages .empty")?.remove();
      showLangNotice($("#messages"), "lang.chinese");
      return;
    }
    input.value = "";
    sendMessage(text, route).catch((err) => toast(err.message, true));
  };
  // Phone width: the conversation list is a panel over the chat, opened from the chat's header.
  const sidebar = (open) => $("#view-chat").classList.toggle("sidebar-open", open);
  $("#open-sidebar").onclick = () => sidebar(true);
  $("#close-sidebar").onclick = () => sidebar(false);
  $("#conv-list").addEventListener("click", (e) => e.target.closest(".conv") && sidebar(false));
  $("#new-chat").addEventListener("click", () => sidebar(false));
  $("#chat-input").onkeydown = (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("#composer").requestSubmit();
    }
  };
  $("#stop").onclick = () => chat.controller && chat.controller.abort();
  let searchTimer;
  $("#conv-search").oninput = () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => loadConversations().catch((err) => toast(err.message, true)), 250);
  };
  $("#rename-chat").onclick = async () => {
    const title = prompt(t("chat.renamePrompt"), $("#conv-title").textContent);
    if (!title || !title.trim()) return;
    try {
      const r = await apiJSON(`/api/conversations/${encodeURIComponent(chat.id)}/rename`, { json: { title } });
      showTitle(r.title);
      await loadConversations();
    } catch (err) { toast(err.message, true); }
  };
  $("#delete-chat").onclick = async () => {
    if (!confirm(t("chat.deleteConfirm"))) return;
    try {
      await apiJSON("/api/conversations/" + encodeURIComponent(chat.id), { method: "DELETE" });
      resetChat();
      await loadConversations();
    } catch (err) { toast(err.message, true); }
  };
  $("#export-chat").onclick = async () => {
    try {
      const res = await api(`/api/conversations/${encodeURIComponent(chat.id)}/export?format=markdown`);
      if (!res.ok) throw new ApiError(res.status, await res.json().catch(() => null));
      download(`conversation-${chat.id}.md`, await res.blob());
    } catch (err) { toast(err.message, true); }
  };
  $("#import-chat").onclick = () => $("#import-file").click();
  $("#import-file").onchange = async (e) => {
    const file = e.target.files[0];
    e.target.value = "";
    if (!file) return;
    try {
      const conv = await apiJSON("/api/conversations/import", { json: { text: await file.text() } });
      toast(t("chat.imported"));
      await loadConversations();
      await openConversation(conv.id);
    } catch (err) { toast(err.message, true); }
  };
  $("#persona-form").onsubmit = async (e) => {
    e.preventDefault();
    try {
      const p = await apiJSON("/api/personas", { json: { name: $("#persona-name").value.trim(),
                                                          system_prompt: $("#persona-prompt").value.trim() } });
      $("#persona-name").value = $("#persona-prompt").value = "";
      await loadPersonas();
      $("#persona-select").value = p.name;
    } catch (err) { toast(err.message, true); }
  };
}

function download(name, blob) {
  const a = el("a", { href: URL.createObjectURL(blob), download: name });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
}

// -- documents -------------------------------------------------------------------------

const docs = { list: [], controller: null };

async function loadDocuments() {
  docs.list = (await apiJSON("/api/kb/documents")).data;
  renderDocuments();
}

function renderDocuments() {
  const list = $("#doc-list");
  list.replaceChildren();
  if (!docs.list.length) list.append(el("li", { className: "empty", textContent: t("docs.none") }));
  for (const d of docs.list) {
    list.append(el("li", { title: d.path },
      el("span", { className: "doc-title", textContent: d.title }),
      el("span", { className: "meta", textContent: `${d.chunks} ${t("docs.passages")}` }),
      el("button", { className: "ghost small danger", textContent: t("docs.remove"),
                     onclick: () => removeDocument(d) })));
  }
}

async function removeDocument(doc) {
  if (!confirm(t("docs.removeConfirm"))) return;
  try {
    await apiJSON("/api/kb/documents/" + doc.id, { method: "DELETE" });
    await loadDocuments();
  } catch (err) { toast(err.message, true); }
}

// Upload and index `files`; the status line says what happened to each (added, updated, unchanged).
async function upload(files) {
  const form = new FormData();
  for (const f of files) form.append("files", f, f.name);
  const status = $("#upload-status");
  status.classList.remove("error-text");
  status.replaceChildren(tel("span", "docs.uploading", { n: files.length }));
  status.hidden = false;
  try {
    const saved = (await apiJSON("/api/kb/documents", { method: "POST", body: form })).data;
    status.replaceChildren();
    for (const kind of ["added", "updated", "unchanged"]) {
      const titles = saved.filter((d) => d.status === kind).map((d) => d.title).join(", ");
      if (titles) status.append(tel("span", "docs." + kind, { titles }), " ");
    }
  } catch (err) {
    status.replaceChildren(err.message);  // the server's reason, as it gave it
    status.classList.add("error-text");
  }
  await loadDocuments();
}

function renderCitations(citations) {
  const list = $("#citations");
  list.replaceChildren();
  for (const c of citations) {
    const item = el("li", { value: c.n },
      el("div", { className: "cite-title", textContent: `[${c.n}] ${c.title}` }),
      el("blockquote", { className: "passage", textContent: c.text }));
    item.dataset.n = c.n;
    list.append(item);
  }
  $("#sources").hidden = false;
  if (!citations.length) list.append(tel("li", "docs.noSources", null, { className: "empty" }));
}

async function askDocuments(question) {
  const answer = $("#answer");
  answer.replaceChildren();
  $("#sources").hidden = true;
  const route = modelFor(looksChinese(question));
  if (!route) return showLangNotice(answer, "lang.chinese");
  if (route.routed) answer.append(tel("p", "lang.routed", { model: route.model, picked: $("#model").value }, { className: "notice" }));
  const reply = answer.appendChild(el("div", { className: "markdown" }));
  answer.classList.add("streaming");
  let text = "";
  docs.controller = new AbortController();
  setBusy("#ask-button", "#ask-stop", true);
  try {
    await streamEvents("/api/kb/ask", Object.assign({ question }, sampling(route.model)), docs.controller.signal, (event) => {
      if (event.type === "citations") renderCitations(event.citations);
      else if (event.type === "delta") { text += event.text; renderMarkdown(reply, text); }
      else if (event.type === "done") {
        renderMarkdown(reply, linkCitations(event.text));
        renderCitations(event.citations);
        if (event.quoted) answer.append(tel("p", "docs.quoted", null, { className: "notice" }));
      }
    });
  } catch (err) {
    if (!isAbort(err)) answer.append(el("p", { className: "error-text", textContent: err.message }));
  } finally {
    answer.classList.remove("streaming");
    docs.controller = null;
    setBusy("#ask-button", "#ask-stop", false);
  }
}

// "[2]" in an answer → a link to source 2 below it.
function linkCitations(text) {
  return text.replace(/\[(\d+)\]/g, (m, n) => `[\\[${n}\\]](#cite-${n})`);
}

function setBusy(run, stop, busy) {
  $(run).hidden = busy;
  $(stop).hidden = !busy;
}

// The files picked for upload, or "No file chosen" (the browser's own file button would not switch language).
function showChosen() {
  const files = [...$("#upload-input").files];
  const chosen = $("#upload-chosen");
  if (files.length) {
    chosen.removeAttribute("data-i18n");
    chosen.textContent = files.map((f) => f.name).join(", ");
  } else {
    chosen.dataset.i18n = "docs.noneChosen";
    chosen.textContent = t("docs.noneChosen");
  }
}

function setupDocuments() {
  $("#upload-input").onchange = showChosen;
  $("#upload-form").onsubmit = (e) => {
    e.preventDefault();
    const files = $("#upload-input").files;
    if (files.length) upload(files).then(() => { $("#upload-input").value = ""; showChosen(); });
  };
  $("#ask-form").onsubmit = (e) => {
    e.preventDefault();
    const q = $("#ask-input").value.trim();
    if (q && !docs.controller) askDocuments(q);
  };
  $("#ask-stop").onclick = () => docs.controller && docs.controller.abort();
  $("#answer").onclick = (e) => {
    const a = e.target.closest("a[href^='#cite-']");
    if (!a) return;
    e.preventDefault();
    const item = $(`#citations li[data-n="${a.getAttribute("href").slice(6)}"]`);
    if (item) { item.scrollIntoView({ block: "nearest" }); item.classList.add("flash"); setTimeout(() => item.classList.remove("flash"), 1200); }
  };
}

// -- writing desk ----------------------------------------------------------------------

const desk = { actions: [], tones: {}, languages: {}, versions: [], controller: null, shown: null };

async function loadActions() {
  const r = await apiJSON("/api/write/actions");
  Object.assign(desk, { actions: r.actions, tones: r.tones, languages: r.languages });
  fillDeskOptions();
}

function fillDeskOptions() {
  const fill = (select, entries, withDefault) => {
    const chosen = select.value;
    select.replaceChildren();
    if (withDefault) select.append(el("option", { value: "", textContent: t("desk.default") }));
    for (const [value, label] of entries) select.append(el("option", { value, textContent: label }));
    if (chosen) select.value = chosen;
  };
  fill($("#desk-action"), desk.actions.map((a) => [a.name, t("action." + a.name)]), false);
  fill($("#desk-tone"), Object.entries(desk.tones).map(([k, v]) => [k, v[lang] || k]), true);
  fill($("#desk-to"), Object.entries(desk.languages).map(([k, v]) => [k, v[lang] || k]), false);
  if (!$("#desk-to").value) $("#desk-to").value = lang === "zh" ? "en" : "zh";
  updateDeskOptions();
}

function updateDeskOptions() {
  const action = desk.actions.find((a) => a.name === $("#desk-action").value);
  $("#desk-tone-label").hidden = !(action && action.tone);
  $("#desk-to-label").hidden = !(action && action.name === "translate");
  $("#desk-length-label").hidden = !(action && action.name === "summarize");
}

function deskDocument() {
  return $("#desk-doc").value.trim() || "draft";
}

async function runAction() {
  const action = $("#desk-action").value;
  const text = $("#desk-text").value;
  const toChinese = !$("#desk-to-label").hidden && $("#desk-to").value.startsWith("zh");
  const result = $("#desk-result");
  const route = modelFor(looksChinese(text) || toChinese);
  if (!route) {
    result.replaceChildren();
    return showLangNotice(result, looksChinese(text) ? "lang.chinese" : "lang.toChinese");
  }
  const body = Object.assign({ action, text, document: deskDocument() }, sampling(route.model));
  if (!$("#desk-tone-label").hidden && $("#desk-tone").value) body.tone = $("#desk-tone").value;
  if (!$("#desk-to-label").hidden) body.to = $("#desk-to").value;
  if (!$("#desk-length-label").hidden && $("#desk-length").value) body.length = parseInt($("#desk-length").value, 10);
  result.replaceChildren();
  if (route.routed) toast(t("lang.routed", { model: route.model, picked: $("#model").value }));
  result.classList.add("streaming");
  let output = "";
  desk.controller = new AbortController();
  setBusy("#desk-run", "#desk-stop", true);
  try {
    await streamEvents("/api/write", body, desk.controller.signal, (event) => {
      if (event.type === "delta") { output += event.text; result.textContent = output; }
      else if (event.type === "done") {
        result.textContent = event.output;
        $("#desk-text").value = event.text;
        showDiff(event.diff.ops);
        desk.shown = event.version;
      }
    });
  } catch (err) {
    if (!isAbort(err)) result.append(el("p", { className: "error-text", textContent: err.message }));
  } finally {
    result.classList.remove("streaming");
    desk.controller = null;
    setBusy("#desk-run", "#desk-stop", false);
    await loadHistory();
  }
}

function showDiff(ops) {
  const box = $("#desk-diff");
  box.replaceChildren();
  for (const op of ops) {
    const tag = op.op === "insert" ? "ins" : op.op === "delete" ? "del" : "span";
    box.append(el(tag, { textContent: op.text }));
  }
}

async function loadHistory() {
  try {
    desk.versions = (await apiJSON("/api/write/versions?document=" + encodeURIComponent(deskDocument()))).data;
  } catch (err) { toast(err.message, true); }
  renderHistory();
}

function renderHistory() {
  const list = $("#desk-history");
  list.replaceChildren();
  if (!desk.versions.length) list.append(el("li", { className: "empty", textContent: t("desk.noHistory") }));
  for (const v of [...desk.versions].reverse()) {
    const action = versionLabel(v.action);
    const when = new Date(v.created_at * 1000).toLocaleTimeString(lang === "zh" ? "zh-CN" : "en");
    const item = el("li", { className: v.seq === desk.shown ? "active" : "" },
      el("button", { className: "version", onclick: () => showVersion(v.seq) },
        el("strong", { textContent: `${t("desk.version")} ${v.seq}` }),
        el("span", { className: "meta", textContent: ` · ${action} · ${when}` }),
        el("div", { className: "first-line", textContent: v.first_line })),
      el("button", { className: "ghost small", textContent: t("desk.restore"), onclick: () => restoreVersion(v.seq) }));
    item.dataset.seq = v.seq;
    list.append(item);
  }
}

// "shorten" → "Shorten" / "缩写"; "original", "edited" and "restore 2" likewise.
function versionLabel(action) {
  const restored = /^restore (\d+)$/.exec(action);
  if (restored) return t("version.restore").replace("{n}", restored[1]);
  const key = (action in { original: 1, edited: 1 } ? "version." : "action.") + action;
  return t(key) === key ? action : t(key);
}

async function showVersion(seq) {
  const doc = encodeURIComponent(deskDocument());
  try {
    const [version, diff] = await Promise.all([
      apiJSON(`/api/write/versions/${seq}?document=${doc}`),
      apiJSON(`/api/write/versions/${seq}/diff?document=${doc}`),
    ]);
    $("#desk-result").textContent = version.content;
    showDiff(diff.ops);
    desk.shown = seq;
    renderHistory();
  } catch (err) { toast(err.message, true); }
}

async function restoreVersion(seq) {
  try {
    const r = await apiJSON(`/api/write/versions/${seq}/restore?document=${encodeURIComponent(deskDocument())}`,
                            { method: "POST" });
    $("#desk-text").value = r.content;
    toast(t("desk.restored"));
    await loadHistory();
    await showVersion(r.seq);
  } catch (err) { toast(err.message, true); }
}

function setupDesk() {
  $("#desk-action").onchange = updateDeskOptions;
  $("#desk-form").onsubmit = (e) => {
    e.preventDefault();
    if (!desk.controller) runAction();
  };
  $("#desk-stop").onclick = () => desk.controller && desk.controller.abort();
  $("#desk-doc").onchange = () => { desk.shown = null; loadHistory(); };
  $("#desk-file").onchange = async (e) => {
    const file = e.target.files[0];
    e.target.value = "";
    if (!file) return;
    $("#desk-text").value = await file.text();
    $("#desk-doc").value = file.name;
    desk.shown = null;
    await loadHistory();
  };
}

// -- start -----------------------------------------------------------------------------

async function start() {
  for (const tab of document.querySelectorAll(".tabs [data-view]")) tab.onclick = () => showView(tab.dataset.view);
  $("#lang-toggle").onclick = () => {
    lang = lang === "zh" ? "en" : "zh";
    store.set("lang", lang);
    applyLanguage();
  };
  $("#max-tokens").value = store.get("maxTokens", "256");
  $("#max-tokens").onchange = () => store.set("maxTokens", $("#max-tokens").value);
  $("#model").onchange = () => store.set("model", $("#model").value);
  for (const label of document.querySelectorAll(".file-button")) {  // its file input is hidden: keys open it too
    label.tabIndex = 0;
    label.onkeydown = (e) => {
      if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("input[type=file]", label).click(); }
    };
  }
  setupChat();
  setupDocuments();
  setupDesk();
  applyLanguage();
  showView(store.get("view", "chat"));
  try {
    await loadModels();
    await Promise.all([loadConversations(), loadPersonas(), loadActions()]);
  } catch (err) { toast(err.message, true); }
  document.body.dataset.ready = "true";  // for tests and scripts: the page has loaded its data
}

document.addEventListener("DOMContentLoaded", start);
