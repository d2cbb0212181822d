// Builds dist/ (the bundle and the page) with esbuild and prints the Subresource Integrity
// hash of each file, for a deployment that pins its bundle.
import { createHash } from "node:crypto";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { build } from "esbuild";

// node build.mjs [OUTDIR]: another directory lets a test compare a fresh build with dist/
const out = process.argv[2] ?? "dist";
mkdirSync(out, { recursive: true });
await build({
  entryPoints: ["src/page.js"],
  bundle: true,
  format: "esm",
  target: ["chrome120", "firefox130", "safari17"],
  minify: true,
  legalComments: "none",
  outfile: `${out}/sealstream-web.js`,
  logLevel: "warning",
});
const sri = (/** @type {string} */ f) =>
  `sha384-${createHash("sha384").update(readFileSync(f)).digest("base64")}`;
// the page pins its bundle: a copy of index.html served elsewhere loads only this build
const bundle = sri(`${out}/sealstream-web.js`);
// uPlot's stylesheet goes inline: the page is served as two files, under a CSP without
// style-src 'self'
const chartCss = readFileSync("node_modules/uplot/dist/uPlot.min.css", "utf-8").trim();
const page = readFileSync("index.html", "utf-8")
  .replace('<style id="uplot-css"></style>', `<style id="uplot-css">${chartCss}</style>`)
  .replace(
    '<script type="module" src="sealstream-web.js"></script>',
    `<script type="module" src="sealstream-web.js" integrity="${bundle}"></script>`,
  );
if (!page.includes(bundle)) throw new Error("index.html has no script tag to pin");
if (!page.includes(chartCss)) throw new Error("index.html has no place for the charts' CSS");
writeFileSync(`${out}/index.html`, page);
for (const f of [`${out}/sealstream-web.js`, `${out}/index.html`]) console.log(`${f} ${sri(f)}`);
