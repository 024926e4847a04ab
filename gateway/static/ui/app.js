// The gateway console (served at /ui): plain ES2020, no framework, no build step.
//
// Security notes
// - The page holds no data: everything comes from the gateway's JSON API, called with fetch.
// - The admin token lives only in this tab's sessionStorage under TOKEN_KEY: never localStorage,
//   never a cookie, never a URL. It travels only in the Authorization header.
// - CSRF: a foreign page cannot make a browser send our Authorization header (it is not a cookie,
//   and a cross-origin fetch with it needs a CORS preflight that the gateway never grants); and the
//   gateway's doors (gateway/doors.py) refuse any request whose Origin is not its own, and admin
//   POSTs without Content-Type: application/json. So no CSRF token is needed.
// - Data is written into the page with textContent / createElement only, never as HTML.
// - Provider keys (schema fields with format "password" / writeOnly) are read from their input
//   once, sent, and the input is cleared; they are never shown or kept. The curl lines show
//   "$PROVIDER_API_KEY" and "$GATEWAY_ADMIN_TOKEN" instead; a base_url / proxy that carries
//   credentials (user:pass@ or a ?query) shows as "$PROVIDER_BASE_URL" / "$PROVIDER_PROXY".
"use strict";

const TOKEN_KEY = "llm-gateway.admin-token";
const REFRESH_MS = 3000;
const POLL_MS = 1000;

const state = {
  auth: false,          // does the gateway have an admin token (GET /ui/config)
  providers: [],        // [{name, kind, schema}]
  deployments: [],      // the last GET /deployments rows
  clockSkewS: 0,        // the gateway's clock less this browser's, when they differ by more than a few seconds
  refreshTimer: null,
  view: "endpoints",
  pendingUndeploy: null,
  curl: [],             // [{key, what, line}], newest first
  compareAbort: null,
  session: 0,           // bumped by loggedOut: work begun in an older session stops acting
  apiAbort: new AbortController(),  // aborted by loggedOut: the API calls in flight then
};

// is a session (state.session when some work began) still the current one?
const current = (session) => session === state.session;

// -- small DOM helpers ---------------------------------------------------------------
const $ = (id) => document.getElementById(id);

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k in node && typeof v !== "string") node[k] = v;
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function show(node, text) {
  node.textContent = text || "";
  node.hidden = !text;
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

// -- curl lines ---------------------------------------------------------------------
// POSIX shell: single quotes keep everything literal; a ' inside becomes '\''.
function shq(s) {
  return "'" + String(s).replace(/'/g, "'\\''") + "'";
}

// body fields shown as a shell variable in the curl lines: secrets always, URLs when they carry credentials
const URL_VARIABLES = { base_url: "PROVIDER_BASE_URL", http_proxy: "PROVIDER_BASE_URL", proxy: "PROVIDER_PROXY" };
const sentinel = (variable) => `__GATEWAY_CONSOLE_${variable}__`;

// a URL with userinfo (user:pass@) or a query string (?token=...) may hold credentials
function credentialed(url) {
  try {
    const u = new URL(url);
    return Boolean(u.username || u.password || u.search);
  } catch (e) {
    return /[@?]/.test(url);  // (not a URL the browser reads: keep it out of the line if it might hold one)
  }
}

function curlLine(method, path, body, authorized) {
  const parts = ["curl", "-sS"];
  if (body && body.stream === true) parts.push("-N");  // (streamed: curl shows the events as they come)
  if (method !== "GET") parts.push("-X", method);
  parts.push(shq(window.location.origin + path));
  if (body !== undefined) parts.push("-H", shq("Content-Type: application/json"));
  // the literal variable, never the token: double quotes so the shell expands it
  if (authorized) parts.push("-H", '"Authorization: Bearer $GATEWAY_ADMIN_TOKEN"');
  if (body !== undefined) {
    // secrets (the provider key) become "$PROVIDER_API_KEY", a credentialed base_url / proxy
    // "$PROVIDER_BASE_URL" / "$PROVIDER_PROXY": the single quotes are left around the variable
    // (which the shell expands inside double quotes), so the JSON string holds its value
    const used = new Set();
    const json = JSON.stringify(body, (k, v) => {
      if (typeof v !== "string") return v;
      const variable = SECRET_FIELDS.has(k) ? "PROVIDER_API_KEY" : URL_VARIABLES[k] && credentialed(v) ? URL_VARIABLES[k] : null;
      if (!variable) return v;
      used.add(variable);
      return sentinel(variable);
    });
    let quoted = shq(json);
    for (const variable of used) quoted = quoted.split(sentinel(variable)).join(`'"$${variable}"'`);
    parts.push("-d", quoted);
  }
  return parts.join(" ");
}

// names of write-only fields of any provider's schema (filled from GET /providers)
const SECRET_FIELDS = new Set(["api_key"]);

function recordCurl(what, method, path, body, authorized) {
  const line = curlLine(method, path, body, authorized);
  const key = method + " " + path + (method === "GET" ? "" : " " + Date.now());
  state.curl = [{ key, what, line }, ...state.curl.filter((c) => c.key !== key)].slice(0, 20);
  renderCurl();
}

function renderCurl() {
  const list = $("curl-list");
  list.replaceChildren(...state.curl.map((c) => {
    const pre = el("pre", { class: "curl", text: c.line });
    const copy = el("button", { type: "button", class: "small", text: "copy", onclick: () => copyText(c.line, copy) });
    return el("li", {}, el("span", { class: "what", text: c.what + " " }), copy, pre);
  }));
  $("curl-panel").hidden = state.curl.length === 0;
}

async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
    button.textContent = "copied";
  } catch (e) {
    button.textContent = "select and copy";
  }
  setTimeout(() => { button.textContent = "copy"; }, 1500);
}

// -- the API --------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, error) {
    super((error && error.message) || `HTTP ${status}`);
    this.status = status;
    this.error = error || {};
  }
}

// One call to the gateway's JSON API. The token (if any) goes in the Authorization header only.
async function api(method, path, body, { what, tokenOverride, record = true, signal } = {}) {
  const headers = { Accept: "application/json" };
  const t = tokenOverride !== undefined ? tokenOverride : token();
  if (t) headers.Authorization = "Bearer " + t;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (record) recordCurl(what || `${method} ${path}`, method, path, body, Boolean(t));
  const response = await fetch(path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
    cache: "no-store", credentials: "omit", redirect: "error", signal: signal || state.apiAbort.signal,
  });
  return response;
}

async function apiJson(method, path, body, opts = {}) {
  const response = await api(method, path, body, opts);
  let data = null;
  try { data = await response.json(); } catch (e) { data = null; }
  if (!response.ok) {
    if (response.status === 401 && opts.tokenOverride === undefined && state.auth) loggedOut("the admin token was refused (401): log in again");
    throw new ApiError(response.status, data && data.error);
  }
  return { status: response.status, data, date: response.headers.get("Date") };
}

// -- login ------------------------------------------------------------------------------
// the end of a session (logout, a refused token): whatever is in flight stops, and what it showed goes
function loggedOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  state.session += 1;
  state.apiAbort.abort();
  state.apiAbort = new AbortController();
  if (state.compareAbort) state.compareAbort.abort();
  stopRefresh();
  for (const id of ["endpoints-view", "compare-view", "tabs", "logout", "curl-panel", "dashboard-link", "undeploy-box",
    "deploy-progress"]) $(id).hidden = true;
  $("dashboard-link").removeAttribute("href");
  state.curl = [];
  renderCurl();
  state.deployments = [];
  state.pendingUndeploy = null;
  $("endpoints-body").replaceChildren();
  $("budgets-body").replaceChildren();
  $("budgets-card").hidden = true;
  $("compare-columns").replaceChildren();
  $("compare-targets").replaceChildren();
  delete $("compare-targets").dataset.signature;
  state.providers = [];
  $("deploy-provider").replaceChildren();
  buildForm();  // (no provider: an empty form, without what was typed)
  for (const id of ["endpoints-error", "budgets-error", "deploy-error", "deploy-status", "compare-error", "compare-status"]) show($(id), "");
  $("refreshed").textContent = "";
  $("login-view").hidden = false;
  show($("login-error"), message || "");
  $("login-token").focus();
}

async function login(event) {
  event.preventDefault();
  const input = $("login-token");
  const candidate = input.value.trim();
  input.value = "";
  if (!candidate) return show($("login-error"), "enter the admin token");
  try {
    // verified before it is kept: GET /deployments answers 401 to a wrong token
    await apiJson("GET", "/deployments", undefined, { tokenOverride: candidate, record: false });
  } catch (e) {
    return show($("login-error"), e.status === 401 ? "this token was refused (401 unauthorized)" : `the gateway answered: ${e.message}`);
  }
  sessionStorage.setItem(TOKEN_KEY, candidate);
  show($("login-error"), "");
  show($("notice"), "");
  $("login-view").hidden = true;
  started();
}

function logout() {
  sessionStorage.clear();
  loggedOut("");
  show($("notice"), "Logged out: this tab no longer holds the token.");
}

// -- views ----------------------------------------------------------------------------
function setView(view) {
  state.view = view;
  for (const button of document.querySelectorAll(".tab")) button.classList.toggle("active", button.dataset.view === view);
  $("endpoints-view").hidden = view !== "endpoints";
  $("compare-view").hidden = view !== "compare";
  if (view === "compare") renderTargets();
}

async function started() {
  const session = state.session;
  $("tabs").hidden = false;
  $("logout").hidden = !state.auth;
  setView(state.view);
  await loadProviders();
  if (!current(session)) return;
  await refresh();
  // (a gateway process knows the dashboard's address once it has talked to the cluster)
  if (current(session) && $("dashboard-link").hidden) loadConfig();
}

// -- endpoints ----------------------------------------------------------------------
function stopRefresh() {
  clearTimeout(state.refreshTimer);
  state.refreshTimer = null;
}

async function refresh() {
  stopRefresh();
  if (state.auth && !token()) return;  // (logged out)
  const session = state.session;
  try {
    const { data, date } = await apiJson("GET", "/deployments", undefined, { what: "list the endpoints" });
    if (!current(session)) return;  // (an answer for a session that has ended)
    noteClock(date);
    state.deployments = data.deployments || [];
    renderDeployments();
    show($("endpoints-error"), "");
    $("refreshed").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    if (!current(session) || (e.status === 401 && state.auth)) return;  // (logged out)
    show($("endpoints-error"), `could not list the endpoints: ${e.message}`);
  }
  await refreshBudgets(session);
  stopRefresh();  // (one timer, whichever refresh ran last)
  state.refreshTimer = setTimeout(refresh, REFRESH_MS);
}

const DASH = "–";

// the client keys' budgets and what they spent (GET /usage: the whole cluster's books); the card shows only
// when there are budgeted keys or usage to show
async function refreshBudgets(session) {
  try {
    const { data } = await apiJson("GET", "/usage", undefined, { what: "the client keys' budgets and usage" });
    if (!current(session)) return;
    renderBudgets(data || {});
    show($("budgets-error"), "");
  } catch (e) {
    if (!current(session) || (e.status === 401 && state.auth)) return;  // (logged out)
    if (e.status === 404) { $("budgets-card").hidden = true; return; }  // (a gateway without budgets)
    $("budgets-card").hidden = false;
    show($("budgets-error"), `could not read the budgets: ${e.message}`);
  }
}

// one budget in words: "1 200 of 200 000, resets 00:00", with what calls in flight hold
function budgetWords(b, money) {
  if (!b) return [DASH];
  const fmt = (n) => money ? Number(n ?? 0).toFixed(2) : Number(n ?? 0).toLocaleString();
  const words = [`${fmt(b.used)} of ${fmt(b.limit)}`];
  if (Number(b.reserved) > 0) words.push(`${fmt(b.reserved)} held by calls in flight`);
  if (b.resets_at) words.push(`resets ${new Date(b.resets_at).toLocaleString()}`);
  return words;
}

function budgetCell(b, money) {
  const [first, ...more] = budgetWords(b, money);
  const over = b && Number(b.used) >= Number(b.limit);
  return el("td", { class: over ? "over" : undefined }, el("span", { text: first }),
    ...more.map((text) => el("span", { class: "sub", text })));
}

function renderBudgets(data) {
  const totals = new Map();  // client key -> {requests, tokens_in, tokens_out, spend} this month
  for (const r of data.usage || []) {
    const t = totals.get(r.client_key) || { requests: 0, tokens_in: 0, tokens_out: 0, spend: 0 };
    t.requests += r.requests || 0; t.tokens_in += r.tokens_in || 0; t.tokens_out += r.tokens_out || 0; t.spend += r.spend || 0;
    totals.set(r.client_key, t);
  }
  const budgets = new Map((data.budgets || []).map((b) => [b.client_key, b]));
  const names = [...new Set([...budgets.keys(), ...totals.keys()])].sort();
  $("budgets-card").hidden = names.length === 0;
  $("budgets-body").replaceChildren(...names.map((name) => {
    const b = budgets.get(name) || {}, t = totals.get(name);
    return el("tr", { dataset: { clientKey: name } },
      el("td", { class: "name", text: name }),
      budgetCell(b.tokens_per_day), budgetCell(b.tokens_per_month), budgetCell(b.spend_per_month, true),
      budgetCell(b.tokens_per_minute),
      el("td", { text: t ? `${plural(t.requests, "request")}, tokens ${t.tokens_in} in / ${t.tokens_out} out, ` +
          `spend ${t.spend.toFixed(2)}` : DASH }));
  }));
}


function fmtTime(epochS) {
  return epochS ? new Date(epochS * 1000).toLocaleTimeString() : DASH;
}

function statusCell(row) {
  const cell = el("td", { class: "status" }, el("span", { class: "badge " + (row.status || ""), text: row.status || "?" }));
  if (row.progress && (row.status === "DEPLOYING" || row.status === "UPDATING")) {
    const p = row.progress;
    cell.append(el("span", { class: "sub", text: `${p.workers_running ?? 0}/${p.workers ?? "?"} workers, ${p.elapsed_s ?? 0}s` }));
  }
  if (row.failure) {
    cell.append(el("span", { class: "sub error", text: `${row.failure.reason || "failed"}: ${row.failure.message || ""}` }));
  }
  return cell;
}

// "1 failure", "3 failures"
function plural(n, word, words = word + "s") {
  return `${n} ${n === 1 ? word : words}`;
}

// the gateway's time (its cooldowns are in its clock): this browser's, corrected when the two differ by more
// than the Date header's one-second steps and the call's time can explain
function noteClock(date) {
  const server = Date.parse(date || "");
  if (Number.isNaN(server)) return;
  const skew = (server - Date.now()) / 1000;
  state.clockSkewS = Math.abs(skew) > 3 ? skew : 0;
}

function gatewayNowS() {
  return Date.now() / 1000 + state.clockSkewS;
}

// a cooldown's words: until it ends, how long is left (whole seconds); then the next call may try
function coolingWords(untilS, nowS) {
  const left = Math.ceil(untilS - nowS);
  return left > 0 ? `cooling down, retry in ${left} s` : "ready to try again";
}

// an endpoint's health (GET /deployments' "health") in words a person reads: [what it is, failures];
// the API's own values (ok, cooling_down, probing, probe_due) are a contract and stay as they are
function healthWords(h, nowS) {
  let words;
  if (h.state === "ok") words = "healthy";
  else if (h.state === "cooling_down") words = h.cooldown_until ? coolingWords(h.cooldown_until, nowS) : "cooling down";
  else if (h.state === "probing") words = "trying one call";
  else if (h.state === "probe_due") words = "ready to try again";
  else words = String(h.state || "unknown").replace(/_/g, " ");
  const failures = Number(h.consecutive_failures) || 0;
  return failures ? [words, `${plural(failures, "failure")} in a row`] : [words];
}

function healthCell(row) {
  const h = row.health;
  if (!h) return el("td", { text: DASH });
  const [words, ...more] = healthWords(h, gatewayNowS());
  const until = h.state === "cooling_down" && h.cooldown_until ? h.cooldown_until : null;
  const badge = el("span", { class: "badge " + (h.state || ""), text: words,
    title: `state ${h.state}` + (until ? ` until ${fmtTime(until)}` : ""), dataset: until ? { until: String(until) } : {} });
  const cell = el("td", { class: "health" }, badge, ...more.map((text) => el("span", { class: "sub", text })));
  if (h.last_error) cell.append(el("span", { class: "sub error", text: "last error: " + (typeof h.last_error === "string" ? h.last_error : JSON.stringify(h.last_error)) }));
  return cell;
}

// the cooldowns' seconds left, counted down at each refresh (the rows themselves stay while their data does)
function tickCooldowns() {
  for (const badge of $("endpoints-body").querySelectorAll(".badge[data-until]")) {
    badge.textContent = coolingWords(Number(badge.dataset.until), gatewayNowS());
  }
}

// an endpoint's traffic in words: the endpoint's failures ("failed") apart from its callers' mistakes ("refused")
function trafficWords(t) {
  const requests = t.requests ?? 0, failed = t.errors ?? 0, refused = t.caller_errors ?? 0;
  const words = [plural(requests, "request") + (failed ? `, ${failed} failed` : "")];
  if (refused) words.push(`${refused} refused (the caller's ${refused === 1 ? "error" : "errors"})`);
  words.push(`tokens ${t.prompt_tokens ?? 0} in / ${t.completion_tokens ?? 0} out`);
  return words;
}

function trafficCell(row) {
  const t = row.traffic;
  if (!t) return el("td", { text: DASH });
  const [first, ...more] = trafficWords(t);
  return el("td", { class: "traffic", title: "failed: the endpoint, its provider or the gateway failed the call; " +
      "refused: the caller's mistake (a bad body, a key not allowed to use it, the caller's own rate limit); " +
      "since this gateway started" },
    el("span", { text: first }), ...more.map((text) => el("span", { class: "sub", text })));
}

// where an endpoint's workers run, in words: "2/2 on 127.0.0.1" (by node: an IP that two nodes share gets
// each node's short id), then why some are missing, and the custom resources each worker asks for
function workersWords(row) {
  const count = `${row.workers_running ?? DASH}/${row.workers ?? DASH}`;
  const running = (row.replicas || []).filter((r) => r.state === "RUNNING" && (r.node_ip || r.node_id));
  const ipsOf = new Map();  // ip -> node ids
  for (const r of running) ipsOf.set(r.node_ip || "?", new Set([...(ipsOf.get(r.node_ip || "?") || []), r.node_id || ""]));
  const nodes = [];
  for (const [ip, ids] of ipsOf) {
    if (ids.size > 1) nodes.push(...[...ids].sort().map((id) => `${ip} (${id.slice(0, 8)})`));
    else nodes.push(ip);
  }
  const words = [nodes.length ? `${count} on ${nodes.join(", ")}` : count];
  if (row.workers_missing) words.push(`${row.workers_missing.count} missing: ${row.workers_missing.why}`);
  const resources = Object.entries(row.resources || {});
  if (resources.length) words.push("each needs " + resources.map(([k, v]) => `${k} ${v}`).join(", "));
  return words;
}

function workersCell(row) {
  const [first, ...more] = workersWords(row);
  const title = (row.replicas || []).map((r) => `${r.state} on ${r.node_ip || "no node yet"}` +
      (r.node_id ? ` (node ${r.node_id.slice(0, 12)})` : "")).join("\n");
  return el("td", { class: "workers", title: title || undefined },
    el("span", { text: first }), ...more.map((text) => el("span", { class: "sub", text })));
}

// an endpoint's keys (GET /deployments' "keys": its pool, each key by fingerprint, never the key) in words:
// "sk-...a1b2 ok", "sk-...9f3e cooling down, back in 4 s", "sk-...77c1 disabled since 12:00:03: upstream_quota
// (insufficient_quota), checked again at 12:00:13", "weight 0 (drained)"
function keyWords(k, nowS) {
  let words;
  if (k.state === "cooling") words = k.until && k.until > nowS ? `cooling down, back in ${Math.ceil(k.until - nowS)} s` : "cooling down";
  else if (k.state === "disabled") {
    words = `disabled since ${fmtTime(k.since)}` + (k.reason ? `: ${k.reason}` : "");
    if (k.next_check) words += `, checked again at ${fmtTime(k.next_check)}`;
  } else words = String(k.state || "unknown").replace(/_/g, " ");
  if (k.weight === 0) words += ", weight 0 (drained)";
  else if (k.weight !== undefined && k.weight !== 1) words += `, weight ${k.weight}`;
  return `${k.fingerprint} ${words}`;
}

function keysCell(row) {
  const keys = Array.isArray(row.keys) ? row.keys : null;
  if (!keys || !keys.length) return el("td", { class: "mono", text: row.key_fingerprint || DASH });
  const nowS = gatewayNowS();
  const usable = keys.filter((k) => k.state !== "disabled" && k.weight !== 0).length;
  return el("td", { class: "keys", title: "the endpoint's key pool: calls go to healthy keys by weight; a key the " +
      "provider refuses (auth, quota) is disabled and checked again by itself; one rate limited cools down" },
    el("span", { text: keys.length === 1 ? "1 key" : `${usable} of ${keys.length} keys usable` }),
    ...keys.map((k) => el("span", { class: "sub mono" + (k.state === "disabled" ? " error" : ""), text: keyWords(k, nowS) })));
}

function deploymentRow(row) {
  const tr = el("tr", { dataset: { chatName: row.chat_name } },
    el("td", { class: "name", text: row.chat_name }),
    el("td", { text: row.provider || DASH }),
    el("td", { text: row.model || DASH }),
    el("td", { text: row.base_url_host || DASH }),
    workersCell(row),
    statusCell(row),
    healthCell(row),
    el("td", { text: (row.fallbacks || []).join(", ") || DASH }),
    keysCell(row),
    trafficCell(row),
    el("td", {}, el("button", { type: "button", class: "small danger", text: "Undeploy", onclick: () => undeploy(row, false) })));
  tr.dataset.json = JSON.stringify(row);
  return tr;
}

function renderDeployments() {
  const body = $("endpoints-body");
  const old = new Map([...body.children].map((tr) => [tr.dataset.chatName, tr]));
  const rows = state.deployments.map((row) => {
    const json = JSON.stringify(row);
    const tr = old.get(row.chat_name);
    return tr && tr.dataset.json === json ? tr : deploymentRow(row);  // unchanged rows stay as they are
  });
  body.replaceChildren(...rows);
  tickCooldowns();
  $("endpoints-empty").hidden = rows.length > 0;
  if (state.view === "compare") renderTargets();
}

async function undeploy(row, force) {
  if (!force && !window.confirm(`Undeploy ${row.chat_name}? Its replicas stop and its key is dropped.`)) return;
  const session = state.session;
  const body = force ? { chat_name: row.chat_name, force: true } : { chat_name: row.chat_name };
  $("undeploy-box").hidden = true;
  try {
    await apiJson("POST", `/${encodeURIComponent(row.provider)}/undeploy`, body, { what: `undeploy ${row.chat_name}` });
    if (!current(session)) return;
    show($("notice"), `${row.chat_name} undeployed`);
  } catch (e) {
    if (!current(session)) return;
    if (e.status === 409 && !force) {
      state.pendingUndeploy = row;
      $("undeploy-message").textContent = `${row.chat_name}: ${e.message}`;
      $("undeploy-box").hidden = false;
    } else {
      show($("endpoints-error"), `undeploy ${row.chat_name}: ${e.message}`);
    }
  }
  refresh();
}

// -- the deploy form, made from the provider's JSON schema -------------------------------------
async function loadProviders() {
  const session = state.session;
  try {
    const { data } = await apiJson("GET", "/providers", undefined, { what: "list the providers" });
    if (!current(session)) return;
    state.providers = data.providers || [];
  } catch (e) {
    if (!current(session) || (e.status === 401 && state.auth)) return;
    show($("deploy-error"), `could not read the providers (GET /providers): ${e.message}`);
    state.providers = [];
  }
  const select = $("deploy-provider");
  const chosen = select.value;
  select.replaceChildren(...state.providers.map((p) => el("option", { value: p.name, text: p.name })));
  if (chosen && state.providers.some((p) => p.name === chosen)) select.value = chosen;
  for (const p of state.providers) {
    for (const [name, prop] of Object.entries((p.schema && p.schema.properties) || {})) {
      if (isSecret(resolve(p.schema, prop))) SECRET_FIELDS.add(name);
    }
  }
  buildForm();
}

function currentProvider() {
  return state.providers.find((p) => p.name === $("deploy-provider").value);
}

// a property with its $ref and Optional (anyOf [X, null]) unwrapped: {type, ...}
function resolve(schema, prop) {
  let p = prop || {};
  for (let i = 0; i < 5 && p.$ref; i++) {
    const name = p.$ref.split("/").pop();
    p = { ...((schema.$defs || {})[name] || {}), ...p, $ref: undefined };
  }
  const alts = p.anyOf || p.oneOf;
  if (alts) {
    const real = alts.filter((a) => a.type !== "null");
    if (real.length === 1) {
      const inner = resolve(schema, real[0]);
      return { ...inner, ...p, anyOf: undefined, oneOf: undefined, type: inner.type, enum: inner.enum, items: inner.items, nullable: true };
    }
  }
  return p;
}

function isSecret(p) {
  return p.format === "password" || p.writeOnly === true;
}

function kindOf(p) {
  if (Array.isArray(p.enum)) return "enum";
  if (p.type === "boolean") return "boolean";
  if (p.type === "integer" || p.type === "number") return p.type;
  if (p.type === "array") return "list";
  if (p.type === "object") return "object";
  return "string";
}

function buildForm() {
  const provider = currentProvider();
  const required = $("deploy-fields");
  const optional = $("deploy-optional");
  required.replaceChildren();
  optional.replaceChildren();
  $("provider-kind").textContent = provider ? (provider.kind === "local" ? "a model run on this cluster" : "a hosted API (SaaS)") : "";
  if (!provider) return;
  const schema = provider.schema || {};
  const needed = new Set(schema.required || []);
  for (const [name, raw] of Object.entries(schema.properties || {})) {
    const field = makeField(name, resolve(schema, raw), needed.has(name));
    (needed.has(name) ? required : optional).append(field);
  }
}

function makeField(name, p, required) {
  const id = "f-" + name;
  const kind = kindOf(p);
  const wrap = el("div", { class: "field" + (kind === "boolean" ? " check" : ""), dataset: { field: name, kind } });
  const title = p.title || name;
  // (a default shows as the input's placeholder; lists say theirs here)
  const hint = [p.description, kind === "list" && Array.isArray(p.default) && p.default.length ? `default ${p.default.join(", ")}` : null]
    .filter(Boolean).join("; ");
  let input;
  if (kind === "boolean") {
    input = el("input", { id, type: "checkbox", name });
    input.checked = p.default === true;
    input.dataset.default = String(p.default === true);
    wrap.append(el("label", { for: id }, input, title, el("code", { class: "muted", text: " " + name })));
  } else {
    if (kind === "enum") {
      input = el("select", { id, name }, el("option", { value: "", text: p.default !== undefined ? `(default: ${p.default})` : "" }),
        ...p.enum.filter((v) => v !== null).map((v) => el("option", { value: String(v), text: String(v) })));
    } else if (kind === "object" || (kind === "string" && (p.maxLength || 0) > 4096)) {
      input = el("textarea", { id, name, rows: 2, spellcheck: "false", placeholder: kind === "object" ? '{"key": "value"}' : "" });
    } else if (kind === "integer" || kind === "number") {
      input = el("input", { id, name, type: "number", step: kind === "integer" ? "1" : "any", inputmode: "decimal" });
      const min = p.minimum ?? p.exclusiveMinimum;
      if (min !== undefined) input.min = String(min);
      if (p.maximum !== undefined) input.max = String(p.maximum);
    } else if (isSecret(p)) {
      input = el("input", { id, name, type: "password", autocomplete: "off", spellcheck: "false" });
      input.dataset.secret = "1";
    } else {
      input = el("input", { id, name, type: "text", spellcheck: "false", placeholder: kind === "list" ? "comma-separated" : "" });
    }
    if (p.default !== undefined && p.default !== null && kind !== "enum" && kind !== "list") input.placeholder = String(p.default);
    wrap.append(el("label", { for: id }, title, required ? el("span", { class: "req", text: " *" }) : null,
      el("code", { class: "muted", text: " " + name })), input);
  }
  if (hint) wrap.append(el("div", { class: "hint", text: hint }));
  wrap.append(el("div", { class: "error", hidden: true }));
  return wrap;
}

// the filled fields only, typed per the schema; throws {field, message} for what cannot be read
function formBody() {
  const body = {};
  for (const wrap of document.querySelectorAll("#deploy-form .field")) {
    const name = wrap.dataset.field;
    const kind = wrap.dataset.kind;
    const input = wrap.querySelector("input, select, textarea");
    if (kind === "boolean") {
      if (String(input.checked) !== input.dataset.default) body[name] = input.checked;
      continue;
    }
    const raw = input.dataset.secret ? input.value : input.value.trim();
    if (raw === "") continue;
    if (kind === "integer" || kind === "number") {
      const n = Number(raw);
      if (!Number.isFinite(n) || (kind === "integer" && !Number.isInteger(n))) throw { field: name, message: `${name} takes ${kind === "integer" ? "a whole number" : "a number"}` };
      body[name] = n;
    } else if (kind === "list") {
      body[name] = raw.split(",").map((s) => s.trim()).filter(Boolean);
    } else if (kind === "object") {
      try { body[name] = JSON.parse(raw); } catch (e) { throw { field: name, message: `${name} takes a JSON object` }; }
    } else {
      body[name] = raw;
    }
  }
  return body;
}

function clearFieldErrors() {
  for (const wrap of document.querySelectorAll("#deploy-form .field")) {
    wrap.classList.remove("invalid");
    show(wrap.querySelector(".error"), "");
  }
  show($("deploy-error"), "");
}

function fieldError(name, message) {
  const wrap = document.querySelector(`#deploy-form .field[data-field="${CSS.escape(name)}"]`);
  if (!wrap) return false;
  wrap.classList.add("invalid");
  show(wrap.querySelector(".error"), message);
  if (wrap.parentElement.id === "deploy-optional") $("deploy-more").open = true;
  return true;
}

// the part of the API's message ("a: ...; b is required; ...") that speaks of a field
function messageFor(field, message) {
  const parts = message.split("; ").filter((m) => m.startsWith(field) || m.includes(`'${field}'`));
  return parts.length ? parts.join("; ") : message;
}

function clearSecrets() {
  for (const input of document.querySelectorAll("#deploy-form [data-secret]")) input.value = "";
}

async function deploy(event) {
  event.preventDefault();
  clearFieldErrors();
  const provider = currentProvider();
  if (!provider) return;
  let body;
  try {
    body = formBody();
  } catch (e) {
    fieldError(e.field, e.message);
    return show($("deploy-error"), e.message);
  } finally {
    clearSecrets();  // the key is read once, sent, and forgotten: never shown or kept
  }
  const name = body.chat_name || "";
  // how long the gateway gives this deploy (the field sent, else the schema's default)
  const schema = provider.schema || {};
  const timeoutField = resolve(schema, (schema.properties || {}).deploy_timeout);
  const deployTimeoutS = Number(body.deploy_timeout ?? timeoutField.default) || 1800;
  const session = state.session;
  $("deploy-submit").disabled = true;
  show($("deploy-status"), `deploying ${name}...`);
  try {
    const { status, data } = await apiJson("POST", `/${encodeURIComponent(provider.name)}/deploy`, body, { what: `deploy ${name}` });
    body = null;
    if (!current(session)) return;
    if (status === 202) {
      show($("deploy-status"), `${data.chat_name}: DEPLOYING`);
      await followDeploy(data.chat_name, data.progress, deployTimeoutS);
    } else {
      show($("deploy-status"), `${data.chat_name}: ${data.status}${data.unchanged ? " (unchanged)" : ""}`);
    }
  } catch (e) {
    body = null;
    if (!current(session)) return;
    show($("deploy-status"), "");
    show($("deploy-error"), e.message);
    for (const field of e.error.fields || []) fieldError(String(field).split(".")[0], messageFor(String(field).split(".")[0], e.message));
  } finally {
    $("deploy-submit").disabled = false;
    if (current(session)) refresh();
  }
}

function showProgress(name, p, status) {
  $("deploy-progress").hidden = false;
  const workers = (p && p.workers) || 0;
  const running = (p && p.workers_running) || 0;
  $("deploy-progress-bar").max = Math.max(1, workers);
  $("deploy-progress-bar").value = running;
  $("deploy-progress-text").textContent = `${name}: ${status}, ${running}/${workers || "?"} workers running, ${p && p.elapsed_s !== undefined ? p.elapsed_s : "?"}s`;
}

// 202: poll GET /deployments/<name> every second until RUNNING or DEPLOY_FAILED, within the
// endpoint's deploy_timeout and a minute more (the gateway fails the deploy by then), and only
// as long as this session lasts
async function followDeploy(name, progress, deployTimeoutS) {
  const session = state.session;
  const deadline = performance.now() + (deployTimeoutS + 60) * 1000;
  showProgress(name, progress, "DEPLOYING");
  for (;;) {
    await new Promise((r) => setTimeout(r, POLL_MS));
    if (!current(session)) return;
    if (performance.now() > deadline) {
      show($("deploy-status"), "");
      show($("deploy-error"), `${name}: still not RUNNING after ${Math.round(deployTimeoutS + 60)}s: stopped watching (the endpoints list shows its status)`);
      return;
    }
    let row;
    try {
      ({ data: row } = await apiJson("GET", `/deployments/${encodeURIComponent(name)}`, undefined, { what: `watch ${name}` }));
    } catch (e) {
      if (current(session)) $("deploy-progress-text").textContent = `${name}: ${e.message}`;
      return;
    }
    if (!current(session)) return;
    if (row.status === "RUNNING") {
      showProgress(name, { workers: row.workers, workers_running: row.workers_running, elapsed_s: row.progress ? row.progress.elapsed_s : undefined }, "RUNNING");
      show($("deploy-status"), `${name}: RUNNING`);
      return;
    }
    if (row.status === "DEPLOY_FAILED" || row.status === "MISSING") {
      const f = row.failure || {};
      $("deploy-progress").hidden = true;
      show($("deploy-status"), "");
      show($("deploy-error"), `${name}: ${row.status}${f.reason ? " (" + f.reason + ")" : ""}${f.message ? ": " + f.message : ""}`);
      return;
    }
    showProgress(name, row.progress, row.status);
  }
}

// -- compare ------------------------------------------------------------------------------
function renderTargets() {
  const box = $("compare-targets");
  const signature = JSON.stringify(state.deployments.map((d) => [d.chat_name, d.provider, d.status]));
  if (box.dataset.signature === signature) return;  // unchanged: leave the boxes (and what is ticked) alone
  box.dataset.signature = signature;
  const ticked = new Set([...box.querySelectorAll("input:checked")].map((i) => i.value));
  box.replaceChildren(...state.deployments.map((row) => {
    const input = el("input", { type: "checkbox", value: row.chat_name, id: "t-" + row.chat_name });
    input.checked = ticked.has(row.chat_name);
    return el("label", { for: input.id }, input, row.chat_name,
      el("span", { class: "muted", text: ` ${row.provider || ""}${row.status && row.status !== "RUNNING" ? " (" + row.status + ")" : ""}` }));
  }));
  if (!state.deployments.length) box.append(el("span", { class: "muted", text: "no endpoints deployed" }));
}

function makeColumn(name) {
  const row = state.deployments.find((d) => d.chat_name === name) || {};
  const col = {
    name, started: performance.now(), done: false,
    meta: el("div", { class: "meta", text: [row.provider, row.model].filter(Boolean).join(" · ") }),
    text: document.createTextNode(""),  // the answer's one text node: each delta is appended to it
    tools: el("div", { class: "tools" }),  // the tool calls, beside the text (never erased by it)
    stats: el("div", { class: "stats", text: "waiting..." }),
  };
  col.answer = el("div", { class: "answer" }, col.text);
  col.node = el("div", { class: "column", dataset: { chatName: name } }, el("h3", { text: name }), col.meta, col.answer,
    col.tools, col.stats);
  return col;
}

function fmtUsage(u) {
  if (!u) return "tokens " + DASH;
  return `tokens ${u.prompt_tokens ?? DASH} in / ${u.completion_tokens ?? DASH} out / ${u.total_tokens ?? DASH} total`;
}

function finishColumn(col, ev) {
  col.done = true;
  const latency = ev.latency_ms ?? Math.round(performance.now() - col.started);
  const bits = [`${latency} ms`];
  if (ev.first_token_ms !== undefined) bits.push(`first token ${ev.first_token_ms} ms`);
  bits.push(fmtUsage(ev.usage));
  if (ev.attempts !== undefined) bits.push(`${ev.attempts} attempt${ev.attempts === 1 ? "" : "s"}`);
  if (ev.served_by && ev.served_by !== col.name) bits.push(`served by ${ev.served_by}`);
  if (ev.finish_reason) bits.push(`finish: ${ev.finish_reason}`);
  col.stats.textContent = bits.join(" · ");
  if (ev.provider || ev.model) col.meta.textContent = [ev.provider, ev.model].filter(Boolean).join(" · ");
  col.node.dataset.done = "finish";
}

function failColumn(col, ev) {
  col.done = true;
  const err = ev.error || {};
  col.node.classList.add("failed");
  col.answer.append(el("div", { class: "error", text: `${err.type || "error"}: ${err.message || ""}` }));
  const latency = ev.latency_ms ?? Math.round(performance.now() - col.started);
  col.stats.textContent = `${latency} ms · error`;
  col.node.dataset.done = "error";
}

function applyEvent(columns, event, ev) {
  const col = columns.get(ev.chat_name);
  if (!col) {  // an error for the whole stream: every unanswered column gets it
    if (event === "error" || ev.error) for (const c of columns.values()) if (!c.done) failColumn(c, ev);
    return;
  }
  if (event === "error" || ev.error) return failColumn(col, ev);
  if (typeof ev.delta === "string") col.text.appendData(ev.delta);
  if (ev.tool_calls) col.tools.append(el("pre", { class: "mono", text: JSON.stringify(ev.tool_calls, null, 1) }));
  if (ev.finish_reason !== undefined || ev.usage) finishColumn(col, ev);
}

// Server-sent events from a fetch body: "event: x" / "data: y" lines, a blank line ends one.
async function readSSE(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
    let cut;
    while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
      let event = "message";
      const data = [];
      for (const line of block.split(/\r?\n/)) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (!data.length) continue;
      const text = data.join("\n");
      if (text === "[DONE]") return true;
      let payload;
      try { payload = JSON.parse(text); } catch (e) { continue; }
      onEvent(event, payload);
    }
    if (done) return false;
  }
}

async function ask(event) {
  event.preventDefault();
  const names = [...$("compare-targets").querySelectorAll("input:checked")].map((i) => i.value);
  const prompt = $("compare-prompt").value;
  const system = $("compare-system").value.trim();
  if (!names.length) return show($("compare-error"), "tick at least one endpoint");
  if (!prompt.trim()) return show($("compare-error"), "write a prompt");
  show($("compare-error"), "");
  const messages = [...(system ? [{ role: "system", content: system }] : []), { role: "user", content: prompt }];
  const columns = new Map(names.map((n) => [n, makeColumn(n)]));
  $("compare-columns").replaceChildren(...[...columns.values()].map((c) => c.node));
  $("compare-columns").dataset.mode = "";
  const abort = new AbortController();
  const session = state.session;
  state.compareAbort = abort;
  $("compare-ask").disabled = true;
  $("compare-stop").disabled = false;
  show($("compare-status"), "asking...");
  try {
    const body = { chat_names: names, messages, stream: true };
    const response = await api("POST", "/chat/broadcast", body, { what: "ask " + names.join(", "), signal: abort.signal });
    const type = response.headers.get("Content-Type") || "";
    if (!response.ok) {
      let data = null;
      try { data = await response.json(); } catch (e) { data = null; }
      if (response.status === 401 && state.auth) return loggedOut("the admin token was refused (401): log in again");
      throw new ApiError(response.status, data && data.error);
    }
    if (!type.startsWith("text/event-stream")) throw new ApiError(response.status, { message: `expected a stream of events, got ${type || "no Content-Type"}` });
    $("compare-columns").dataset.mode = "stream";
    const complete = await readSSE(response, (ev, payload) => applyEvent(columns, ev, payload));
    for (const c of columns.values()) if (!c.done) failColumn(c, { error: { type: "incomplete", message: complete ? "no answer in the stream" : "the stream ended early" } });
    show($("compare-status"), "done");
  } catch (e) {
    if (!current(session)) return;  // (logged out: the columns are gone)
    if (e.name === "AbortError") {
      for (const c of columns.values()) if (!c.done) failColumn(c, { error: { type: "stopped", message: "stopped" } });
      show($("compare-status"), "stopped");
    } else {
      show($("compare-status"), "");
      show($("compare-error"), e.message);
      for (const c of columns.values()) if (!c.done) failColumn(c, { error: e.error || { message: e.message } });
    }
  } finally {
    state.compareAbort = null;
    $("compare-ask").disabled = false;
    $("compare-stop").disabled = true;
  }
}

// -- start ----------------------------------------------------------------------------------
// GET /ui/config: {dashboard_url, auth}; the dashboard's URL only with the admin token (as /readyz's details)
async function loadConfig() {
  const session = state.session;
  let config = { dashboard_url: null, auth: true };
  const headers = token() ? { Authorization: "Bearer " + token() } : {};
  try {
    const response = await fetch("/ui/config", { cache: "no-store", credentials: "omit", headers });
    if (response.ok) config = await response.json();
  } catch (e) { /* keep the defaults: ask for a token */ }
  if (current(session) && config.dashboard_url && /^https?:\/\//i.test(config.dashboard_url)) {
    $("dashboard-link").href = config.dashboard_url;
    $("dashboard-link").hidden = false;
  }
  return config;
}

async function main() {
  $("gateway-name").textContent = "LLM gateway · " + window.location.host;
  document.title = "LLM gateway console · " + window.location.host;
  $("login-form").addEventListener("submit", login);
  $("logout").addEventListener("click", logout);
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => setView(tab.dataset.view));
  $("deploy-provider").addEventListener("change", () => { clearFieldErrors(); buildForm(); });
  $("deploy-form").addEventListener("submit", deploy);
  $("compare-form").addEventListener("submit", ask);
  $("compare-stop").addEventListener("click", () => state.compareAbort && state.compareAbort.abort());
  $("undeploy-force").addEventListener("click", () => { const row = state.pendingUndeploy; state.pendingUndeploy = null; if (row) undeploy(row, true); });
  $("undeploy-cancel").addEventListener("click", () => { state.pendingUndeploy = null; $("undeploy-box").hidden = true; });

  const config = await loadConfig();
  state.auth = Boolean(config.auth);
  if (!state.auth || token()) {
    // no admin token on the gateway (loopback dev mode), or already logged in in this tab
    try {
      await apiJson("GET", "/deployments", undefined, { record: false });
      return started();
    } catch (e) {
      if (e.status !== 401) return started();  // (the endpoints view says what went wrong)
      if (state.auth) return;  // a token this gateway no longer takes: apiJson showed the login
      state.auth = true;  // (the gateway has a token after all)
    }
  }
  loggedOut("");
}

document.addEventListener("DOMContentLoaded", main);
