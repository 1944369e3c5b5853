// Opens the clipcap page and uploads IMAGE twice (one request, two results), holding the
// request until the progress bar shows; reads the captions, scores, timings, the model's
// provenance and whether the admin section is shown. With TOKEN it lists the training jobs and
// their loss curves; with DATASET too it starts a job from the form, cancels it with its
// Cancel button and resumes it with its Resume button, and reports the states it saw.
// Usage: node page.mjs URL IMAGE SCREENSHOT [TOKEN [DATASET]]
import { chromium } from "playwright-core";

const [url, image, shot, token, dataset] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage();
  await page.goto(url);
  await page.waitForFunction(() => document.querySelector("#modelsel option") !== null, null, { timeout: 20000 });
  const model = await page.textContent("#model");
  if (!model.includes("tiny")) throw new Error(`model list: ${model}`);
  const provenance = await page.textContent("#provenance");
  const noticeShown = await page.isVisible("#notice");
  const notice = await page.textContent("#notice");
  const api = await page.textContent("#api");
  // /caption answers only once the test has seen the progress bar.
  let release;
  const held = new Promise((r) => { release = r; });
  await page.route("**/caption", async (route) => { await held; await route.continue(); });
  await page.setInputFiles("#file", [image, image]);
  await page.waitForSelector("#preview", { state: "visible" });
  await page.selectOption("#strategy", "sample");
  const samplingEnabled = await page.$eval("#temperature", (e) => !e.disabled);
  await page.selectOption("#strategy", "beam");
  const samplingDisabledForBeam = await page.$eval("#temperature", (e) => e.disabled);
  await page.fill("#beam_size", "3");
  await page.fill("#n", "2");
  await page.fill("#prompt", "A photo of");
  await page.click("#go");
  await page.waitForSelector("#busy", { state: "visible", timeout: 10000 });
  const busyShown = true;
  release();
  await page.waitForSelector("#results .result li.caption", { timeout: 60000 });
  await page.waitForSelector("#busy", { state: "hidden", timeout: 10000 });
  const results = await page.$$eval("#results .result", (els) => els.map((e) => ({
    name: e.querySelector("h3").textContent,
    captions: Array.from(e.querySelectorAll("li.caption")).map((li) => li.firstChild.textContent),
    scores: Array.from(e.querySelectorAll(".score")).map((s) => s.textContent),
  })));
  const timings = await page.$$eval("#timings td", (els) => els.map((e) => e.textContent));
  const error = await page.textContent("#error");
  const adminShown = await page.isVisible("#training");
  let jobsError = null, jobs = [], curves = [], flow = [];
  if (adminShown) {
    await page.click("#training summary");
    await page.fill("#token", token || "not-the-token");
    const listed = async () => {
      await page.click("#jobs-load");
      await page.waitForFunction(
        () => document.querySelector("#jobs-error").textContent !== "" || document.querySelector("#jobs .job img") !== null,
        null, { timeout: 20000 });
    };
    await listed();
    jobsError = await page.textContent("#jobs-error");
    jobs = await page.$$eval("#jobs .job .status", (els) => els.map((e) => e.textContent));
    // A loss curve counts as shown once the browser has decoded it into a picture with a size.
    curves = await page.$$eval("#jobs .job img", (imgs) => Promise.all(imgs.map((img) =>
      img.decode().then(() => ({ alt: img.alt, width: img.naturalWidth, height: img.naturalHeight }),
                        () => ({ alt: img.alt, width: 0, height: 0 })))));
    if (dataset) {
      // The state of the job the form started, re-listed until `want` holds (bounded).
      const stateOf = async (want) => {
        for (let i = 0; i < 150; i++) {
          await listed();
          const states = await page.$$eval("#jobs .job", (els) => els.map((e) => ({ id: e.dataset.id, state: e.dataset.state })));
          const mine = states.filter((j) => !jobs.some((t) => t.startsWith(`${j.id}:`)));
          if (mine.length === 1 && want.includes(mine[0].state)) return mine[0];
          await page.waitForTimeout(200);
        }
        throw new Error(`the started job never reached ${want}`);
      };
      await page.fill("#job-dataset", dataset);
      await page.fill("#job-output", "page-job");
      await page.fill("#job-epochs", "5000");
      await page.click("#job-start");
      const started = await stateOf(["queued", "running"]);
      flow.push(started.state === "queued" ? "queued" : "running");
      await page.click(`#jobs .job[data-id="${started.id}"] button.cancel`);
      flow.push((await stateOf(["cancelled"])).state);
      await page.click(`#jobs .job[data-id="${started.id}"] button.resume`);
      flow.push((await stateOf(["queued", "running"])).state === "queued" ? "queued" : "running");
      await page.click(`#jobs .job[data-id="${started.id}"] button.cancel`);
      flow.push((await stateOf(["cancelled"])).state);
    }
  }
  await page.screenshot({ path: shot, fullPage: true });
  console.log(JSON.stringify({ api, provenance, noticeShown, notice, busyShown, samplingEnabled, samplingDisabledForBeam,
    results, timings, error, adminShown, jobsError, jobs, curves, flow }));
} finally {
  await browser.close();
}
