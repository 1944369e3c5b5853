// Opens the clipcap page, uploads an image, and checks that a caption with a score and
// timings appears; then opens the training section with TOKEN (default: a wrong one) and reports
// the jobs it lists and whether their loss curves rendered.
// Usage: node page.mjs URL IMAGE SCREENSHOT [TOKEN]
import { chromium } from "playwright-core";

const [url, image, shot, token] = process.argv.slice(2);
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
  await page.setInputFiles("#file", image);
  await page.waitForSelector("#preview", { state: "visible" });
  await page.selectOption("#strategy", "beam");
  await page.fill("#beam_size", "3");
  await page.fill("#n", "2");
  await page.click("#go");
  await page.waitForSelector("#captions li.caption", { timeout: 60000 });
  const captions = await page.$$eval("#captions li.caption", (els) => els.map((e) => e.firstChild.textContent));
  const scores = await page.$$eval("#captions .score", (els) => els.map((e) => e.textContent));
  const timings = await page.$$eval("#timings td", (els) => els.map((e) => e.textContent));
  const error = await page.textContent("#error");
  // The training section asks the admin API with the token typed in.
  await page.click("#training summary");
  await page.fill("#token", token || "not-the-token");
  await page.click("#jobs-load");
  await page.waitForFunction(
    () => document.querySelector("#jobs-error").textContent !== "" || document.querySelector("#jobs .job img") !== null,
    null, { timeout: 20000 });
  const jobsError = await page.textContent("#jobs-error");
  const jobs = await page.$$eval("#jobs .job", (els) => els.map((e) => e.textContent));
  // A loss curve counts as shown once the browser has decoded it into a picture with a size.
  const curves = await page.$$eval("#jobs .job img", (imgs) => Promise.all(imgs.map((img) =>
    img.decode().then(() => ({ alt: img.alt, width: img.naturalWidth, height: img.naturalHeight }),
                      () => ({ alt: img.alt, width: 0, height: 0 })))));
  await page.screenshot({ path: shot, fullPage: true });
  console.log(JSON.stringify({ captions, scores, timings, error, jobsError, jobs, curves }));
} finally {
  await browser.close();
}
