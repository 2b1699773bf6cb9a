// Drive real ComfyUI (its real frontend) in headless Chromium with playwright-core and check our
// extension: no console errors from it, nodes can be added, the card, the block-weight editor
// (surviving a workflow save/reload), stack rows, and the report after queueing.
// Usage: node drive.mjs <comfy url> <out dir> <lora file name>   (prints one JSON line)
import { chromium } from "playwright-core";
import fs from "node:fs";
import path from "node:path";

const [url, outDir, lora] = process.argv.slice(2);
fs.mkdirSync(outDir, { recursive: true });
const result = { steps: {}, consoleErrors: [], ourErrors: [] };
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const shot = async (page, name) => page.screenshot({ path: path.join(outDir, `${name}.png`) });

try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  page.on("console", (msg) => {
    if (msg.type() === "error") {
      const text = msg.text();
      result.consoleErrors.push(text);
      if (/lohakr/i.test(text) || /lohakr/.test(msg.location()?.url || "")) result.ourErrors.push(text);
    }
  });
  page.on("pageerror", (err) => {
    result.consoleErrors.push(String(err));
    if (/lohakr/i.test(err.stack || String(err))) result.ourErrors.push(String(err));
  });
  await page.goto(url, { waitUntil: "domcontentloaded" });
  await page.waitForFunction(() => (window.comfyAPI?.app?.app ?? window.app)?.graph && window.LiteGraph, null, { timeout: 90000 });
  await page.waitForTimeout(1500);
  // Close the first-run template browser so the canvas is visible in screenshots.
  await page.keyboard.press("Escape");
  await page.evaluate(() => document.querySelectorAll(".p-dialog-close-button").forEach((b) => b.click()));
  await page.waitForTimeout(300);
  result.steps.extensionLoaded = await page.evaluate(() =>
    (window.comfyAPI?.app?.app ?? window.app).extensions.some((e) => e.name === "lohakr.ui"));

  // Add our nodes.
  const added = await page.evaluate(async (lora) => {
    const app = window.comfyAPI?.app?.app ?? window.app;
    app.graph.clear();
    const make = (type, pos) => { const n = window.LiteGraph.createNode(type); n.pos = pos; app.graph.add(n); return n; };
    const tiny = make("LohakrTestTinySDXL", [20, 60]);
    const loader = make("LohakrLoader", [320, 60]);
    const stack = make("LohakrStack", [760, 60]);
    const dump = make("LohakrTestWeightDump", [760, 520]);
    tiny.connect(0, loader, 0);
    tiny.connect(1, loader, loader.inputs.findIndex((i) => i.name === "clip"));
    loader.connect(0, dump, 0);
    loader.connect(1, dump, 1);
    const w = (node, name) => node.widgets.find((x) => x.name === name);
    w(dump, "path").value = "/tmp/lohakr_browser_dump.safetensors";
    const nameWidget = w(loader, "lora_name");
    nameWidget.value = lora;
    nameWidget.callback?.(lora);
    app.canvas.ds.offset = [0, 0];
    app.canvas.ds.scale = 1;
    app.graph.setDirtyCanvas(true, true);
    return { ids: [tiny.id, loader.id, stack.id, dump.id], types: app.graph._nodes.map((n) => n.type) };
  }, lora);
  result.steps.nodesAdded = added.types.includes("LohakrLoader") && added.types.includes("LohakrStack");

  // The card shows the file.
  const stem = lora.replace(/\.safetensors$/, "");
  await page.waitForFunction((stem) => [...document.querySelectorAll(".lohakr.card h4")].some((h) => h.textContent === stem),
    stem, { timeout: 30000 });
  result.steps.cardText = await page.evaluate(() => document.querySelector(".lohakr.card")?.innerText);
  await shot(page, "1-card");

  // The block-weight editor changes the widget value; hand-typed strings round-trip; invalid ones are flagged.
  result.steps.editor = await page.evaluate(() => {
    const app = window.comfyAPI?.app?.app ?? window.app;
    const loader = app.graph._nodes.find((n) => n.type === "LohakrLoader");
    const editor = [...document.querySelectorAll(".lohakr.editor")][0];
    editor.querySelector("details").open = true;
    const slider = editor.querySelector('input[type=range][data-block="IN04"]');
    slider.value = "0.5";
    slider.dispatchEvent(new Event("input"));
    const widget = loader.widgets.find((x) => x.name === "block_weights");
    const afterSlider = widget.value;
    widget.value = "OUTALL, IN08=0.5";
    widget.callback(widget.value);
    const typedKept = widget.value;
    const in08 = editor.querySelector('input[type=range][data-block="IN08"]').value;
    const in00 = editor.querySelector('input[type=range][data-block="IN00"]').value;
    widget.value = "IN99=1";
    widget.callback(widget.value);
    const invalid = { value: widget.value, valid: editor.dataset.valid, status: editor.innerText.includes("invalid") };
    widget.value = "IN04=0.5";
    widget.callback(widget.value);
    return { afterSlider, typedKept, in08, in00, invalid };
  });
  await shot(page, "2-editor");

  // Stack rows: add two, reorder, toggle.
  result.steps.rows = await page.evaluate(async () => {
    const app = window.comfyAPI?.app?.app ?? window.app;
    const stack = app.graph._nodes.find((n) => n.type === "LohakrStack");
    const panel = [...document.querySelectorAll(".lohakr.rows")][0];
    panel.querySelector(".lohakr-add-row").click();
    panel.querySelector(".lohakr-add-row").click();
    const rows = () => JSON.parse(stack.widgets.find((w) => w.name === "rows").value);
    const checkbox = panel.querySelector("tr:nth-child(2) input[type=checkbox]");
    checkbox.checked = false;
    checkbox.dispatchEvent(new Event("change"));
    const strength = panel.querySelector("tr:nth-child(1) input[type=number]");
    strength.value = "0.25";
    strength.dispatchEvent(new Event("change"));
    panel.querySelector("tr:nth-child(2) button[title=up]").click();
    return rows();
  });

  // Save and reload the workflow: values survive.
  result.steps.reload = await page.evaluate(async () => {
    const app = window.comfyAPI?.app?.app ?? window.app;
    const workflow = JSON.parse(JSON.stringify(app.graph.serialize()));
    app.graph.clear();
    await app.loadGraphData(workflow);
    await new Promise((r) => setTimeout(r, 500));
    const loader = app.graph._nodes.find((n) => n.type === "LohakrLoader");
    const stack = app.graph._nodes.find((n) => n.type === "LohakrStack");
    const editor = document.querySelector(".lohakr.editor");
    return {
      blockWeights: loader.widgets.find((w) => w.name === "block_weights").value,
      slider: editor?.querySelector('input[type=range][data-block="IN04"]')?.value,
      rows: JSON.parse(stack.widgets.find((w) => w.name === "rows").value),
      renderedRows: document.querySelectorAll(".lohakr.rows tr").length,
    };
  });
  await shot(page, "3-reloaded");

  // Queue the graph (the stack node is not connected to an output, so it does not run); the report appears.
  await page.evaluate(async () => {
    const app = window.comfyAPI?.app?.app ?? window.app;
    const stack = app.graph._nodes.find((n) => n.type === "LohakrStack");
    app.graph.remove(stack);
    await app.queuePrompt(0, 1);
  });
  await page.waitForFunction(() => document.querySelector(".lohakr.report .strip .cell"), null, { timeout: 120000 });
  result.steps.report = await page.evaluate(() => ({
    text: document.querySelector(".lohakr.report").innerText,
    cells: [...document.querySelectorAll(".lohakr.report .cell")].map((c) => `${c.title}|${c.className}`),
  }));
  await shot(page, "4-report");
} catch (err) {
  result.error = String(err.stack || err);
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
