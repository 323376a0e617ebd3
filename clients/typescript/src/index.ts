/**
 * A typed client for stepserve's ImageGenerationService over gRPC (HTTP/2), from the stubs
 * `make clients` generates from proto/stepserve/v1 (src/gen/, do not edit).
 *
 * ```ts
 * const client = new StepserveClient({ target: "127.0.0.1:50051" });
 * for await (const ev of client.generate({ prompt: "a red circle", seed: 1n, previewEveryNSteps: 1 })) {
 *   if (ev.event.case === "progress") console.log(ev.event.value.step);
 * }
 * ```
 */

import { createHash } from "node:crypto";

import { clone, create, toBinary, type MessageInitShape } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient, type Client, type Interceptor } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";

import { BadRequestSchema, RetryInfoSchema } from "./gen/google/rpc/error_details_pb.js";
import { Health, HealthCheckResponse_ServingStatus } from "./gen/grpc_health/v1/health_pb.js";
import {
  GenerateRequestSchema,
  ImageGenerationService,
  Priority,
  type GenerateRequest,
  type GenerateResponse,
  type ModelInfo,
  type Result,
} from "./gen/stepserve/v1/image_generation_pb.js";

export * from "./gen/stepserve/v1/image_generation_pb.js";
export { Code } from "@connectrpc/connect";

/** How to reach a server. */
export interface ClientOptions {
  /** host:port, or a URL (http://host:port, https://host:port). */
  target: string;
  /** Use TLS (implied by an https:// target or any of ca/cert/key). */
  tls?: boolean;
  /** PEM of the CA to trust (default: Node's root certificates). */
  ca?: string | Buffer;
  /** PEM client certificate chain and key, for mutual TLS. */
  cert?: string | Buffer;
  key?: string | Buffer;
  /** Bearer token, sent as `authorization: Bearer <token>`. */
  token?: string;
  /** Default deadline of every call, in milliseconds (none by default). */
  timeoutMs?: number;
}

/** One field the server refused, from google.rpc.BadRequest. */
export interface FieldViolation {
  field: string;
  description: string;
}

/**
 * A failed call: the gRPC status code (`code`, and its name as gRPC spells it, e.g.
 * "INVALID_ARGUMENT") and the server's message, with the google.rpc details decoded: the
 * fields a request got wrong (BadRequest) and when to retry (RetryInfo).
 */
export class StepserveError extends Error {
  readonly code: Code;
  readonly codeName: string;
  readonly fieldViolations: FieldViolation[];
  readonly retryAfterMs: number | undefined;

  constructor(cause: ConnectError) {
    super(cause.rawMessage, { cause });
    this.name = "StepserveError";
    this.code = cause.code;
    this.codeName = grpcCodeName(cause.code);
    this.fieldViolations = cause
      .findDetails(BadRequestSchema)
      .flatMap((br) => br.fieldViolations.map((v) => ({ field: v.field, description: v.description })));
    const retry = cause.findDetails(RetryInfoSchema)[0]?.retryDelay;
    this.retryAfterMs =
      retry === undefined ? undefined : Number(retry.seconds) * 1000 + Math.round(retry.nanos / 1e6);
  }
}

/** gRPC's name of a status code (Connect's enum names them in CamelCase, "Canceled"). */
export function grpcCodeName(code: Code): string {
  if (code === Code.Canceled) return "CANCELLED";
  return Code[code].replace(/([a-z])([A-Z])/g, "$1_$2").toUpperCase();
}

/** Routing hints for a proxy in front of several replicas (deploy/k8s/components/envoy/). */
export const CACHE_KEY_HEADER = "x-stepserve-cache-key";
export const LORA_HEADER = "x-stepserve-lora";

/**
 * The routing hints of a request, as the Python client computes them: for a seeded request,
 * the SHA-256 (first 32 hex digits) of its wire encoding without the fields that change no
 * pixels (request id, priority, previews); the adapters' names, sorted, comma-separated. The
 * server never reads them.
 */
export function routingHeaders(request: GenerateRequest): Record<string, string> {
  const out: Record<string, string> = {};
  if (request.seed !== undefined) {
    const key = clone(GenerateRequestSchema, request);
    key.requestId = "";
    key.priority = Priority.UNSPECIFIED;
    key.previewEveryNSteps = 0;
    key.previewMaxSizePx = 0;
    const digest = createHash("sha256").update(toBinary(GenerateRequestSchema, key)).digest("hex");
    out[CACHE_KEY_HEADER] = digest.slice(0, 32);
  }
  if (request.loras.length > 0) {
    out[LORA_HEADER] = [...new Set(request.loras.map((l) => l.name))].sort().join(",");
  }
  return out;
}

/** The request fields of a Generate call (protobuf-es init shape: plain object literals). */
export type GenerateInit = MessageInitShape<typeof GenerateRequestSchema>;

/** Per-call options: abort with `signal` to cancel; `timeoutMs` is the call's deadline. */
export interface CallOptions {
  signal?: AbortSignal;
  timeoutMs?: number;
}

export class StepserveClient {
  readonly stub: Client<typeof ImageGenerationService>;
  readonly health: Client<typeof Health>;
  private readonly timeoutMs: number | undefined;

  constructor(options: ClientOptions) {
    const secure =
      options.tls || options.target.startsWith("https://") || Boolean(options.ca || options.cert || options.key);
    const baseUrl = /^https?:\/\//.test(options.target)
      ? options.target
      : `${secure ? "https" : "http"}://${options.target}`;
    const interceptors: Interceptor[] = [];
    if (options.token !== undefined) {
      const value = `Bearer ${options.token}`;
      interceptors.push((next) => (req) => {
        req.header.set("authorization", value);
        return next(req);
      });
    }
    const transport = createGrpcTransport({
      baseUrl,
      interceptors,
      nodeOptions: secure ? { ca: options.ca, cert: options.cert, key: options.key } : {},
    });
    this.stub = createClient(ImageGenerationService, transport);
    this.health = createClient(Health, transport);
    this.timeoutMs = options.timeoutMs;
  }

  /**
   * The events of one generation, in order: Queued, Progress (with previews when asked),
   * then exactly one Result. Errors are thrown as StepserveError; aborting `signal` cancels
   * the generation (the server drops it at its next step) and throws one with Code.Canceled.
   */
  async *generate(request: GenerateInit, options: CallOptions = {}): AsyncGenerator<GenerateResponse> {
    try {
      const message = create(GenerateRequestSchema, request);
      yield* this.stub.generate(message, { ...this.call(options), headers: routingHeaders(message) });
    } catch (e) {
      throw asStepserveError(e);
    }
  }

  /** Run a generation to its end and return its Result (the events between are dropped). */
  async generateImages(request: GenerateInit, options: CallOptions = {}): Promise<Result> {
    for await (const ev of this.generate(request, options)) {
      if (ev.event.case === "result") return ev.event.value;
    }
    throw new StepserveError(new ConnectError("the stream ended without a result", Code.Internal));
  }

  /** The models the server runs, the default first. */
  async listModels(options: CallOptions = {}): Promise<ModelInfo[]> {
    try {
      return (await this.stub.listModels({}, this.call(options))).models;
    } catch (e) {
      throw asStepserveError(e);
    }
  }

  /** grpc.health.v1 Check: whether the server (or `service`) is SERVING. */
  async isServing(service = "", options: CallOptions = {}): Promise<boolean> {
    try {
      const res = await this.health.check({ service }, this.call(options));
      return res.status === HealthCheckResponse_ServingStatus.SERVING;
    } catch (e) {
      throw asStepserveError(e);
    }
  }

  private call(options: CallOptions): CallOptions {
    return { signal: options.signal, timeoutMs: options.timeoutMs ?? this.timeoutMs };
  }
}

function asStepserveError(e: unknown): StepserveError {
  return e instanceof StepserveError ? e : new StepserveError(ConnectError.from(e));
}
