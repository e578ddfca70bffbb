// Calls to the service. Every failure becomes an ApiError whose message is the API's own detail.

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export async function request(url, options = {}) {
  let response;
  try {
    response = await fetch(url, options);
  } catch (err) {
    throw new ApiError(0, `Cannot reach the service: ${err.message}`);
  }
  if (!response.ok) throw new ApiError(response.status, await errorMessage(response));
  return response;
}

export async function getJson(url) {
  return (await request(url)).json();
}

export async function postForm(url, form) {
  return (await request(url, { method: "POST", body: form })).json();
}

async function errorMessage(response) {
  const text = await response.text();
  let detail = text || response.statusText;
  try {
    detail = JSON.parse(text).detail ?? detail;
  } catch {
    // not JSON: keep the text
  }
  const retry = response.headers.get("Retry-After");
  const hint = retry ? ` (try again in ${retry} s)` : "";
  return `${response.status}: ${formatDetail(detail)}${hint}`;
}

// FastAPI details are a string, or a list of {loc, msg} for validation errors.
export function formatDetail(detail) {
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail
      .map((item) => (item?.msg ? `${(item.loc ?? []).join(".")}: ${item.msg}` : JSON.stringify(item)))
      .join("; ");
  }
  return JSON.stringify(detail);
}

// A browser-displayable PNG of any supported upload, decoded by the service exactly as /match
// decodes it, with the original pixel size (the coordinate system of every point).
export async function preview(blob, name) {
  const form = new FormData();
  form.append("image", blob, name);
  const response = await request("/preview", { method: "POST", body: form });
  const width = Number(response.headers.get("X-Image-Width"));
  const height = Number(response.headers.get("X-Image-Height"));
  const src = URL.createObjectURL(await response.blob());
  return { src, width, height };
}
