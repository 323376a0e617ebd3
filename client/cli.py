"""``stepserve-client``: generate images and list models from the command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

from stepserve.v1 import image_generation_pb2 as pb

from .client import GenerationResult, ImageClient, TlsOptions, build_request, parse_lora, task_names
from .errors import StepserveError


class ProgressBar:
    """A one-line text progress display on a terminal (plain lines otherwise)."""

    def __init__(self, out: TextIO, width: int = 30) -> None:
        self.out = out
        self.width = width
        self.tty = out.isatty()
        self._last = ""

    def show(self, text: str) -> None:
        if self.tty:
            self.out.write("\r" + text.ljust(len(self._last)))
        elif text != self._last:
            self.out.write(text + "\n")
        self.out.flush()
        self._last = text

    def steps(self, step: int, total: int, elapsed_ms: int) -> None:
        filled = int(self.width * step / max(1, total))
        bar = "#" * filled + "-" * (self.width - filled)
        self.show(f"[{bar}] step {step}/{total} {elapsed_ms / 1000:.1f}s")

    def done(self) -> None:
        if self.tty:
            self.out.write("\n")
            self.out.flush()


def _size(text: str) -> tuple[int, int]:
    w, sep, h = text.lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit():
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {text!r}")
    return int(w), int(h)


def _image_file(text: str) -> bytes:
    """An image option's file, read when the command line is parsed, so that a missing or
    unreadable file is a usage error naming the option, before anything is sent."""
    try:
        return Path(text).read_bytes()
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot read {text!r}: {e.strerror or e}") from None


def _lora(text: str) -> tuple[str, float]:
    try:
        return parse_lora(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _pixels(text: str) -> int:
    """A non-negative pixel count (the server checks the upper bound)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 1 << 32:
        raise argparse.ArgumentTypeError(f"expected a non-negative number of pixels, got {text!r}")
    return value


def _output_paths(out: Path, n: int) -> list[Path]:
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(n)]


def _client(args: argparse.Namespace) -> ImageClient:
    tls = None
    if args.tls or args.ca_cert or args.client_cert:
        tls = TlsOptions(
            root_certificates=Path(args.ca_cert).read_bytes() if args.ca_cert else None,
            certificate_chain=Path(args.client_cert).read_bytes() if args.client_cert else None,
            private_key=Path(args.client_key).read_bytes() if args.client_key else None,
        )
    metadata = [("authorization", f"Bearer {args.token}")] if args.token else []
    return ImageClient(args.target, tls=tls, metadata=metadata, timeout_s=args.timeout)


def cmd_generate(args: argparse.Namespace) -> int:
    width, height = args.size or (0, 0)
    fmt = args.format or {".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}.get(
        Path(args.output).suffix.lower(), "png"
    )
    req = build_request(
        args.prompt,
        model=args.model,
        negative_prompt=args.negative_prompt,
        width=width,
        height=height,
        steps=args.steps,
        guidance_scale=args.guidance,
        seed=args.seed,
        sampler=args.sampler or 0,
        num_images=args.num_images,
        preview_every=args.preview_every if args.previews else 0,
        output_format=fmt,
        request_id=args.request_id,
        priority=args.priority or 0,
        preset=args.preset or 0,
        karras_sigmas=args.karras,
        init_image=args.init_image,
        strength=args.strength,
        mask_image=args.mask,
        preserve_unmasked=args.preserve_unmasked,
        mask_feather_px=args.mask_feather,
        loras=args.lora,
        cache_interval=args.cache_interval,
    )
    bar = ProgressBar(sys.stderr)
    previews = Path(args.previews) if args.previews else None
    result: GenerationResult | None = None
    with _client(args) as client:
        try:
            for resp in client.stream(req):
                kind = resp.WhichOneof("event")
                if kind == "queued":
                    q = resp.queued
                    bar.show(f"queued: position {q.position}, about {q.estimated_wait_ms / 1000:.1f}s")
                elif kind == "progress":
                    p = resp.progress
                    if p.paused:
                        bar.show(f"paused at step {p.step}/{p.total_steps} (more urgent work runs first)")
                    else:
                        bar.steps(p.step, p.total_steps, p.elapsed_ms)
                    if previews is not None and p.HasField("preview"):
                        previews.mkdir(parents=True, exist_ok=True)
                        (previews / f"step-{p.step:03d}.jpg").write_bytes(p.preview.data)
                elif kind == "result":
                    result = GenerationResult.from_response(resp)
        except StepserveError as e:
            bar.done()
            print(f"error: {e.code.name}: {e.message}", file=sys.stderr)
            for v in e.field_violations:
                print(f"  {v.field}: {v.description}", file=sys.stderr)
            return 1
    bar.done()
    if result is None:
        print("error: the stream ended without a result", file=sys.stderr)
        return 1
    for img, path in zip(result.images, _output_paths(Path(args.output), len(result.images)), strict=True):
        img.save(path)
        print(f"wrote {path} ({img.width_px}x{img.height_px}, seed {img.seed})")
    u = result.usage
    encode = f", image encode {u.image_encode_seconds:.3f} s" if u.image_encode_seconds else ""
    print(
        f"request {result.request_id}: {u.steps} steps, queued {u.queue_ms} ms, total {u.total_ms} ms, "
        f"{u.accelerator_seconds:.3f} accelerator-s (mean batch {u.mean_batch_size:.1f}{encode}), "
        f"${u.cost_usd:.6f}"
        + (" (from the result cache)" if u.cached else "")
        + (" (shared an identical generation in flight)" if u.coalesced else "")
    )
    if previews is not None:
        print(f"previews in {previews}/")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    with _client(args) as client:
        try:
            models = client.list_models()
        except StepserveError as e:
            print(f"error: {e.code.name}: {e.message}", file=sys.stderr)
            return 1
    for m in models:
        samplers = ", ".join(
            pb.Sampler.Name(s).removeprefix("SAMPLER_").lower() for s in m.supported_samplers
        )
        presets = ", ".join(
            f"{pb.Preset.Name(p.preset).removeprefix('PRESET_').lower()} {p.steps}"
            + (f" (cache every {p.cache_interval})" if p.cache_interval else "")
            for p in m.presets
        )
        print(
            f"{m.name}{' (default)' if m.is_default else ''}: {m.family}, "
            f"{m.default_width_px}x{m.default_height_px}, {m.default_steps} steps, "
            f"guidance {m.default_guidance_scale:g}{' (embedded)' if m.guidance_embedded else ''}, "
            f"max batch {m.max_batch_size}, samplers: {samplers}, presets: {presets}, "
            f"tasks: {', '.join(task_names(m))}"
            + (f", loras: {', '.join(f'{x.name} (rank {x.rank})' for x in m.loras)}" if m.loras else "")
            + (f", feature caching up to every {m.max_cache_interval} steps" if m.max_cache_interval else "")
            + (f", quantization {m.quantization}" if m.quantization not in ("", "none") else "")
        )
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 once the server reports SERVING (waiting up to --wait seconds), else 1."""
    import time

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    end = time.monotonic() + args.wait
    status = "UNREACHABLE"
    with _client(args) as client:
        stub = health_pb2_grpc.HealthStub(client.channel)
        while True:
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=2)
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
            except grpc.RpcError as e:
                status = f"UNREACHABLE ({e.code().name})"
            if status == "SERVING" or time.monotonic() >= end:
                break
            time.sleep(0.5)
    print(status)
    return 0 if status == "SERVING" else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="stepserve-client", description="Call a stepserve server.")
    p.add_argument(
        "--target", default="localhost:50051", help="server address (host:port or dns:///name:port)"
    )
    p.add_argument("--timeout", type=float, default=None, help="deadline of the call in seconds")
    p.add_argument("--token", default=None, help="bearer token to send")
    p.add_argument("--tls", action="store_true", help="use TLS with the system's root certificates")
    p.add_argument("--ca-cert", default=None, help="PEM file of the CA to trust (implies --tls)")
    p.add_argument("--client-cert", default=None, help="PEM client certificate chain for mutual TLS")
    p.add_argument("--client-key", default=None, help="PEM client private key for mutual TLS")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate images from a prompt")
    g.add_argument("prompt")
    g.add_argument(
        "-o", "--output", default="out.png", help="output file; several images get -0, -1, ... suffixes"
    )
    g.add_argument("--model", default="", help="model name (default: the server's default)")
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--steps", type=int, default=0)
    g.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    g.add_argument("--size", type=_size, default=None, help="WIDTHxHEIGHT")
    g.add_argument(
        "--sampler", choices=["euler", "euler_ancestral", "ddim", "dpm_solver_multistep", "lcm"], default=None
    )
    g.add_argument(
        "--preset", choices=["draft", "standard", "high"], default=None, help="steps by quality level"
    )
    g.add_argument(
        "--karras", action="store_true", help="Karras noise schedule (euler, dpm_solver_multistep)"
    )
    g.add_argument("--num-images", type=int, default=0)
    g.add_argument(
        "--format", choices=["png", "jpeg", "webp"], default=None, help="default: from -o's suffix"
    )
    g.add_argument("--previews", default=None, metavar="DIR", help="save previews of the forming image here")
    g.add_argument("--preview-every", type=int, default=1, help="steps between previews (with --previews)")
    g.add_argument("--request-id", default="")
    g.add_argument(
        "--priority",
        choices=["interactive", "batch"],
        default=None,
        help="scheduling class (default: interactive)",
    )
    images = g.add_argument_group("image inputs (image-to-image, inpainting)")
    images.add_argument(
        "--init-image",
        type=_image_file,
        default=None,
        metavar="PATH",
        help="PNG, JPEG or WebP to start from (image-to-image); output is its size unless --size",
    )
    images.add_argument(
        "--strength",
        type=float,
        default=None,
        help="share of the schedule run from --init-image, in (0, 1] (server default 0.8)",
    )
    images.add_argument(
        "--mask",
        type=_image_file,
        default=None,
        metavar="PATH",
        help="with --init-image: inpaint; white = repaint, black = keep, same size as the init image",
    )
    images.add_argument(
        "--preserve-unmasked",
        action="store_true",
        help="paste the init image's pixels back outside the mask (with a feathered edge)",
    )
    images.add_argument(
        "--mask-feather",
        type=_pixels,
        default=None,
        metavar="PX",
        help="edge blend width for --preserve-unmasked, 0-64 (server default 4, 0 = hard edge)",
    )
    g.add_argument(
        "--lora",
        action="append",
        type=_lora,
        default=[],
        metavar="NAME[:SCALE]",
        help="a LoRA adapter the model lists (repeatable, stacked in order); scale in [-4, 4], default 1",
    )
    g.add_argument(
        "--cache-interval",
        type=int,
        default=None,
        metavar="N",
        help="feature caching: the UNet's deep features every N steps, reused in between (faster, "
        "slightly different image; 0 or 1 = off; default: the preset's)",
    )
    g.set_defaults(func=cmd_generate)

    m = sub.add_parser("models", help="list the server's models")
    m.set_defaults(func=cmd_models)

    h = sub.add_parser("health", help="check (or wait for) the server's gRPC health")
    h.add_argument("--wait", type=float, default=0.0, help="keep asking for up to this many seconds")
    h.add_argument("--service", default="", help="service name to ask about (default: the whole server)")
    h.set_defaults(func=cmd_health)

    args = p.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
