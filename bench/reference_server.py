"""The sequential reference: a plain diffusers StableDiffusionPipeline behind the same gRPC API,
called one request at a time (what most users start with; the diffusers server examples do
this). Same model, same seeds and samplers as stepserve; no batching, no previews.

Requests with an init_image run StableDiffusionImg2ImgPipeline, with a mask_image too
StableDiffusionInpaintPipeline, both on the same components (``from_pipe``), at the request's
strength (unset: 0.8, as stepserve) and the init image's size; preserve_unmasked and
mask_feather_px are ignored (the benchmark does not send them).

    python bench/reference_server.py --port 50090 [--model PATH] [--device cuda]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline
from PIL import Image

from stepserve.server.engine.models import default_model_path
from stepserve.server.engine.samplers import SAMPLER_CLASSES
from stepserve.server.engine.types import Sampler
from stepserve.v1 import image_generation_pb2 as pb
from stepserve.v1 import image_generation_pb2_grpc as pb_grpc

SAMPLERS = {
    pb.SAMPLER_EULER: Sampler.EULER,
    pb.SAMPLER_EULER_ANCESTRAL: Sampler.EULER_ANCESTRAL,
    pb.SAMPLER_DDIM: Sampler.DDIM,
    pb.SAMPLER_DPM_SOLVER_MULTISTEP: Sampler.DPM_SOLVER_MULTISTEP,
}


def load_pipeline(path: str, device: str) -> StableDiffusionPipeline:
    """The plain diffusers pipeline, as a user would load it: float16 weights on a GPU,
    float32 on CPU (as stepserve), no safety checker, no progress bar."""
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(
        path,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        torch_dtype=dtype,
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Reference(pb_grpc.ImageGenerationServiceServicer):  # type: ignore[misc]
    def __init__(self, path: str, device: str) -> None:
        self.pipe = load_pipeline(path, device)
        self.config = self.pipe.scheduler.config
        # The image-input pipelines share the text-to-image one's modules (no copies).
        self.img2img = StableDiffusionImg2ImgPipeline.from_pipe(self.pipe)
        self.inpaint = StableDiffusionInpaintPipeline.from_pipe(self.pipe)
        for pipe in (self.img2img, self.inpaint):
            pipe.set_progress_bar_config(disable=True)
        self.lock = asyncio.Lock()
        # Every generation on one and the same thread, as a plain script runs it: torch's
        # OpenMP keeps a team of threads per calling thread, and asyncio.to_thread's pool
        # handing calls to different threads left idle teams spinning on the cores.
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reference-pipe")

    def _run(self, req: pb.GenerateRequest) -> bytes:
        sampler = SAMPLERS.get(req.sampler, Sampler.EULER)
        pipe, inputs = self.pipe, {}
        if req.init_image:
            init = Image.open(io.BytesIO(req.init_image)).convert("RGB")
            inputs = {"image": init, "strength": strength(req)}
            if req.mask_image:
                m = self.inpaint.vae_scale_factor
                pipe = self.inpaint
                inputs["mask_image"] = Image.open(io.BytesIO(req.mask_image)).convert("L")
                inputs["width"], inputs["height"] = init.width - init.width % m, init.height - init.height % m
            else:
                pipe = self.img2img
        pipe.scheduler = SAMPLER_CLASSES[sampler].from_config(self.config)
        image = pipe(
            req.prompt,
            num_inference_steps=req.steps or 20,
            guidance_scale=req.guidance_scale if req.HasField("guidance_scale") else 7.5,
            generator=torch.Generator().manual_seed(req.seed),
            **inputs,
        ).images[0]
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()

    async def Generate(  # noqa: N802
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        t0 = time.perf_counter()
        async with self.lock:  # one generation at a time
            waited = time.perf_counter() - t0
            png = await asyncio.get_running_loop().run_in_executor(self.worker, self._run, request)
        steps = request.steps or 20
        if request.init_image:  # as diffusers runs them (and stepserve reports them)
            steps = int(steps * strength(request))
        usage = pb.Usage(steps=steps, queue_ms=int(waited * 1000), mean_batch_size=1)
        result = pb.Result(
            images=[pb.Image(data=png, format=pb.IMAGE_FORMAT_PNG, seed=request.seed)], usage=usage
        )
        yield pb.GenerateResponse(request_id=request.request_id, result=result)


def strength(req: pb.GenerateRequest) -> float:
    return round(req.strength, 6) if req.HasField("strength") else 0.8


async def serve(port: int, path: str, device: str) -> None:
    server = grpc.aio.server()
    pb_grpc.add_ImageGenerationServiceServicer_to_server(Reference(path, device), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--model", default=str(default_model_path()))
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    asyncio.run(serve(args.port, args.model, args.device))


if __name__ == "__main__":
    main()
