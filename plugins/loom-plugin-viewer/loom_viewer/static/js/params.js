// URL parameters to request fields: the page sends what the URL says, in the API's own types.

// A site as the API takes it: an integer hidden-state index, or a hook-point name.
export function site(text) {
  const t = String(text).trim();
  return /^-?\d+$/.test(t) ? Number(t) : t;
}

// "all" (or another keyword the field accepts), or a comma-separated list of sites.
export function sites(text, keywords = ["all"]) {
  const t = String(text).trim();
  if (keywords.includes(t)) return t;
  return t.split(",").map((x) => x.trim()).filter((x) => x !== "").map(site);
}

// An integer field; the text as it is when it is not one, so that the server's 422 names it.
export function integer(text) {
  const t = String(text).trim();
  return /^-?\d+$/.test(t) ? Number(t) : t;
}

export function number(text) {
  const t = String(text).trim();
  return t !== "" && Number.isFinite(Number(t)) ? Number(t) : t;
}

// A JSON field (an `interventions` list); a parse error says which field.
export function json(text, name) {
  const t = String(text || "").trim();
  if (!t) return undefined;
  try {
    return JSON.parse(t);
  } catch (err) {
    throw new Error(`${name}: not JSON (${err.message})`);
  }
}

// Optional fields out of a body: what the URL does not give is not sent, so the server's defaults apply.
export function compact(body) {
  return Object.fromEntries(Object.entries(body).filter(([, v]) => v !== undefined));
}
