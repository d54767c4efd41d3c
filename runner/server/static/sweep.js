// The sweep page: the form (or the YAML) becomes the run's config, checked by the server as it is edited
// (POST /api/sweeps?dry_run=1: the planned images, the time at this server's rate, one line per problem beside
// its field), queued on submit (then the run's live viewer opens); the table lists this key's sweeps.
"use strict";

const form = document.getElementById("sweep-form");
const yamlBox = document.getElementById("yaml");
const plan = document.getElementById("plan");
let mode = "form";
let timer = null;

function list(text) {  // "a, b" or one a line -> values (numbers where they are numbers)
  return text.split(/[\n,]/).map((s) => s.trim()).filter((s) => s !== "")
    .map((s) => (s !== "" && !isNaN(Number(s)) ? Number(s) : s));
}

function loraSets(text) {
  return text.split("\n").map((s) => s.trim()).filter((s) => s !== "").map((line) =>
    line.toLowerCase() === "none" ? [] : line.split(",").map((s) => s.trim()).filter((s) => s).map((item) => {
      const at = item.lastIndexOf(":");
      const scale = at > 0 ? Number(item.slice(at + 1)) : NaN;
      return isNaN(scale) ? { source: item } : { source: item.slice(0, at), scale: scale };
    }));
}

function formConfig() {
  const f = form.elements;
  const cfg = { prompts: f.prompts.value.split("\n").map((s) => s.trim()).filter((s) => s) };
  if (f.negative_prompt.value.trim()) cfg.negative_prompt = f.negative_prompt.value.trim();
  cfg.seeds = list(f.seeds.value);
  const models = [...form.querySelectorAll("input[name=models]:checked")].map((i) => i.value);
  if (models.length) cfg.models = models;
  const sets = loraSets(f.lora_sets.value);
  if (sets.length) cfg.lora_sets = sets;
  for (const key of ["lora_scales", "steps", "guidance_scale", "scheduler", "schedule", "width", "height"]) {
    const values = list(f[key].value);
    if (values.length) cfg[key] = values.length === 1 ? values[0] : values;
  }
  return cfg;
}

function toYaml(cfg) {  // JSON values are YAML: one key a line
  return Object.entries(cfg).map(([k, v]) => `${k}: ${JSON.stringify(v)}`).join("\n") + "\n";
}

function body() {
  return mode === "form" ? { config: formConfig() } : { yaml: yamlBox.value };
}

function showErrors(errors) {
  for (const el of document.querySelectorAll(".field-error")) el.textContent = "";
  for (const e of errors) {
    let el = mode === "form" ? document.querySelector(`.field-error[data-for="${e.field}"]`) : null;
    if (!el) el = document.getElementById("yaml-error");
    el.textContent = (el.textContent ? el.textContent + "\n" : "") + e.message;
  }
}

async function post(url, data) {
  const r = await fetch(url, { method: "POST", headers: { "Content-Type": "application/json" },
                               body: JSON.stringify(data) });
  let json = {};
  try { json = await r.json(); } catch (e) { json = { detail: `HTTP ${r.status}` }; }
  return [r, json];
}

async function check() {
  const [r, json] = await post("/api/sweeps?dry_run=1", body());
  if (!r.ok) {
    showErrors(json.errors || [{ field: "yaml", message: json.detail }]);
    plan.textContent = "Not valid yet: see the lines in red.";
    plan.dataset.planned = "";
    return;
  }
  showErrors([]);
  const eta = json.estimate_s == null ? "no images/s measured on this server yet"
    : `about ${Math.max(1, Math.round(json.estimate_s))} s at this server's ` +
      `${json.images_per_second.toFixed(2)} images/s`;
  plan.textContent = `${json.planned} images planned (${json.models.join(", ")}); ${eta}`;
  plan.dataset.planned = json.planned;
}

function later() {
  clearTimeout(timer);
  timer = setTimeout(check, 300);
}

form.addEventListener("input", later);
for (const radio of document.querySelectorAll("input[name=mode]")) {
  radio.addEventListener("change", () => {
    mode = radio.value;
    if (mode === "yaml" && radio.checked) yamlBox.value = toYaml(formConfig());
    document.getElementById("form-fields").hidden = mode !== "form";
    document.getElementById("yaml-fields").hidden = mode !== "yaml";
    form.dataset.mode = mode;
    later();
  });
}

form.addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const [r, json] = await post("/api/sweeps", body());
  if (r.status !== 202) {
    showErrors(json.errors || [{ field: "yaml", message: json.detail }]);
    return;
  }
  window.location.href = json.viewer;
});

async function act(url) {
  await fetch(url, { method: url.endsWith("/resume") ? "POST" : "DELETE" });
  refresh();
}

async function refresh() {
  const r = await fetch("/api/sweeps");
  if (!r.ok) return;
  const tbody = document.querySelector("#sweeps tbody");
  tbody.replaceChildren(...(await r.json()).sweeps.map((s) => {
    const tr = document.createElement("tr");
    tr.className = "sweep";
    tr.dataset.id = s.id;
    tr.dataset.status = s.status;
    const link = document.createElement("a");
    link.href = s.viewer || "#";
    link.textContent = s.run_dir;
    const cells = [link, `${s.done} / ${s.total}`, s.status + (s.error ? ` (${s.error})` : "")];
    for (const c of cells) {
      const td = document.createElement("td");
      td.append(c);
      tr.append(td);
    }
    const td = document.createElement("td");
    if (!["done", "error", "cancelled", "interrupted"].includes(s.status)) {
      const b = document.createElement("button");
      b.textContent = "Cancel";
      b.className = "cancel";
      b.addEventListener("click", () => act(s.url));
      td.append(b);
    } else if (s.resumable) {
      const b = document.createElement("button");
      b.textContent = "Resume";
      b.className = "resume";
      b.addEventListener("click", () => act(s.url + "/resume"));
      td.append(b);
    }
    tr.append(td);
    return tr;
  }));
}

check();
refresh();
setInterval(refresh, 1500);
