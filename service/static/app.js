// The viewer page: a query image with clicked points -> POST /match -> matches drawn on the
// indexed images' thumbnails, correspondences on an optional target, a heatmap per point.

import { getJson, postForm, preview, request } from "./api.js";
import { clamp, drawHeatmap, drawMarkers, pointerToImage, renderFigure } from "./figure.js";

const COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#00a3a3", "#d6399c", "#808000"];
const CARD_MARKER_SIZE = 0.04; // thumbnails are small: bigger markers
const colour = (i) => COLOURS[i % COLOURS.length];
const $ = (id) => document.getElementById(id);

const state = {
  query: null, // {blob, name, src, width, height, indexedId}
  points: [], // [x, y] in the query's original pixels
  selected: 0, // index of the selected point (heatmap, highlighted results)
  cursor: null, // keyboard cursor [x, y] while the query figure has focus
  target: null, // {blob, name, src, width, height}
  response: null, // the last /match answer, as received
  generation: 0, // bumped whenever results go stale, so a late answer is not drawn
  imageInfo: new Map(), // image_id -> Promise<{width, height, patient_id, thumbnail}>
  maxK: 100,
};

// ---------- messages ----------

function showError(err) {
  $("error").textContent = err instanceof Error ? err.message : String(err);
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function setStatus(text) {
  $("status").textContent = text;
}

async function guarded(action) {
  clearError();
  try {
    await action();
  } catch (err) {
    showError(err);
    setStatus("");
  }
}

// ---------- service info and the indexed image list ----------

async function loadInfo() {
  try {
    const info = await getJson("/info");
    state.maxK = info.limits?.max_k ?? state.maxK;
    $("k").max = String(state.maxK);
    $("info").textContent = describeInfo(info);
  } catch (err) {
    $("info").textContent = `Service info unavailable (${err.message})`;
  }
}

function describeInfo({ encoder, index }) {
  const served = index ? `index ${index.version} (${index.num_images} images)` : "no index loaded";
  return `Encoder ${encoder.fingerprint} (${encoder.backbone}) · ${served}`;
}

async function loadImageList() {
  const select = $("query-pick");
  try {
    const { images } = await getJson("/images?limit=500");
    if (!images.length) return;
    const options = images.map(({ image_id, patient_id }) =>
      new Option(patient_id ? `${image_id} (${patient_id})` : image_id, image_id));
    select.replaceChildren(new Option("(choose an indexed image)", ""), ...options);
    select.disabled = false;
  } catch {
    // no index: uploading is the only way
  }
}

function imageInfo(imageId) {
  if (!state.imageInfo.has(imageId)) {
    state.imageInfo.set(imageId, getJson(`/images/${encodeURIComponent(imageId)}`));
  }
  return state.imageInfo.get(imageId);
}

// ---------- query and target images ----------

async function setQuery(blob, name, indexedId = null) {
  setStatus(`Loading ${name}…`);
  const shown = await preview(blob, name);
  state.query = { blob, name, indexedId, ...shown };
  state.points = [];
  state.cursor = null;
  clearResults();
  renderFigure($("query-figure"), { ...shown, alt: `Query image ${name}` });
  renderQuery();
  setStatus(`Query: ${name} (${shown.width} × ${shown.height} px). Click a landmark.`);
}

async function pickIndexed(imageId) {
  const info = await imageInfo(imageId);
  const response = await request(info.thumbnail);
  const blob = await response.blob();
  const suffix = blob.type === "image/jpeg" ? "jpg" : "png"; // stored previews: JPEG (PNG before 2026-11-27)
  await setQuery(blob, `${imageId}.${suffix}`, imageId);
}

async function setTarget(blob, name) {
  setStatus(`Loading target ${name}…`);
  state.target = { blob, name, ...(await preview(blob, name)) };
  setStatus(`Target: ${name}. Press “Find matches” to locate the points in it.`);
  if (state.response) await runMatch();
}

// ---------- points ----------

function renderQuery() {
  const figure = $("query-figure");
  const markers = state.points.map(([x, y], i) => ({
    x, y, color: colour(i), label: String(i + 1), kind: i === state.selected ? "point selected" : "point",
  }));
  if (state.cursor) {
    markers.push({ x: state.cursor[0], y: state.cursor[1], color: "#ffffff", kind: "cursor" });
  }
  drawMarkers(figure, markers);
  renderPointList();
  $("match-btn").disabled = !state.query || !state.points.length;
  $("clear-btn").disabled = !state.points.length;
}

function renderPointList() {
  const items = state.points.map(([x, y], i) => {
    const item = document.createElement("li");
    const select = document.createElement("button");
    select.type = "button";
    select.className = "point-chip";
    select.style.setProperty("--c", colour(i));
    select.setAttribute("aria-pressed", String(i === state.selected));
    select.textContent = `${i + 1} · (${x.toFixed(1)}, ${y.toFixed(1)})`;
    select.addEventListener("click", () => selectPoint(i));
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "remove";
    remove.textContent = "×";
    remove.setAttribute("aria-label", `Remove point ${i + 1}`);
    remove.addEventListener("click", () => removePoint(i));
    item.append(select, remove);
    return item;
  });
  $("points").replaceChildren(...items);
}

function addPoint(xy) {
  if (!state.query) return;
  state.points.push(xy.map((v) => Math.round(v * 10) / 10));
  state.selected = state.points.length - 1;
  clearResults();
  renderQuery();
}

function removePoint(i) {
  state.points.splice(i, 1);
  state.selected = clamp(state.selected, 0, Math.max(state.points.length - 1, 0));
  clearResults();
  renderQuery();
  focusChip(Math.min(i, state.points.length - 1)) || $("query-figure").focus();
}

// The list is re-rendered on every change: put keyboard focus back where it was.
function focusChip(i) {
  const chip = $("points").children[i]?.querySelector(".point-chip");
  chip?.focus();
  return Boolean(chip);
}

function clearPoints() {
  if (!state.points.length) return;
  state.points = [];
  state.selected = 0;
  clearResults();
  renderQuery();
  setStatus("Points cleared.");
}

function selectPoint(i) {
  state.selected = i;
  renderQuery();
  focusChip(i);
  highlightSelected();
  if ($("heatmap-toggle").checked) guarded(loadHeatmaps);
}

function onQueryKey(event) {
  if (!state.query) return;
  const { width, height } = state.query;
  const step = (Math.max(width, height) / 100) * (event.shiftKey ? 5 : 1);
  const moves = { ArrowLeft: [-step, 0], ArrowRight: [step, 0], ArrowUp: [0, -step], ArrowDown: [0, step] };
  state.cursor ??= [width / 2, height / 2];
  if (event.key in moves) {
    const [dx, dy] = moves[event.key];
    state.cursor = [clamp(state.cursor[0] + dx, 0, width), clamp(state.cursor[1] + dy, 0, height)];
  } else if (event.key === "Enter" || event.key === " ") {
    addPoint(state.cursor);
  } else {
    return;
  }
  event.preventDefault();
  renderQuery();
}

// ---------- matching ----------

function matchForm() {
  const k = Number($("k").value);
  if (!Number.isInteger(k) || k < 1 || k > state.maxK) {
    throw new Error(`k must be a whole number from 1 to ${state.maxK}.`);
  }
  const form = new FormData();
  form.append("image", state.query.blob, state.query.name);
  form.append("points", JSON.stringify(state.points));
  // An indexed query would find itself first: ask for one more and drop it (see render).
  form.append("k", String(state.query.indexedId && k < state.maxK ? k + 1 : k));
  if (state.target) form.append("targets", state.target.blob, state.target.name);
  return form;
}

async function runMatch() {
  const form = matchForm();
  const generation = state.generation;
  $("match-btn").disabled = true;
  $("results").setAttribute("aria-busy", "true");
  setStatus("Matching…");
  try {
    const response = await postForm("/match", form);
    if (generation !== state.generation) return; // the query or the points changed meanwhile
    state.response = response;
    await renderResults(response);
    const ms = response.timing_ms?.total;
    setStatus(`Found matches for ${response.results.length} point(s)${ms ? ` in ${ms.toFixed(0)} ms` : ""}.`);
    if ($("heatmap-toggle").checked) await loadHeatmaps();
  } finally {
    $("match-btn").disabled = false;
    $("results").removeAttribute("aria-busy");
  }
}

function shownMatches(result) {
  const k = Number($("k").value);
  const own = state.query.indexedId;
  return result.matches.filter((m) => m.image_id !== own).slice(0, k);
}

function clearResults() {
  state.generation += 1;
  state.response = null;
  $("results").replaceChildren();
  $("target-block").replaceChildren();
  $("results-empty").hidden = false;
}

async function renderResults(response) {
  const ids = new Set(response.results.flatMap((r) => shownMatches(r).map((m) => m.image_id)));
  const infos = new Map(await Promise.all([...ids].map(async (id) => [id, await imageInfo(id)])));
  $("results-empty").hidden = true;
  $("target-block").replaceChildren(...(state.target ? [targetCard(response)] : []));
  $("results").replaceChildren(...response.results.map((result, i) => pointBlock(result, i, infos)));
  highlightSelected();
}

function targetCard(response) {
  const card = document.createElement("article");
  card.className = "card target";
  const figure = document.createElement("figure");
  figure.className = "figure";
  renderFigure(figure, { ...state.target, alt: `Target image ${state.target.name}` });
  const found = response.results.map((r, i) => [r.correspondences.find((c) => c.target === 0), i]);
  drawMarkers(figure, found.filter(([c]) => c).map(([c, i]) => ({
    x: c.x, y: c.y, color: colour(i), label: String(i + 1), kind: "correspondence",
    data: { point: i, score: c.score, mutual: c.mutual },
  })));
  const title = document.createElement("h3");
  title.textContent = `Target: ${state.target.name}`;
  const list = document.createElement("ul");
  list.className = "scores";
  for (const [c, i] of found) {
    if (!c) continue;
    const item = document.createElement("li");
    item.style.setProperty("--c", colour(i));
    item.innerHTML = `Point ${i + 1}: <span class="score"></span> ${c.mutual ? "(mutual)" : "(not mutual)"}`;
    item.querySelector(".score").textContent = c.score.toFixed(3);
    list.append(item);
  }
  card.append(title, figure, list);
  return card;
}

function pointBlock(result, i, infos) {
  const block = document.createElement("section");
  block.className = "point-result";
  block.dataset.point = String(i);
  block.style.setProperty("--c", colour(i));
  const title = document.createElement("h3");
  const [x, y] = result.point;
  title.textContent = `Point ${i + 1} at (${x.toFixed(1)}, ${y.toFixed(1)})`;
  const cards = document.createElement("div");
  cards.className = "cards";
  const matches = shownMatches(result);
  cards.append(...matches.map((match, rank) => matchCard(match, rank, i, infos.get(match.image_id))));
  if (!matches.length) cards.textContent = "No matches in the index.";
  block.append(title, cards);
  return block;
}

function matchCard(match, rank, pointIndex, info) {
  const card = document.createElement("article");
  card.className = "card match";
  card.dataset.imageId = match.image_id;
  const figure = document.createElement("figure");
  figure.className = "figure";
  renderFigure(figure, {
    src: info.thumbnail, width: info.width, height: info.height, alt: `Indexed image ${match.image_id}`,
  });
  const marker = {
    x: match.x, y: match.y, color: colour(pointIndex), kind: "match", data: { score: match.score },
  };
  drawMarkers(figure, [marker], CARD_MARKER_SIZE);
  const caption = document.createElement("p");
  caption.className = "caption";
  caption.innerHTML = `<span class="rank"></span> score <span class="score"></span>`;
  caption.querySelector(".rank").textContent = `#${rank + 1}`;
  caption.querySelector(".score").textContent = match.score.toFixed(3);
  const meta = document.createElement("p");
  meta.className = "meta";
  meta.textContent = match.patient_id ? `${match.image_id} · ${match.patient_id}` : match.image_id;
  meta.title = meta.textContent;
  card.append(figure, caption, meta);
  return card;
}

function highlightSelected() {
  for (const block of document.querySelectorAll(".point-result")) {
    block.classList.toggle("selected", Number(block.dataset.point) === state.selected);
  }
}

// ---------- heatmaps ----------

function clearHeatmaps() {
  for (const figure of document.querySelectorAll(".results .figure")) drawHeatmap(figure, null);
}

async function loadHeatmaps() {
  clearHeatmaps();
  const result = state.response?.results[state.selected];
  if (!$("heatmap-toggle").checked || !result) return;
  const ids = [...new Set(shownMatches(result).map((m) => m.image_id))];
  const form = new FormData();
  form.append("image", state.query.blob, state.query.name);
  form.append("point", JSON.stringify(result.point));
  form.append("image_ids", JSON.stringify(ids));
  if (state.target) form.append("targets", state.target.blob, state.target.name);
  setStatus("Computing similarity heatmaps…");
  const [generation, selected] = [state.generation, state.selected];
  const { maps } = await postForm("/heatmap", form);
  if (generation !== state.generation || selected !== state.selected) return; // stale answer
  const block = document.querySelector(`.point-result[data-point="${state.selected}"]`);
  for (const map of maps) {
    const figures = typeof map.target === "number"
      ? document.querySelectorAll(".card.target .figure")
      : block.querySelectorAll(`.card.match[data-image-id="${CSS.escape(map.target)}"] .figure`);
    for (const figure of figures) drawHeatmap(figure, map);
  }
  setStatus(`Heatmap of point ${state.selected + 1}: cosine similarity, blue (low) to red (high).`);
}

// ---------- wiring ----------

function fileHandler(action) {
  return (event) => {
    const input = event.target;
    const [file] = input.files;
    if (!file) return;
    guarded(async () => {
      try {
        await action(file, file.name);
      } catch (err) {
        input.value = ""; // so that choosing the same file again is a change
        throw err;
      }
    });
  };
}

function wire() {
  const figure = $("query-figure");
  $("query-file").addEventListener("change", (event) => {
    $("query-pick").value = "";
    fileHandler(setQuery)(event);
  });
  $("target-file").addEventListener("change", fileHandler(setTarget));
  $("query-pick").addEventListener("change", (event) => {
    if (!event.target.value) return;
    $("query-file").value = "";
    guarded(() => pickIndexed(event.target.value));
  });
  figure.addEventListener("click", (event) => {
    if (state.query) addPoint(pointerToImage(figure, event));
  });
  figure.addEventListener("keydown", onQueryKey);
  figure.addEventListener("blur", () => {
    state.cursor = null;
    if (state.query) renderQuery();
  });
  $("match-btn").addEventListener("click", () => guarded(runMatch));
  $("clear-btn").addEventListener("click", clearPoints);
  $("k").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !$("match-btn").disabled) guarded(runMatch);
  });
  $("heatmap-toggle").addEventListener("change", () => guarded(loadHeatmaps));
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && event.target.tagName !== "SELECT") clearPoints();
  });
}

wire();
loadInfo();
loadImageList();
