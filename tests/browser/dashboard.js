// Loads the supervisor's dashboard in headless Chromium: without the token it shows nothing but why (reads need the
// token), with it the instances; drains one, sees its state change and the event arrive, and saves a screenshot. Usage: node dashboard.js <dashboard url> <token> <instance> <png>
"use strict";
const { chromium } = require("playwright-core");

async function main() {
  const [url, token, instance, png] = process.argv.slice(2);
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
      "--disable-component-update", "--disable-sync"],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
    const errors = [];
    page.on("pageerror", (e) => errors.push(String(e)));
    await page.goto(url);
    const row = `tr[data-id="${instance}"]`;
    // without the token: the API's 401 message, and no instance (their addresses are not public)
    await page.waitForFunction(() => document.getElementById("msg").textContent.includes("Bearer"), null, { timeout: 10000 });
    const refusal = await page.textContent("#msg");
    if ((await page.locator("#instances tbody tr").count()) !== 0) throw new Error("instances shown without the token");
    console.log("refused without the token: " + refusal);
    await page.fill("#token", token);
    await page.dispatchEvent("#token", "change");
    await page.waitForSelector(`${row} .state-healthy`, { timeout: 15000 });
    const rows = await page.locator("#instances tbody tr").count();
    if (rows < 2) throw new Error(`expected the instances, saw ${rows} rows`);
    // press, let the page refresh its table (as its timer and events do at any moment), then release: the click must
    // still reach the button
    await page.hover(`${row} button.drain`);
    await page.mouse.down();
    await page.evaluate(() => refresh());
    await page.mouse.up();
    await page.waitForSelector(`${row} .state-draining`, { timeout: 10000 });
    // the event reached the timeline over SSE
    await page.waitForFunction((id) => document.getElementById("timeline").textContent.includes("draining") &&
      document.getElementById("timeline").textContent.includes(id), instance, { timeout: 10000 });
    if (png) await page.screenshot({ path: png, fullPage: true });
    if (errors.length) throw new Error("page errors: " + errors.join("; "));
    console.log("dashboard: instances shown, drain applied, event received");
  } finally {
    await browser.close();
  }
}

main().catch((e) => { console.error("dashboard test failed:", e.message); process.exit(1); });
