// Submit the form through the JSON API so the page can show progress; without JS the form posts to /submit.
"use strict";
(function () {
  const form = document.getElementById("gen-form");
  const status = document.getElementById("status");
  const statusText = document.getElementById("status-text");
  const bar = document.getElementById("progress");
  const result = document.getElementById("result");
  const button = document.getElementById("submit");

  function show(text, isError) {
    status.hidden = false;
    statusText.textContent = text;
    statusText.className = isError ? "error" : "";
  }

  function resetProgress() {
    bar.value = 0;
    bar.max = 1;
  }

  function render(job) {
    result.replaceChildren();
    const loras = document.createElement("p");
    loras.className = "loras";
    loras.textContent = "LoRAs: " + (job.loras.length ? job.loras.map(function (lo) {
      return lo.name + " \u00d7" + lo.scale + " (" + lo.source + (lo.weight_name ? ", " + lo.weight_name : "") + ")";
    }).join(", ") : "none");
    result.appendChild(loras);
    job.images.forEach(function (url, k) {
      const fig = document.createElement("figure");
      const link = document.createElement("a");
      link.href = url;
      const img = document.createElement("img");
      img.src = url;
      img.alt = "seed " + job.seeds[k];
      img.className = "result-image";
      link.appendChild(img);
      const cap = document.createElement("figcaption");
      cap.textContent = "seed " + job.seeds[k];
      fig.append(link, cap);
      result.appendChild(fig);
    });
    if (job.viewer) {
      const p = document.createElement("p");
      const a = document.createElement("a");
      a.id = "viewer-link";
      a.href = job.viewer;
      a.textContent = "Open the run in the viewer";
      p.append(a, " · ");
      const all = document.createElement("a");
      all.href = "/runs";
      all.textContent = "all runs";
      p.appendChild(all);
      result.appendChild(p);
    }
  }

  async function detail(resp) {
    try { return (await resp.json()).detail; } catch (e) { return resp.status + " " + resp.statusText; }
  }

  async function poll(id) {
    for (;;) {
      const resp = await fetch("/api/jobs/" + id);
      if (!resp.ok) { resetProgress(); show(await detail(resp), true); return; }
      const job = await resp.json();
      bar.max = job.total;
      bar.value = job.done;
      if (job.status === "queued") show("queued (position " + job.queue_position + ")");
      else if (job.status === "running") show("running: " + job.progress + " images");
      else if (job.status === "done") { show("done: " + job.progress + " images"); render(job); return; }
      else { resetProgress(); show(job.error || "failed", true); render(job); return; }
      await new Promise(function (r) { setTimeout(r, 300); });
    }
  }

  // Per model: disable the fields its family does not use (with the hint) and show its default settings
  const model = document.getElementById("modelid");
  const familyNote = document.getElementById("family-note");
  function applyModel() {
    const opt = model.options[model.selectedIndex];
    if (!opt) return;
    const unused = JSON.parse(opt.dataset.unused || "{}");
    const defaults = JSON.parse(opt.dataset.defaults || "{}");
    ["negative_prompt", "guidance_scale", "true_cfg_scale"].forEach(function (name) {
      const field = form.elements[name];
      if (!field) return;
      field.disabled = name in unused;
      field.title = unused[name] || "";
      const hint = form.querySelector('[data-hint-for="' + name + '"]');
      if (hint) hint.textContent = unused[name] || "";
    });
    const fields = {inference_steps: "steps", guidance_scale: "guidance_scale", true_cfg_scale: "true_cfg_scale"};
    Object.keys(fields).forEach(function (name) {
      const value = defaults[fields[name]];
      if (form.elements[name]) form.elements[name].value = value === undefined || value === null ? "" : value;
    });
    familyNote.textContent = "Family: " + opt.textContent.replace(/^.*\(|\)$/g, "");
  }
  if (model) model.addEventListener("change", applyModel);

  form.addEventListener("submit", async function (event) {
    event.preventDefault();
    const body = Object.fromEntries(new FormData(form).entries());
    button.disabled = true;
    result.replaceChildren();
    resetProgress();  // a new job starts at 0, whatever the last one reached
    show("submitting…");
    try {
      const resp = await fetch("/api/jobs", {
        method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
      });
      if (!resp.ok) { show(await detail(resp), true); return; }
      await poll((await resp.json()).id);
    } catch (e) {
      resetProgress();
      show(String(e), true);
    } finally {
      button.disabled = false;
    }
  });
})();
