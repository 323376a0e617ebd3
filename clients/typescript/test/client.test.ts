/**
 * The client against a live stepserve server on the embedded model (started by
 * tests/test_clients.py, which sets STEPSERVE_TARGET and STEPSERVE_METRICS_URL).
 */

import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdtempSync, readdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { promisify } from "node:util";

import { create } from "@bufbuild/protobuf";

import { Code, GenerateRequestSchema, routingHeaders, StepserveClient, StepserveError } from "../src/index.js";

const target = process.env.STEPSERVE_TARGET;
const metricsUrl = process.env.STEPSERVE_METRICS_URL;
if (!target || !metricsUrl) throw new Error("set STEPSERVE_TARGET and STEPSERVE_METRICS_URL (tests/test_clients.py does)");
const client = new StepserveClient({ target, timeoutMs: 120_000 });
const PNG = [0x89, 0x50, 0x4e, 0x47];

async function cancelledCount(): Promise<number> {
  const text = await (await fetch(metricsUrl!)).text();
  const line = text.split("\n").find((l) => l.startsWith("stepserve_requests_total{") && l.includes('code="cancelled"'));
  return line === undefined ? 0 : Number(line.split(" ").at(-1));
}

test("health check says SERVING", async () => {
  assert.equal(await client.isServing(), true);
  assert.equal(await client.isServing("stepserve.v1.ImageGenerationService"), true);
});

test("ListModels lists the embedded model first", async () => {
  const models = await client.listModels();
  assert.equal(models[0].name, "tiny-shapes");
  assert.equal(models[0].isDefault, true);
});

test("generate streams progress with previews, then the images", async () => {
  const steps: number[] = [];
  const previews: number[] = [];
  let result;
  for await (const ev of client.generate({ prompt: "a red circle on the left", seed: 3n, steps: 6, numImages: 2, previewEveryNSteps: 2 })) {
    if (ev.event.case === "progress") {
      steps.push(ev.event.value.step);
      if (ev.event.value.preview) previews.push(ev.event.value.step);
    } else if (ev.event.case === "result") {
      result = ev.event.value;
    }
  }
  assert.deepEqual(steps, [1, 2, 3, 4, 5, 6]);
  assert.deepEqual(previews, [2, 4, 6]);
  assert.ok(result);
  assert.equal(result.images.length, 2);
  assert.deepEqual([...result.images[0].data.subarray(0, 4)], PNG);
  assert.deepEqual(result.images.map((i) => i.seed), [3n, 4n]);
  assert.ok((result.usage?.acceleratorSeconds ?? 0) > 0);
});

test("aborting the stream cancels the generation on the server", async () => {
  const before = await cancelledCount();
  const abort = new AbortController();
  await assert.rejects(
    (async () => {
      for await (const ev of client.generate({ prompt: "a blue square", steps: 150, seed: 1n }, { signal: abort.signal })) {
        if (ev.event.case === "progress") abort.abort();
      }
    })(),
    (e: unknown) => e instanceof StepserveError && e.code === Code.Canceled && e.codeName === "CANCELLED",
  );
  // The server counts the call when it sees the caller leave.
  for (let i = 0; i < 100 && (await cancelledCount()) <= before; i++) await new Promise((r) => setTimeout(r, 100));
  assert.equal(await cancelledCount(), before + 1);
});

test("an invalid request is INVALID_ARGUMENT with its field violations decoded", async () => {
  await assert.rejects(client.generateImages({ prompt: "", widthPx: 33, steps: 100_000 }), (e: unknown) => {
    assert.ok(e instanceof StepserveError);
    assert.equal(e.code, Code.InvalidArgument);
    assert.equal(e.codeName, "INVALID_ARGUMENT");
    assert.deepEqual(e.fieldViolations.map((v) => v.field).sort(), ["prompt", "steps", "width_px"]);
    assert.match(e.fieldViolations.find((v) => v.field === "width_px")!.description, /multiple of 8/);
    return true;
  });
});

test("the example program writes its images and previews", async () => {
  const out = mkdtempSync(join(tmpdir(), "stepserve-ts-example-"));
  const example = join(import.meta.dirname, "..", "examples", "generate.js");
  const { stdout } = await promisify(execFile)(process.execPath, [example, target, "a green triangle", out]);
  assert.match(stdout, /2 images/);
  const files = readdirSync(out).sort();
  assert.ok(files.includes("image-0.png") && files.includes("image-1.png"), files.join(","));
  assert.ok(files.some((f) => f.startsWith("preview-")), files.join(","));
});

test("routing hints are the Python client's", () => {
  // tests/test_clients.py computes the same request's hints with the Python client.
  const expected = JSON.parse(process.env.STEPSERVE_ROUTING_HINTS ?? "null");
  assert.ok(expected, "set STEPSERVE_ROUTING_HINTS");
  const req = create(GenerateRequestSchema, {
    prompt: "a red circle",
    seed: 1n,
    steps: 4,
    guidanceScale: 7.5,
    requestId: "r1",
    previewEveryNSteps: 2,
    loras: [{ name: "b" }, { name: "a", scale: 0.5 }],
  });
  assert.deepEqual(routingHeaders(req), expected);
  assert.deepEqual(routingHeaders(create(GenerateRequestSchema, { prompt: "x" })), {});
});
