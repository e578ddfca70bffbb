// An image with an SVG overlay whose viewBox is the image's original pixel size, so markers and
// heatmaps are drawn with the API's coordinates as they are (no rescaling in JavaScript).

const SVG_NS = "http://www.w3.org/2000/svg";

// Colour stops of the heatmap, low to high similarity.
const HEAT_STOPS = [
  [40, 20, 90],
  [30, 110, 220],
  [40, 200, 140],
  [245, 210, 40],
  [220, 40, 30],
];

function svgElement(tag, attrs = {}) {
  const element = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) element.setAttribute(name, String(value));
  return element;
}

export function renderFigure(figure, { src, width, height, alt }) {
  const img = document.createElement("img");
  Object.assign(img, { src, alt, width, height, draggable: false });
  const svg = svgElement("svg", {
    viewBox: `0 0 ${width} ${height}`,
    preserveAspectRatio: "none",
    "aria-hidden": "true",
  });
  svg.append(svgElement("g", { class: "heat" }), svgElement("g", { class: "marks" }));
  figure.replaceChildren(img, svg);
  figure.classList.remove("empty");
  figure.dataset.width = width;
  figure.dataset.height = height;
}

// markers: [{x, y, color, label, kind, data: {name: value}}]; data becomes data-* attributes.
// size: marker radius as a fraction of the image's longer side (small figures want larger).
export function drawMarkers(figure, markers, size = 0.02) {
  const layer = figure.querySelector("g.marks");
  if (!layer) return;
  const radius = Math.max(Number(figure.dataset.width), Number(figure.dataset.height)) * size;
  layer.replaceChildren(...markers.map((marker) => markerElement(marker, radius)));
}

function markerElement({ x, y, color, label, kind = "point", data = {} }, radius) {
  const group = svgElement("g", { class: `marker ${kind}`, transform: `translate(${x} ${y})` });
  group.dataset.x = String(x);
  group.dataset.y = String(y);
  for (const [name, value] of Object.entries(data)) group.dataset[name] = String(value);
  group.append(
    svgElement("circle", { class: "ring", r: radius, stroke: color }),
    svgElement("circle", { class: "dot", r: radius * 0.28, fill: color }),
  );
  if (label !== undefined) {
    const text = svgElement("text", { x: radius * 1.1, y: -radius * 1.1, "font-size": radius * 1.5 });
    text.textContent = label;
    group.append(text);
  }
  return group;
}

// map: {extent: [x0, y0, x1, y1] in original pixels, values: rows of cosine similarities,
// null on letterbox padding}. Colours span this map's own min..max for contrast.
export function drawHeatmap(figure, map) {
  const layer = figure.querySelector("g.heat");
  if (!layer) return;
  if (!map) {
    layer.replaceChildren();
    delete figure.dataset.heatmap;
    return;
  }
  const [x0, y0, x1, y1] = map.extent;
  const image = svgElement("image", {
    href: heatmapUrl(map.values),
    x: x0,
    y: y0,
    width: x1 - x0,
    height: y1 - y0,
    preserveAspectRatio: "none",
    class: "heatmap",
  });
  layer.replaceChildren(image);
  figure.dataset.heatmap = "on";
}

function heatmapUrl(values) {
  const rows = values.length;
  const cols = values[0].length;
  const flat = values.flat();
  const finite = flat.filter((v) => v !== null);
  const low = Math.min(...finite);
  const span = Math.max(...finite) - low || 1;
  const canvas = document.createElement("canvas");
  canvas.width = cols;
  canvas.height = rows;
  const context = canvas.getContext("2d");
  const pixels = context.createImageData(cols, rows);
  flat.forEach((value, i) => {
    if (value !== null) pixels.data.set([...heatColour((value - low) / span), 255], i * 4);
  });
  context.putImageData(pixels, 0, 0);
  return canvas.toDataURL("image/png");
}

function heatColour(t) {
  const position = Math.min(Math.max(t, 0), 1) * (HEAT_STOPS.length - 1);
  const i = Math.min(Math.floor(position), HEAT_STOPS.length - 2);
  const f = position - i;
  return HEAT_STOPS[i].map((c, ch) => Math.round(c + f * (HEAT_STOPS[i + 1][ch] - c)));
}

// Pointer position -> original pixel coordinates of the figure's image.
export function pointerToImage(figure, event) {
  const rect = figure.querySelector("img").getBoundingClientRect();
  const width = Number(figure.dataset.width);
  const height = Number(figure.dataset.height);
  const x = ((event.clientX - rect.left) / rect.width) * width;
  const y = ((event.clientY - rect.top) / rect.height) * height;
  return [clamp(x, 0, width), clamp(y, 0, height)];
}

export function clamp(value, low, high) {
  return Math.min(Math.max(value, low), high);
}
