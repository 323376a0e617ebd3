/**
 * Generate images with previews and write them to disk.
 *
 *   npm run example -- [TARGET] [PROMPT] [OUT_DIR]
 *   (defaults: 127.0.0.1:50051, "a red circle on the left", ./out; STEPSERVE_TOKEN for a token)
 */

import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";

import { StepserveClient, StepserveError } from "../src/index.js";

async function main(): Promise<number> {
  const [target = "127.0.0.1:50051", prompt = "a red circle on the left", outDir = "out"] = process.argv.slice(2);
  const client = new StepserveClient({ target, token: process.env.STEPSERVE_TOKEN });
  mkdirSync(outDir, { recursive: true });
  try {
    for await (const ev of client.generate({ prompt, seed: 7n, numImages: 2, previewEveryNSteps: 5 })) {
      switch (ev.event.case) {
        case "queued":
          console.log(`queued at ${ev.event.value.position}`);
          break;
        case "progress": {
          const p = ev.event.value;
          console.log(`step ${p.step}/${p.totalSteps}${p.preview ? " (preview)" : ""}`);
          if (p.preview) writeFileSync(join(outDir, `preview-${p.step}.jpg`), p.preview.data);
          break;
        }
        case "result": {
          const r = ev.event.value;
          r.images.forEach((img, i) => writeFileSync(join(outDir, `image-${i}.png`), img.data));
          console.log(`${r.images.length} images, ${r.usage?.acceleratorSeconds.toFixed(3)} accelerator-seconds`);
          break;
        }
      }
    }
  } catch (e) {
    if (e instanceof StepserveError) {
      console.error(`${e.codeName}: ${e.message}`);
      for (const v of e.fieldViolations) console.error(`  ${v.field}: ${v.description}`);
      return 1;
    }
    throw e;
  }
  return 0;
}

process.exitCode = await main();
