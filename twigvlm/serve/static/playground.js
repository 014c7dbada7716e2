// The twigvlm playground: sends one streamed chat request to /v1/chat/completions with the TTP and SSD
// toggles as extra fields, shows the text as it streams, the request's stats, and the image with the visual
// tokens the server kept (its twigvlm.kept_indices and image_grids) drawn over it.
// Query parameters for automation: ?sample=1 loads the built-in picture, ?autorun=1 sends at once,
// ?prompt=..., ?ttp=0, ?ssd=0, ?max_tokens=N, ?keep_ratio=F. The page sets body[data-state] to running, done or
// error, and #answer[data-chunks] to the number of content chunks it received.
"use strict";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
let imageURL = null; // data: URL of the chosen image
let modelId = null;

function drawImage(kept, grids) {
  const canvas = $("view");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (!imageURL) return Promise.resolve();
  return new Promise((resolve) => {
    const img = new Image();
    img.onload = () => {
      ctx.drawImage(img, 0, 0, canvas.width, canvas.height); // the tower sees a resized square
      let dimmed = 0;
      if (kept && grids && grids.length) {
        const keep = new Set(kept);
        const g = grids[0]; // the page sends one image
        const w = canvas.width / g.cols, h = canvas.height / g.rows;
        ctx.fillStyle = "rgba(0, 0, 0, 0.72)";
        for (let r = 0; r < g.rows; r++) {
          for (let c = 0; c < g.cols; c++) {
            if (!keep.has(g.lead + r * g.cols + c)) {
              ctx.fillRect(c * w, r * h, w, h);
              dimmed++;
            }
          }
        }
        ctx.strokeStyle = "#ffd400";
        ctx.lineWidth = 1.5;
        for (let r = 0; r < g.rows; r++) {
          for (let c = 0; c < g.cols; c++) {
            if (keep.has(g.lead + r * g.cols + c)) ctx.strokeRect(c * w + 1, r * h + 1, w - 2, h - 2);
          }
        }
      }
      canvas.dataset.dimmed = String(dimmed);
      resolve();
    };
    img.src = imageURL;
  });
}

function samplePicture() {
  // A small picture of shapes, drawn here so the page works without a file.
  const c = document.createElement("canvas");
  c.width = c.height = 192;
  const ctx = c.getContext("2d");
  ctx.fillStyle = "#e8e8e8";
  ctx.fillRect(0, 0, 192, 192);
  ctx.fillStyle = "#d62828";
  ctx.beginPath();
  ctx.arc(56, 60, 30, 0, 2 * Math.PI);
  ctx.fill();
  ctx.fillStyle = "#1d4ed8";
  ctx.fillRect(110, 110, 56, 56);
  return c.toDataURL("image/png");
}

function setStat(id, value) {
  $(id).textContent = value;
}

function showStats(s, tokens, seconds, ttft) {
  setStat("tps", seconds > 0 ? (tokens / seconds).toFixed(1) : "–");
  setStat("acc", s.acceptance_rate == null ? "off" : (100 * s.acceptance_rate).toFixed(0) + "%");
  setStat("tpv", s.tokens_per_verification == null ? "–" : s.tokens_per_verification.toFixed(2));
  setStat("kept", s.kept == null ? (s.visual_tokens ? "all " + s.visual_tokens : "–") : s.kept + " / " + s.visual_tokens);
  setStat("ttft", ttft == null ? "–" : (1000 * ttft).toFixed(0) + " ms");
  setStat("prefill", (1000 * s.prefill_s).toFixed(0) + " ms");
  setStat("decode", (1000 * s.decode_s).toFixed(0) + " ms");
  setStat("finish", s.finish_reason);
}

function requestBody() {
  const content = [];
  if (imageURL) content.push({ type: "image_url", image_url: { url: imageURL } });
  content.push({ type: "text", text: $("prompt").value });
  const body = {
    model: modelId,
    messages: [{ role: "user", content }],
    stream: true,
    stream_options: { include_usage: true },
    temperature: 0,
    max_completion_tokens: parseInt($("max_tokens").value, 10),
    speculative: $("ssd").checked,
    prune: $("ttp").checked && imageURL ? "twig" : "none",
  };
  if (body.prune !== "none") body.keep_ratio = parseFloat($("keep_ratio").value);
  return body;
}

async function send() {
  $("go").disabled = true;
  $("answer").textContent = "";
  $("answer").dataset.chunks = "0";
  $("error").textContent = "";
  document.body.dataset.state = "running";
  await drawImage(null, null);
  const headers = { "Content-Type": "application/json" };
  if ($("key").value) headers["Authorization"] = "Bearer " + $("key").value;
  const t0 = performance.now();
  let ttft = null, tokens = 0, stats = null;
  try {
    const response = await fetch("v1/chat/completions", { method: "POST", headers, body: JSON.stringify(requestBody()) });
    if (!response.ok) throw new Error((await response.json()).error.message);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "", event = null, done = false;
    while (!done) {
      const { value, done: end } = await reader.read();
      if (end) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, cut).trimEnd();
        buffer = buffer.slice(cut + 1);
        if (line.startsWith("event: ")) event = line.slice(7);
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") { done = true; break; }
        const msg = JSON.parse(data);
        if (event === "error" || msg.error) throw new Error(msg.error.message);
        if (msg.usage) tokens = msg.usage.completion_tokens;
        for (const choice of msg.choices || []) {
          if (choice.delta && choice.delta.content) {
            if (ttft == null) ttft = (performance.now() - t0) / 1000;
            $("answer").textContent += choice.delta.content;
            $("answer").dataset.chunks = String(parseInt($("answer").dataset.chunks, 10) + 1);
          }
        }
        if (msg.twigvlm) stats = msg.twigvlm;
      }
    }
    const seconds = (performance.now() - t0) / 1000;
    if (stats) {
      showStats(stats, tokens, seconds, ttft);
      await drawImage(stats.kept_indices, stats.image_grids);
    }
    document.body.dataset.state = "done";
  } catch (e) {
    $("error").textContent = String(e.message || e);
    document.body.dataset.state = "error";
  } finally {
    $("go").disabled = false;
  }
}

function readFile(file) {
  const reader = new FileReader();
  reader.onload = () => { imageURL = reader.result; drawImage(null, null); };
  reader.readAsDataURL(file);
}

async function init() {
  $("file").addEventListener("change", (e) => e.target.files[0] && readFile(e.target.files[0]));
  $("sample").addEventListener("click", () => { imageURL = samplePicture(); drawImage(null, null); });
  $("go").addEventListener("click", send);
  if (params.has("prompt")) $("prompt").value = params.get("prompt");
  if (params.get("ttp") === "0") $("ttp").checked = false;
  if (params.get("ssd") === "0") $("ssd").checked = false;
  if (params.has("max_tokens")) $("max_tokens").value = params.get("max_tokens");
  if (params.has("keep_ratio")) $("keep_ratio").value = params.get("keep_ratio");
  if (params.has("key")) $("key").value = params.get("key");
  if (params.get("sample") === "1") { imageURL = samplePicture(); await drawImage(null, null); }
  try {
    const headers = $("key").value ? { Authorization: "Bearer " + $("key").value } : {};
    const models = await (await fetch("v1/models", { headers })).json();
    modelId = models.data[0].id;
    $("model").textContent = "model: " + modelId + (models.data[0].twig ? " · twig: " + models.data[0].twig : "");
  } catch (e) {
    $("model").textContent = "could not reach the server";
  }
  if (params.get("autorun") === "1") await send();
}

init();
