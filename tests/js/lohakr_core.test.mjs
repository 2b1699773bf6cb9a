// node --test tests/js : the pure frontend logic (block weights, card, report strip, stack rows).
import { test } from "node:test";
import assert from "node:assert/strict";
import {
  LAYOUTS, parseBlockWeights, formatBlockWeights, sameWeights, presets, formatCard, baseModelWarning,
  reportStrip, notApplied, parseRows, formatRows, moveRow, stripLines,
} from "../../web/lohakr_core.js";

test("12-value SDXL vector zeroes omitted blocks, keeps OTHER, lists them", () => {
  const r = parseBlockWeights("0.5,1,0.9,1,1,0.8,1,1,1,0.7,1,1", "sdxl");
  assert.equal(r.ok, true);
  assert.equal(r.kind, "vector");
  assert.equal(r.weights.TE1, 0.5);
  assert.equal(r.weights.TE2, 0.5);
  assert.equal(r.weights.IN05, 0.9);
  assert.equal(r.weights.IN00, 0);
  assert.equal(r.weights.OTHER, 1);
  assert.deepEqual(r.omitted, ["IN00", "IN01", "IN02", "IN03", "IN06", "OUT06", "OUT07", "OUT08"]);
});

test("vectors of the wrong family or length are errors", () => {
  assert.match(parseBlockWeights(Array(17).fill(1).join(","), "sdxl").error, /17-value vector is for SD1.5/);
  assert.match(parseBlockWeights("1,1,1", "sdxl").error, /needs 12 or 20 values/);
  assert.equal(parseBlockWeights(Array(26).fill(1).join(" "), "sd1").ok, true);
});

test("named values, groups and presets match the Python parser", () => {
  const r = parseBlockWeights("IN04=0.5, OUT=0, TE2=0, mid: 0.25, in8=2", "sdxl");
  assert.equal(r.weights.IN04, 0.5);
  assert.equal(r.weights.IN08, 2);
  assert.equal(r.weights.OUT05, 0);
  assert.equal(r.weights.TE1, 1);
  assert.equal(r.weights.M00, 0.25);
  const p = presets(LAYOUTS.sdxl);
  assert.deepEqual(LAYOUTS.sdxl.filter((b) => b.startsWith("IN") && p.INS[b] === 1), ["IN00", "IN01", "IN02", "IN03", "IN04"]);
  const o = parseBlockWeights("outall, IN08=0.5", "sdxl");
  assert.equal(o.kind, "preset");
  assert.equal(o.weights.IN08, 0.5);
  assert.equal(o.weights.IN07, 0);
  assert.equal(o.weights.OUT01, 1);
});

test("invalid strings are reported, not rewritten", () => {
  for (const [bad, message] of [["IN99=1", /unknown block 'IN99'/], ["IN04=abc", /'abc' is not a number/],
    ["FOO", /cannot read 'FOO'/]]) {
    const r = parseBlockWeights(bad, "sdxl");
    assert.equal(r.ok, false);
    assert.match(r.error, message);
  }
});

test("any valid string round-trips through the canonical form", () => {
  const samples = {
    sdxl: ["", "ALL", "NONE", "MIDD", "OUTS, IN00=0.3", "IN04=0.5, OUT=0, TE2=0", "0.5,1,0.9,1,1,0.8,1,1,1,0.7,1,1",
      Array(20).fill(0.25).join(","), "UNET=0.7", "te=0, other=0.5"],
    sd1: ["IND", Array(17).fill(1).join(","), "IN11=0.5, OUT=0.1", Array(26).fill(0).join(",")],
  };
  for (const [family, specs] of Object.entries(samples)) {
    for (const spec of specs) {
      const first = parseBlockWeights(spec, family);
      assert.equal(first.ok, true, `${spec}: ${first.error}`);
      const canonical = formatBlockWeights(first.weights, family);
      const again = parseBlockWeights(canonical, family);
      assert.equal(again.ok, true, canonical);
      assert.ok(sameWeights(first.weights, again.weights, family), `${spec} -> ${canonical}`);
      assert.equal(formatBlockWeights(again.weights, family), canonical);
    }
  }
  assert.equal(formatBlockWeights(parseBlockWeights("ALL", "sdxl").weights), "");
});

const INFO = {
  name: "mycat", algorithms: { LoHa: 4, LoKr: 1 }, ranks: { "4": 3, "8": 1, none: 1 }, alphas: { "2": 4, "100000": 1 },
  scales: { "0.25": 1, "0.5": 3, "1": 1 }, lokr_factors: { "8": 1 }, lokr_full_w2: 1, tucker: 2, dora: 0, dora_axes: {},
  base_model: "sdxl", base_model_name: "SDXL", resolution: "(1024, 1024)",
  top_tags: [["cat", 42], ["orange cat", 12]], warnings: [], skipped: { bundle_emb: "bundled textual-inversion embeddings" },
};

test("card formatting", () => {
  const card = formatCard(INFO);
  assert.equal(card.title, "mycat");
  const lines = Object.fromEntries(card.lines);
  assert.equal(lines.algorithm, "4 LoHa + 1 LoKr");
  assert.equal(lines.rank, "4 (×3), 8, none");
  assert.equal(lines.flags, "Tucker ×2, full w2 ×1");
  assert.equal(lines["base model"], "SDXL");
  assert.deepEqual(card.tags[0], { tag: "cat", count: 42 });
  assert.match(card.warnings[0], /bundle_emb/);
  assert.equal(baseModelWarning("sd1", "sdxl"), "This adapter is for SD1.5; the connected model is SDXL.");
  assert.equal(baseModelWarning("sdxl", "sdxl"), null);
  assert.equal(baseModelWarning("unknown", "sdxl"), null);
});

test("report strip in layout order with states", () => {
  const report = {
    model_family: "sdxl", blocks: LAYOUTS.sdxl,
    by_block: { TE1: { applied: 12, unmatched: 0, mismatched: 0, unsupported: 0 },
      IN04: { applied: 10, unmatched: 2, mismatched: 0, unsupported: 0 },
      OUT00: { applied: 0, unmatched: 0, mismatched: 3, unsupported: 0 }, "?": { applied: 0, unmatched: 1, mismatched: 0, unsupported: 0 } },
    outcomes: [{ module: "a", status: "applied" }, { module: "b", status: "unmatched", reason: "no layer" }],
  };
  const strip = reportStrip(report);
  assert.deepEqual(strip.map((c) => c.block), ["TE1", "IN04", "OUT00", "?"]);
  assert.deepEqual(strip.map((c) => c.state), ["ok", "partial", "none", "none"]);
  assert.deepEqual(notApplied(report), ["b [unmatched] no layer"]);
});

test("report strip counts a layer named twice as not applied", () => {
  const report = { model_family: "sdxl", blocks: LAYOUTS.sdxl,
    by_block: { IN04: { applied: 1, unmatched: 0, mismatched: 0, unsupported: 0, duplicate: 1 } } };
  const [cell] = reportStrip(report);
  assert.equal(cell.duplicate, 1);
  assert.equal(cell.total, 2);
  assert.equal(cell.state, "partial");
});

test("stack rows parse, format and reorder", () => {
  const rows = parseRows('[{"name":"a.safetensors","strength_model":0.5},{"name":"b","enabled":false,"block_weights":"IN04=0"}]');
  assert.deepEqual(rows[0], { name: "a.safetensors", strength_model: 0.5, strength_clip: 1, block_weights: "", enabled: true });
  assert.equal(rows[1].enabled, false);
  const moved = moveRow(rows, 1, -1);
  assert.deepEqual(moved.map((r) => r.name), ["b", "a.safetensors"]);
  assert.deepEqual(parseRows(formatRows(moved)), moved);
  assert.deepEqual(moveRow(rows, 0, -1).map((r) => r.name), ["a.safetensors", "b"]);
  assert.throws(() => parseRows("{}"), /JSON list/);
});

test("report strip groups: two lines, short labels that fit", async () => {
  const { stripLines, shortBlock, chipText } = await import("../../web/lohakr_core.js");
  assert.equal(shortBlock("IN04"), "4");
  assert.equal(shortBlock("OUT08"), "8");
  assert.equal(shortBlock("IN11"), "11");
  assert.equal(shortBlock("TE1"), "1");
  assert.equal(shortBlock("M00"), "0");
  assert.equal(shortBlock("OTHER"), "");
  const byBlock = Object.fromEntries([...LAYOUTS.sdxl, "?"].map((b) => [b, { applied: 1 }]));
  const lines = stripLines(reportStrip({ model_family: "sdxl", blocks: LAYOUTS.sdxl, by_block: byBlock }));
  assert.equal(lines.length, 2);
  assert.deepEqual(lines[0].map((g) => g.group), ["TE", "IN"]);
  assert.deepEqual(lines[1].map((g) => g.group), ["M", "OUT", "OTHER", "?"]);
  assert.deepEqual(lines[0][1].cells.map((c) => c.label), ["0", "1", "2", "3", "4", "5", "6", "7", "8"]);
  assert.deepEqual(lines[0][0].cells.map((c) => c.block), ["TE1", "TE2"]);
  assert.equal(lines[1][3].cells[0].label, "?");
  for (const line of lines) for (const g of line) for (const c of g.cells) assert.ok(c.label.length <= 2, c.block);
  // SD1: one TE cell, 12 IN and OUT cells; groups missing from the report are dropped.
  const sd1 = stripLines(reportStrip({ model_family: "sd1", by_block: { TE: { applied: 1 }, IN11: { applied: 1 }, OUT00: { applied: 0, unmatched: 1 } } }));
  assert.deepEqual(sd1.map((l) => l.map((g) => g.group)), [["TE", "IN"], ["OUT"]]);
  assert.equal(sd1[0][1].cells[0].label, "11");
  assert.equal(sd1[1][0].cells[0].state, "none");
  assert.deepEqual(stripLines([]), []);
  assert.equal(chipText(""), "blocks");
  assert.equal(chipText("IN04=0.5"), "IN04=0.5");
  assert.equal(chipText("OUTALL, IN08=0.5"), "OUTALL, I…");
});

test("transformer blocks: kinds as groups, their own strip lines and labels", () => {
  const r = parseBlockWeights("DOUBLE=0.5, single3=0, TE=0", "flux1");
  assert.equal(r.ok, true);
  assert.equal(r.weights.DOUBLE18, 0.5);
  assert.equal(r.weights.SINGLE03, 0);
  assert.equal(r.weights.SINGLE04, 1);
  assert.equal(r.weights.TE2, 0);
  assert.equal(LAYOUTS.flux1.length, 2 + 19 + 38 + 1);
  assert.match(parseBlockWeights("IN04=1", "flux1").error, /unknown block 'IN04'/);
  const cells = reportStrip({ blocks: ["TE1", "DOUBLE00", "SINGLE00", "OTHER"],
    by_block: { TE1: { applied: 1 }, DOUBLE00: { applied: 2 }, SINGLE00: { applied: 1, unmatched: 1 }, OTHER: { applied: 1 } } });
  const lines = stripLines(cells);
  assert.deepEqual(lines.map((line) => line.map((g) => g.group)), [["TE", "DOUBLE"], ["SINGLE", "OTHER"]]);
  assert.equal(lines[0][1].cells[0].label, "0");
  assert.match(baseModelWarning("flux1", "sd3"), /for Flux\.1; the connected model is SD3\/SD3\.5/);
});
