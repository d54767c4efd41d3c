"""OpenAI's images API on `t2i-serve`: `POST /v1/images/generations`, `GET /v1/models` (what the `openai` package
and the tools built on it call), on the same queue, limits and core as every other route.

A request runs with the server's own settings (steps, guidance, sampler, clip skip: its config) at the requested
size; each image gets a random seed (or `seed`, an extension OpenAI lacks, as `extra_body={"seed": N}`), recorded in
the PNG like every image. Fields that ask for something this server cannot do (`style`, `quality: hd`, a JPEG
`output_format`, streaming, …) are refused (400) by name. `response_format: url` returns a link to this server
(`/v1/images/files/TOKEN.png`) that works without the key for `server.image_url_ttl` seconds, as OpenAI's do.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import secrets
import threading
import time
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from omegaconf import DictConfig
from pydantic import BaseModel, ConfigDict, Field

from .forms import FormError, JobRequest, allowed_models, first_value, to_spec
from .jobs import JobQueue, wait_for

log = logging.getLogger("runner.server.openai")
OPENAI_PREFIX = "/v1/"
FILES_PREFIX = "/v1/images/files/"
_SIZE = re.compile(r"^\s*(\d{1,5})\s*x\s*(\d{1,5})\s*$")
_FILE = re.compile(r"^([A-Za-z0-9_-]{16,64})\.png$")
# our field names (and config keys) -> the request's, in error messages; the first word is the error's `param`
NAMES = {"total_nm_img_prompt": "n", "manual_seed": "seed", "modelid": "model", "width": "size width",
         "height": "size height", "prompts[0]": "prompt"}


class OpenAIError(FormError):
    """A refused request in OpenAI's terms: status, message, the field (`param`) and a `code`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(status, message)
        self.param = param
        self.code = code


def error_type(status: int) -> str:
    return {401: "invalid_request_error", 403: "invalid_request_error", 404: "invalid_request_error",
            429: "rate_limit_exceeded", 503: "server_error"}.get(status, "server_error" if status >= 500
                                                                 else "invalid_request_error")


def error_response(status: int, message: str, headers: dict | None = None, param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    """OpenAI's error body: `{"error": {"message", "type", "param", "code"}}` (a 422 is OpenAI's 400)."""
    status = 400 if status == 422 else status
    body = {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def error_for(status: int, message: str, headers: dict | None, exc: Exception | None) -> JSONResponse:
    """The OpenAI-shaped response for an error any handler of the app caught on a `/v1/` route."""
    if isinstance(exc, RequestValidationError):
        err = exc.errors()[0]
        loc = [str(p) for p in err["loc"] if p != "body"]
        param = loc[0] if loc else None
        if err["type"] == "extra_forbidden":
            return error_response(400, f"Unrecognized request argument supplied: {param}", headers, param)
        got = err.get("input")
        shown = "" if err["type"] == "missing" or isinstance(got, dict | list) else f" (got {got!r})"
        return error_response(400, f"{'.'.join(loc) or 'body'}: {err['msg']}{shown}", headers, param)
    if isinstance(exc, OpenAIError):
        return error_response(status, message, headers, exc.param, exc.code)
    param = next((theirs.split()[0] for theirs in NAMES.values() if message.startswith(theirs)), None)
    return error_response(status, message, headers, param)


class ImageRequest(BaseModel):
    """OpenAI's `images.generate` body (what this server can honour; the rest is refused by name)."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1)
    model: str | None = Field(None, description="one of GET /v1/models; default: the server's model")
    n: int | None = Field(1, description="images, seeds seed … seed+n-1 (at most server.max_images)")
    size: str | None = Field(None, description="WIDTHxHEIGHT, multiples of 8; auto/omitted: the model's own")
    response_format: Literal["url", "b64_json"] | None = "url"
    user: str | None = Field(None, description="your end user's id (logged)")
    seed: int | None = Field(None, description="extension: the first seed (default random); recorded per image")
    quality: str | None = None
    style: str | None = None
    background: str | None = None
    output_format: str | None = None
    output_compression: int | None = None
    moderation: str | None = None
    stream: bool | None = None
    partial_images: int | None = None


# field -> (values that ask for nothing this server does not do, what other values ask for)
NEUTRAL: dict[str, tuple[tuple, str]] = {
    "quality": ((None, "auto", "standard"), "a quality level (steps come from the server's config)"),
    "style": ((None,), "a DALL-E 3 style"),
    "background": ((None, "auto", "opaque"), "a transparent background"),
    "output_format": ((None, "png"), "another image format (this server writes PNG)"),
    "output_compression": ((None, 100), "compression (PNG is lossless)"),
    "moderation": ((None, "low"), "moderation (this server does not filter prompts)"),
    "stream": ((None, False), "streaming"),
    "partial_images": ((None, 0), "partial images"),
}


def check_neutral(req: ImageRequest) -> None:
    for name, (ok, what) in NEUTRAL.items():
        value = getattr(req, name)
        if value not in ok:
            valid = ", ".join("omitted" if v is None else repr(v) for v in ok)
            raise OpenAIError(400, f"{name}={value!r} asks for {what}, which this server cannot do; valid: {valid}",
                              name)


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    if size is None or size.strip() == "auto":
        return None, None
    m = _SIZE.match(size)
    if not m:
        raise OpenAIError(400, f"size={size!r} is not valid; give WIDTHxHEIGHT (e.g. 512x512, multiples of 8) or "
                               "auto (the model's own size)", "size")
    return int(m.group(1)), int(m.group(2))


class ImageLinks:
    """Unguessable, expiring links to generated files (what `response_format: url` returns)."""

    def __init__(self, ttl: int) -> None:
        self.ttl = ttl
        self._links: dict[str, tuple[Path, float]] = {}
        self._lock = threading.Lock()

    def add(self, path: Path) -> str:
        token = secrets.token_urlsafe(24)
        now = time.time()
        with self._lock:
            self._links = {t: v for t, v in self._links.items() if v[1] > now}
            self._links[token] = (path, now + self.ttl)
        return token

    def get(self, token: str) -> Path | None:
        with self._lock:
            path, until = self._links.get(token, (None, 0.0))
        return path if path is not None and until > time.time() else None


def openai_router(cfg: DictConfig, queue: JobQueue, out_dir: Path, started: float) -> APIRouter:
    """The `/v1/*` routes for the server whose config is `cfg`."""
    router = APIRouter(tags=["OpenAI images API"])
    links = ImageLinks(int(cfg.server.get("image_url_ttl", 3600)))

    # 1. Models by OpenAI's names, and a request as a run spec (the shared limits and model rule).
    def model_entry(mid: str) -> dict[str, Any]:
        return {"id": mid, "object": "model", "created": int(started), "owned_by": "t2i-runner"}

    def model_id(name: str | None) -> str:
        valid = allowed_models(cfg)
        if name is None or name in valid:
            return name or valid[0]
        raise OpenAIError(404, f"The model `{name}` does not exist or you do not have access to it; valid: "
                               f"{', '.join(valid)} (GET /v1/models)", "model", "model_not_found")

    def spec_of(req: ImageRequest) -> Any:
        # 1. Check what OpenAI's fields ask for
        check_neutral(req)
        width, height = parse_size(req.size)
        n = 1 if req.n is None else req.n
        seed = None if req.seed in (None, -1) else req.seed
        # 2. The server's own generation settings, the shared limits and model rule
        job = JobRequest(modelid=model_id(req.model), text_prompt=req.prompt, total_nm_img_prompt=n,
                         inference_steps=first_value(cfg.steps), guidance_scale=first_value(cfg.guidance_scale),
                         manual_seed=seed, width=width, height=height)
        return to_spec(job, cfg, names=NAMES)

    # 2. Generation: images as base64 or as expiring URLs served below.
    @router.post("/v1/images/generations", summary="Create images (OpenAI's images.generate)")
    async def generations(request: Request, req: ImageRequest) -> dict[str, Any]:
        spec = await run_in_threadpool(spec_of, req)
        job = await run_in_threadpool(queue.submit, spec)
        log.info("OpenAI request %s: %d image(s) for user %r", job.id[:8], len(job.files), req.user)
        await wait_for(queue, job)
        if job.status != "done":
            raise OpenAIError(job.error_status, job.error or "generation failed")
        root = os.path.realpath(out_dir)
        data = []
        for path in job.files:
            assert path is not None and os.path.realpath(path).startswith(root + os.sep)
            if req.response_format == "b64_json":
                item = {"b64_json": base64.b64encode(path.read_bytes()).decode()}
            else:
                item = {"url": str(request.url_for("openai_image_file", name=f"{links.add(path)}.png"))}
            data.append({**item, "revised_prompt": req.prompt})  # the prompt as used: this server never rewrites
        return {"created": int(time.time()), "data": data}

    @router.get(FILES_PREFIX + "{name}", name="openai_image_file", response_class=FileResponse,
                summary="A generated image (the url of response_format=url; expires)",
                responses={200: {"content": {"image/png": {}}}})
    async def image_file(name: str) -> FileResponse:
        m = _FILE.match(name)
        path = links.get(m.group(1)) if m else None
        if path is None or not path.is_file():
            raise OpenAIError(404, f"no image {name!r} here (links expire after {links.ttl} s)", None, "not_found")
        return FileResponse(path, media_type="image/png")

    # 3. The models a request may name.
    @router.get("/v1/models", summary="The models a request may name")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_entry(m) for m in allowed_models(cfg)]}

    @router.get("/v1/models/{model:path}", summary="One model")
    async def model(model: str) -> dict[str, Any]:
        return model_entry(model_id(model))

    return router
