// Builds dist/ (the bundle and the page) with esbuild and prints the Subresource Integrity
// hash of each file, for a deployment that pins its bundle.
import { createHash } from "node:crypto";
import { copyFileSync, mkdirSync, readFileSync } from "node:fs";
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
copyFileSync("index.html", `${out}/index.html`);
for (const f of [`${out}/sealstream-web.js`, `${out}/index.html`]) {
  const sri = createHash("sha384").update(readFileSync(f)).digest("base64");
  console.log(`${f} sha384-${sri}`);
}
