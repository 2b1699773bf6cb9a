// Pure logic of the lohakr frontend (no DOM, no ComfyUI): block layouts, block-weight parsing and
// formatting (the same forms as loaders/blocks.py), the adapter card and the report strip.
// Unit-tested with `node --test tests/js`.

const range = (prefix, n) => Array.from({ length: n }, (_, i) => `${prefix}${String(i).padStart(2, "0")}`);

// The blocks of the full-size models (loaders/layouts/*.json; docs/names-and-blocks.md#transformer-blocks).
export const LAYOUTS = {
  sdxl: ["TE1", "TE2", ...range("IN", 9), "M00", ...range("OUT", 9), "OTHER"],
  sd1: ["TE", ...range("IN", 12), "M00", ...range("OUT", 12), "OTHER"],
  flux1: ["TE1", "TE2", ...range("DOUBLE", 19), ...range("SINGLE", 38), "OTHER"],
  chroma: ["TE", ...range("DOUBLE", 19), ...range("SINGLE", 38), "OTHER"],
  flux2: [...range("DOUBLE", 8), ...range("SINGLE", 48), "OTHER"],
  sd3: ["TE1", "TE2", "TE3", ...range("JOINT", 38), "OTHER"],
  zimage: [...range("LAYER", 30), ...range("NREF", 2), ...range("CREF", 2), "OTHER"],
  qwenimage: [...range("LAYER", 60), "OTHER"],
};
LAYOUTS.sd2 = LAYOUTS.sd1;
export const FAMILY_NAMES = { sdxl: "SDXL", sd1: "SD1.5", sd2: "SD2.x", flux1: "Flux.1", chroma: "Chroma", flux2: "Flux.2",
  sd3: "SD3/SD3.5", zimage: "Z-Image", qwenimage: "Qwen-Image" };

// A1111 lora-block-weight vectors (BLOCKID12/20/17/26): BASE = the text encoders.
export const VECTORS = {
  12: ["sdxl", ["BASE", "IN04", "IN05", "IN07", "IN08", "M00", ...range("OUT", 6)]],
  20: ["sdxl", ["BASE", ...range("IN", 9), "M00", ...range("OUT", 9)]],
  17: ["sd1", ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00",
    ...range("OUT", 12).slice(3)]],
  26: ["sd1", ["BASE", ...range("IN", 12), "M00", ...range("OUT", 12)]],
};
const FAMILY_LENGTHS = { sdxl: [12, 20], sd1: [17, 26], sd2: [17, 26] };
export const PRESET_NAMES = ["ALL", "NONE", "INALL", "MIDALL", "OUTALL", "INS", "IND", "MIDD", "OUTD", "OUTS"];
const NUMBER = /^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$/;

/** A transformer layout's vector: BASE, then every numbered block in layout order; null for a UNet's. */
export function transformerVectorNames(blocks) {
  const numbered = blocks.filter((b) => !b.startsWith("TE") && b !== "OTHER");
  if (!numbered.length || numbered.some((b) => /^(IN|OUT|M)\d+$/.test(b))) return null;
  return ["BASE", ...numbered];
}

export function layoutFor(family) {
  return LAYOUTS[family] || LAYOUTS.sdxl;
}

export function presets(blocks) {
  const te = blocks.filter((b) => b.startsWith("TE"));
  const ins = blocks.filter((b) => b.startsWith("IN"));
  const outs = blocks.filter((b) => b.startsWith("OUT"));
  const half = (list) => [list.slice(0, Math.ceil(list.length / 2)), list.slice(Math.ceil(list.length / 2))];
  const [inShallow, inDeep] = half(ins);
  const [outNearMid, outNearImage] = half(outs);
  const only = (...groups) => {
    const chosen = new Set([...groups.flat(), ...te, "OTHER"]);
    return Object.fromEntries(blocks.map((b) => [b, chosen.has(b) ? 1 : 0]));
  };
  return {
    ALL: Object.fromEntries(blocks.map((b) => [b, 1])),
    NONE: Object.fromEntries(blocks.map((b) => [b, 0])),
    INALL: only(ins),
    MIDALL: only(["M00"]),
    OUTALL: only(outs),
    INS: only(inShallow),
    IND: only(inDeep),
    MIDD: only(inDeep, ["M00"], outNearMid),
    OUTD: only(outNearMid),
    OUTS: only(outNearImage),
  };
}

function group(name, blocks) {
  const upper = name.trim().toUpperCase();
  const te = blocks.filter((b) => b.startsWith("TE"));
  const groups = {
    ALL: blocks, IN: blocks.filter((b) => b.startsWith("IN")), OUT: blocks.filter((b) => b.startsWith("OUT")),
    MID: ["M00"], M: ["M00"], M0: ["M00"], MIDDLE: ["M00"], TE: te, BASE: te, CLIP: te,
    UNET: blocks.filter((b) => !b.startsWith("TE")), OTHER: ["OTHER"],
  };
  groups.TRANSFORMER = groups.DIT = groups.MODEL = groups.UNET;
  if (groups[upper]) return groups[upper].filter((b) => blocks.includes(b));
  const kind = blocks.filter((b) => b.length > upper.length && b.startsWith(upper) && /^\d+$/.test(b.slice(upper.length)));
  if (/^[A-Z]+$/.test(upper) && kind.length) return kind; // a transformer's kind of block: DOUBLE = DOUBLE00, DOUBLE01…
  const m = /^([A-Z]+)(\d+)$/.exec(upper);
  if (m) {
    const block = `${m[1]}${String(Number(m[2])).padStart(2, "0")}`;
    if (blocks.includes(block)) return [block];
  }
  if (blocks.includes(upper)) return [upper];
  throw new Error(`unknown block '${name.trim()}'`);
}

function number(raw, name) {
  const text = String(raw).trim();
  if (!NUMBER.test(text)) throw new Error(`${name.trim()}: '${text}' is not a number`);
  return Number(text);
}

/**
 * Parse a block-weight spec against a layout. Returns {ok, kind, weights, omitted} or {ok: false, error}.
 * `weights` holds every block of the layout (unnamed blocks are 1, or 0 where a vector omits them).
 */
export function parseBlockWeights(text, family = "sdxl") {
  const blocks = layoutFor(family);
  const full = (partial) => Object.fromEntries(blocks.map((b) => [b, partial[b] ?? 1]));
  try {
    const trimmed = (text ?? "").trim();
    if (!trimmed) return { ok: true, kind: "empty", weights: full({}), omitted: [] };
    const tokens = trimmed.split(/[,\s;]+/).filter(Boolean);
    if (tokens.every((t) => NUMBER.test(t))) {
      const n = tokens.length;
      let names = transformerVectorNames(blocks);
      if (names) {
        if (n !== names.length) throw new Error(`a block-weight vector for this model has ${names.length} values (BASE, then ${names[1]}…${names.at(-1)}); got ${n}`);
      } else {
        if (!VECTORS[n]) throw new Error(`a block-weight vector needs 12 or 20 values (SDXL) or 17 or 26 (SD1.5); got ${n}`);
        const [vectorFamily, vectorNames] = VECTORS[n];
        const allowed = FAMILY_LENGTHS[family];
        if (allowed && !allowed.includes(n)) {
          throw new Error(`a ${n}-value vector is for ${vectorFamily === "sdxl" ? "SDXL" : "SD1.5"}; this model takes ${allowed.join(" or ")} values`);
        }
        names = vectorNames;
      }
      const te = blocks.filter((b) => b.startsWith("TE"));
      const weights = Object.fromEntries(blocks.map((b) => [b, b === "OTHER" ? 1 : 0]));
      const listed = new Set();
      names.forEach((name, i) => {
        for (const block of name === "BASE" ? te : [name]) {
          if (block in weights) { weights[block] = Number(tokens[i]); listed.add(block); }
        }
      });
      const omitted = blocks.filter((b) => b !== "OTHER" && !listed.has(b));
      return { ok: true, kind: "vector", weights, omitted };
    }
    const table = presets(blocks);
    let start = null;
    const partial = {};
    trimmed.split(/[,;\n]+/).forEach((token, index) => {
      token = token.trim();
      if (!token) return;
      const sep = token.search(/[=:]/);
      if (sep >= 0) {
        const name = token.slice(0, sep);
        const value = number(token.slice(sep + 1), name);
        if (!Number.isFinite(value)) throw new Error(`${name.trim()}: not a finite number`);
        for (const block of group(name, blocks)) partial[block] = value;
      } else if (index === 0 && table[token.toUpperCase()]) {
        start = { ...table[token.toUpperCase()] };
      } else {
        throw new Error(`cannot read '${token}'`);
      }
    });
    const weights = start ? { ...start, ...partial } : full(partial);
    return { ok: true, kind: start ? "preset" : "named", weights, omitted: [] };
  } catch (err) {
    return { ok: false, error: err.message };
  }
}

/** The canonical named form of full weights: blocks that differ from 1 ("" when all are 1). */
export function formatBlockWeights(weights, family = "sdxl") {
  const blocks = layoutFor(family);
  const fmt = (v) => String(Math.round(v * 1000) / 1000);
  return blocks.filter((b) => (weights[b] ?? 1) !== 1).map((b) => `${b}=${fmt(weights[b])}`).join(", ");
}

export function sameWeights(a, b, family = "sdxl") {
  return layoutFor(family).every((block) => Math.abs((a[block] ?? 1) - (b[block] ?? 1)) < 1e-9);
}

const dist = (d) => Object.entries(d || {}).map(([k, n]) => (n > 1 ? `${k} (×${n})` : k)).join(", ");

/** The adapter card, from the /lohakr/info JSON (describe_adapter). */
export function formatCard(info) {
  const algos = Object.entries(info.algorithms || {}).map(([k, n]) => `${n} ${k}`).join(" + ") || "no modules";
  const flags = [];
  if (info.tucker) flags.push(`Tucker ×${info.tucker}`);
  if (info.dora) flags.push(`DoRA ×${info.dora} (${Object.keys(info.dora_axes || {}).join("/")} axis)`);
  if (info.lokr_full_w2) flags.push(`full w2 ×${info.lokr_full_w2}`);
  const lines = [
    ["algorithm", algos],
    ["rank", dist(info.ranks)],
    ["alpha", dist(info.alphas)],
    ["scale", dist(info.scales)],
  ];
  if (Object.keys(info.lokr_factors || {}).length) lines.push(["factor", dist(info.lokr_factors)]);
  if (flags.length) lines.push(["flags", flags.join(", ")]);
  lines.push(["base model", info.base_model_name || info.base_model]);
  if (info.resolution) lines.push(["resolution", info.resolution]);
  return {
    title: info.name,
    lines,
    tags: (info.top_tags || []).map(([tag, count]) => ({ tag, count })),
    warnings: [...(info.warnings || []), ...Object.entries(info.skipped || {}).map(([m, r]) => `${m}: ${r}`)],
    baseModel: info.base_model,
  };
}

/** A warning when the file's base model differs from the model it ran on (after a run). */
export function baseModelWarning(cardBaseModel, modelFamily) {
  if (!cardBaseModel || !modelFamily || cardBaseModel === "unknown" || modelFamily === "unknown") return null;
  if (cardBaseModel === modelFamily) return null;
  const names = FAMILY_NAMES;
  return `This adapter is for ${names[cardBaseModel] || cardBaseModel}; the connected model is ${names[modelFamily] || modelFamily}.`;
}

/** Per-block counts in layout order, from a LoadReport dict (report.to_dict()). */
export function reportStrip(report) {
  const byBlock = report.by_block || {};
  const blocks = (report.blocks && report.blocks.length ? report.blocks : layoutFor(report.model_family))
    .filter((b) => b in byBlock);
  for (const b of Object.keys(byBlock)) if (!blocks.includes(b)) blocks.push(b);
  return blocks.map((block) => {
    const row = byBlock[block] || {};
    const cell = { block, applied: row.applied || 0, unmatched: row.unmatched || 0,
      mismatched: row.mismatched || 0, unsupported: row.unsupported || 0, duplicate: row.duplicate || 0 };
    cell.total = cell.applied + cell.unmatched + cell.mismatched + cell.unsupported + cell.duplicate;
    cell.state = cell.total === 0 ? "empty" : cell.applied === cell.total ? "ok" : cell.applied === 0 ? "none" : "partial";
    return cell;
  });
}

export function notApplied(report) {
  return (report.outcomes || []).filter((o) => o.status !== "applied")
    .map((o) => `${o.module} [${o.status}] ${o.reason}`);
}

// ---- stack rows --------------------------------------------------------------------------------
export function parseRows(text) {
  if (!text || !text.trim()) return [];
  const data = JSON.parse(text);
  if (!Array.isArray(data)) throw new Error("stack rows must be a JSON list");
  return data.map((row) => ({
    name: String(row.name || ""),
    strength_model: Number(row.strength_model ?? 1),
    strength_clip: Number(row.strength_clip ?? 1),
    block_weights: String(row.block_weights || ""),
    enabled: row.enabled !== false,
  }));
}

export function formatRows(rows) {
  return JSON.stringify(rows.map((r) => ({
    name: r.name, strength_model: r.strength_model, strength_clip: r.strength_clip,
    block_weights: r.block_weights || "", enabled: r.enabled !== false,
  })));
}

export function moveRow(rows, index, delta) {
  const to = index + delta;
  if (to < 0 || to >= rows.length) return rows.slice();
  const copy = rows.slice();
  const [row] = copy.splice(index, 1);
  copy.splice(to, 0, row);
  return copy;
}

// ---- report strip groups -----------------------------------------------------------------------
const KINDS = ["DOUBLE", "SINGLE", "JOINT", "LAYER", "NREF", "CREF"]; // transformer blocks
const GROUP_OF = [[/^TE\d*$/, "TE"], [/^IN\d+$/, "IN"], [/^M\d+$/, "M"], [/^OUT\d+$/, "OUT"],
  ...KINDS.map((kind) => [new RegExp(`^${kind}\\d+$`), kind]), [/^OTHER$/, "OTHER"]];

/** The short label of a block inside its group: IN04 -> "4", TE1 -> "1", M00 -> "0"; "" when the group says it all. */
export function shortBlock(block) {
  const m = new RegExp(`^(TE|IN|OUT|M|${KINDS.join("|")})(\\d+)$`).exec(block);
  if (m) return String(Number(m[2]));
  return "";
}

/**
 * Strip cells grouped for display, in two lines: [TE, IN] and [M, OUT, OTHER, anything else].
 * Returns [[{group, cells: [{...cell, label}]}...], [...]]; empty groups and empty lines are dropped.
 */
export function stripLines(cells) {
  const order = ["TE", "IN", "M", "OUT", ...KINDS, "OTHER", "?"];
  const groups = new Map(order.map((g) => [g, []]));
  for (const cell of cells) {
    const group = (GROUP_OF.find(([re]) => re.test(cell.block)) || [null, "?"])[1];
    groups.get(group).push({ ...cell, label: group === "?" ? cell.block : shortBlock(cell.block) });
  }
  const make = (names) => names.filter((g) => groups.get(g).length).map((g) => ({ group: g, cells: groups.get(g) }));
  return [make(["TE", "IN", "DOUBLE", "JOINT", "LAYER"]), make(["M", "OUT", "SINGLE", "NREF", "CREF", "OTHER", "?"])]
    .filter((line) => line.length);
}

/** The text of a stack row's block-weights chip: "blocks" when unset, the spec (shortened) otherwise. */
export function chipText(spec, max = 10) {
  const text = (spec || "").trim();
  if (!text) return "blocks";
  return text.length > max ? `${text.slice(0, max - 1)}…` : text;
}
