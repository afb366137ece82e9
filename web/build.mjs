// Builds the chat page and the dashboard into dist/, which chatd serves
// (web.dir). The SDK is bundled from its TypeScript source in ../sdk/js,
// with this folder's dependencies.
import * as esbuild from "esbuild";
import { cpSync, mkdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const out = join(here, "dist");
mkdirSync(out, { recursive: true });
cpSync(join(here, "static"), out, { recursive: true });
await esbuild.build({
  entryPoints: { chat: join(here, "src/chat.ts"), dashboard: join(here, "src/dashboard.ts") },
  outdir: out,
  bundle: true,
  format: "esm",
  platform: "browser",
  target: "es2022",
  minify: true,
  sourcemap: true,
  alias: { "@chatd/client": join(here, "../sdk/js/src/index.ts") },
  // The SDK's imports (mqtt) resolve here when ../sdk/js has no node_modules.
  nodePaths: [join(here, "node_modules")],
  logLevel: "warning",
});
console.log(`built the chat page into ${out}`);
