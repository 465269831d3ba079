// xraytpu prediction page: reads the model card (GET /v1/model), sends each
// chosen or dropped file to POST /v1/predict and shows the answer. Plain DOM,
// no framework, no build step; server text only ever goes through textContent.
"use strict";

const MAX_PARALLEL = 4;  // uploads in flight at once; the server batches them for the model
let card = null;
let queue = [];
let active = 0;

function $(sel, root = document) { return root.querySelector(sel); }

// Access (xraytpu.serve --auth_token_file): the page's own files load without a token; every
// API call goes through api(), which sends "Authorization: Bearer <token>". The token is asked
// for once, kept in this tab (sessionStorage: gone when the tab closes, never sent elsewhere)
// and asked for again when the server answers 401. Calls that get 401 together share one question.
const TOKEN_KEY = "xraytpu.access_token";
let memoryToken = "";   // when sessionStorage is unavailable
let asking = null;      // the pending question, a promise of the next token

function currentToken() {
  try { return sessionStorage.getItem(TOKEN_KEY) || ""; } catch (e) { return memoryToken; }
}

function setToken(token) {
  memoryToken = token;
  try {
    if (token) sessionStorage.setItem(TOKEN_KEY, token); else sessionStorage.removeItem(TOKEN_KEY);
  } catch (e) { /* memoryToken holds it */ }
  $("#forget-token").hidden = !token;
}

function askToken(message) {
  if (!asking) {
    asking = new Promise((resolve) => {
      const input = $("#token-input");
      $("#token-message").textContent = message;
      $("#access").hidden = false;
      input.value = "";
      input.focus();
      $("#token-form").onsubmit = (e) => {
        e.preventDefault();
        const token = input.value.trim();
        if (!token) return;
        input.value = "";
        setToken(token);
        $("#access").hidden = true;
        asking = null;
        resolve(token);
      };
    });
  }
  return asking;
}

async function api(url, options = {}) {
  for (;;) {
    const token = currentToken();
    const headers = new Headers(options.headers || {});
    if (token) headers.set("Authorization", `Bearer ${token}`);
    const resp = await fetch(url, { ...options, headers });
    if (resp.status !== 401) return resp;
    if (currentToken() === token) {   // else another call already holds a newer token: retry with it
      setToken("");
      await askToken(token ? "The server refused this token; enter another one."
                           : "This server needs an access token.");
    }
  }
}

// Numbers as the reports print them (Python's f"{x:.3f}"): an exact tie rounds to
// even, so AUC 9/16 = 0.5625 reads 0.562 here and in report.md (toFixed says 0.563).
function fmt(x, digits = 3) {
  if (x === null || x === undefined) return "n/a";
  const v = Number(x);
  const scaled = v * 10 ** digits;
  if (Number.isFinite(scaled) && Math.abs(scaled % 1) === 0.5 && Math.ceil(Math.abs(scaled)) % 2 === 1) {
    return (Math.sign(v) * Math.floor(Math.abs(scaled)) / 10 ** digits).toFixed(digits);
  }
  return v.toFixed(digits);
}

function fmtCi(value, ci) {
  if (value === null || value === undefined) return "n/a";
  let s = fmt(value);
  if (Array.isArray(ci) && ci[0] !== null && ci[1] !== null) s += ` (95% CI ${fmt(ci[0])}–${fmt(ci[1])})`;
  return s;
}

function addNote(text) {
  const li = document.createElement("li");
  li.textContent = text;
  $("#card-notes").appendChild(li);
}

function thresholdText(c) {
  if (c.task === "multi_label") {
    const ts = Object.entries(c.thresholds || {}).map(([f, t]) => `${f} ≥ ${fmt(t, 3)}`).join(", ");
    let s = `each finding when its probability reaches its own threshold (${ts}); policy ${c.threshold_policy}`;
    s += c.threshold_source_split ? `, chosen on the ${c.threshold_source_split} split` : ", not chosen on data";
    return s;
  }
  if (c.threshold === null || c.threshold === undefined) return "highest probability (argmax over classes)";
  let s = `${c.positive_class} when P(${c.positive_class}) ≥ ${fmt(c.threshold, 4)}; policy ${c.threshold_policy}`;
  s += c.threshold_source_split ? `, chosen on the ${c.threshold_source_split} split` : ", not chosen on data";
  if (c.threshold_source_dataset) s += ` of ${c.threshold_source_dataset}`;
  return s;
}

function renderCard(c) {
  card = c;
  $("#model-name").textContent = `${c.model} (run ${c.run})`;
  $("#model-classes").textContent = c.classes.join(", ");
  $("#model-input").textContent = `${c.input.size}×${c.input.size} px, ${c.input.channels} channel(s), ${c.input.aspect}`;
  const td = c.training_data || {};
  const parts = Object.entries(td.splits || {}).map(([name, s]) => `${name} ${s.num_examples}`);
  $("#training-data").textContent = `${td.dataset || "unknown"}` + (parts.length ? ` (${parts.join(", ")} images)` : "");
  const ev = c.evaluation;
  if (ev) {
    const macro = c.task === "multi_label" ? `macro AUC over ${c.classes.length} findings` : "AUC";
    let s = `${macro} ${fmtCi(ev.auc, ev.auc_ci)} on ${ev.num_examples} ${ev.split} images of ${ev.dataset}`;
    if (c.task === "binary") {
      s += `; at the threshold: sensitivity ${fmtCi(ev.sensitivity, ev.sensitivity_ci)}, specificity ${fmtCi(ev.specificity, ev.specificity_ci)}`;
    }
    $("#test-auc").textContent = s;
    (ev.notes || []).forEach(addNote);
  } else {
    $("#test-auc").textContent = "not evaluated: run python -m xraytpu.evaluate; these probabilities have no measured accuracy";
  }
  $("#threshold").textContent = thresholdText(c);
  if (c.threshold_note) addNote(c.threshold_note);
  if (c.limits) {
    $("#limits").textContent = `Up to ${c.limits.max_upload_mb} MiB and ${c.limits.max_pixels.toLocaleString()} pixels per image.`;
  }
  if (c.disclaimer) $("#disclaimer").textContent = c.disclaimer;
  $("#card-status").hidden = true;
  $("#card-facts").hidden = false;
}

function newResult(file) {
  const node = $("#result-template").content.firstElementChild.cloneNode(true);
  node.dataset.filename = file.name;
  $(".filename", node).textContent = file.name;
  const img = $(".original img", node);
  img.src = URL.createObjectURL(file);
  img.addEventListener("error", () => { $(".original", node).hidden = true; });
  $("#results").prepend(node);
  $("#empty").hidden = true;
  return node;
}

function showError(node, message) {
  node.dataset.state = "error";
  $(".summary", node).hidden = true;
  $(".body", node).hidden = true;
  const p = $(".error", node);
  p.textContent = message;
  p.hidden = false;
}

function showPrediction(node, p) {
  const label = $(".label", node);
  const multi = Array.isArray(p.findings);
  label.textContent = multi ? (p.findings.length ? p.findings.join(", ") : p.label) : p.label;
  label.dataset.label = p.label;
  if (card && card.positive_class) label.classList.add(p.label === card.positive_class ? "positive" : "negative");
  if (multi) label.classList.add(p.findings.length ? "positive" : "negative");
  $(".summary", node).textContent = p.summary;
  const tbody = $(".probs tbody", node);
  for (const [cls, value] of Object.entries(p.probabilities)) {
    const tr = document.createElement("tr");
    if (multi ? p.findings.includes(cls) : cls === p.label) tr.className = "predicted";
    const name = document.createElement("td");
    name.textContent = cls;
    const prob = document.createElement("td");
    prob.className = "prob";
    prob.dataset.class = cls;
    prob.dataset.value = String(value);  // full precision, for programs reading the page
    prob.textContent = fmt(value, 4);
    if (multi && p.thresholds) prob.title = `threshold ${fmt(p.thresholds[cls], 3)}`;
    const barCell = document.createElement("td");
    const meter = document.createElement("meter");
    meter.min = 0; meter.max = 1; meter.value = value;
    barCell.appendChild(meter);
    tr.append(name, prob, barCell);
    tbody.appendChild(tr);
  }
  $(".probs", node).hidden = false;
  if (p.gradcam_png_base64) {
    $(".gradcam img", node).src = "data:image/png;base64," + p.gradcam_png_base64;
    $(".gradcam", node).hidden = false;
  }
  $(".threshold-line", node).textContent = card ? "Label rule: " + thresholdText(card) : "";
  node.dataset.state = "done";
}

async function predict(file, node) {
  if (card && card.limits && file.size > card.limits.max_upload_mb * 1048576) {
    showError(node, `${file.name} is ${(file.size / 1048576).toFixed(1)} MiB, over the server's limit of ${card.limits.max_upload_mb} MiB`);
    return;
  }
  const form = new FormData();
  form.append("file", file, file.name);
  const url = "/v1/predict" + ($("#gradcam").checked ? "?gradcam=1" : "");
  try {
    const resp = await api(url, { method: "POST", body: form });
    let body = null;
    try { body = await resp.json(); } catch (e) { body = null; }
    if (!resp.ok || !body) {
      showError(node, (body && body.error) ? body.error : `server answered ${resp.status}`);
      return;
    }
    showPrediction(node, body.predictions[0]);
  } catch (e) {
    showError(node, `could not reach the server (${e.message})`);
  }
}

function pump() {
  while (active < MAX_PARALLEL && queue.length) {
    const [file, node] = queue.shift();
    active += 1;
    predict(file, node).finally(() => { active -= 1; pump(); });
  }
}

function addFiles(files) {
  for (const file of files) queue.push([file, newResult(file)]);
  pump();
}

async function toggleModelCard(e) {
  e.preventDefault();
  const pre = $("#model-card-text");
  if (!pre.hidden) { pre.hidden = true; return; }
  try {
    const resp = await api("/v1/model_card.md");
    pre.textContent = resp.ok ? await resp.text() : `The server answered ${resp.status}.`;
  } catch (err) {
    pre.textContent = `Could not load the model card (${err.message}).`;
  }
  pre.hidden = false;
}

function setup() {
  $("#forget-token").hidden = !currentToken();
  $("#forget-token").addEventListener("click", () => setToken(""));
  $("#model-card-link").addEventListener("click", toggleModelCard);
  api("/v1/model").then((r) => r.json()).then(renderCard).catch((e) => {
    $("#card-status").textContent = `Could not load the model card (${e.message}).`;
  });
  const input = $("#file-input");
  input.addEventListener("change", () => { addFiles(Array.from(input.files)); input.value = ""; });
  // A file dropped beside the zone must not make the browser navigate away.
  for (const ev of ["dragover", "drop"]) document.addEventListener(ev, (e) => e.preventDefault());
  const zone = $("#dropzone");
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    addFiles(Array.from(e.dataTransfer.files));
  });
  zone.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); } });
  $("#clear").addEventListener("click", () => {
    for (const img of document.querySelectorAll("#results img")) if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
    $("#results").replaceChildren();
    $("#empty").hidden = false;
  });
}

document.addEventListener("DOMContentLoaded", setup);
