"""Serve an exported model (``cvkit export``) over HTTP: POST an image, get the task's prediction as JSON.

    python examples/serve.py runs/x/export/model.onnx --port 8000
    curl -X POST --data-binary @cat.jpg -H "Content-Type: image/jpeg" localhost:8000/predict
    curl -F file=@cat.jpg localhost:8000/predict          # multipart works too
    curl localhost:8000/health

Needs the ``export`` extra (onnxruntime, fastapi, uvicorn, python-multipart). Bad input gets a 4xx
with a one-line message: 415 for a content type that is not an image, 413 above ``--max-bytes`` or
for an image whose header claims more pixels than ``--max-pixels`` (checked before decoding; default
``$CVKIT_MAX_IMAGE_PIXELS`` or 64 megapixels), 400 for bytes that do not decode to an image (empty,
truncated, not an image). A model or contract that does not load is one line at start, exit code 2.
"""
from __future__ import annotations

import argparse
from typing import Any, Dict, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from cvkit.data.io import ImageTooLargeError, max_image_pixels
from cvkit.inference.runtime import decode_image, load_deployed

MAX_BYTES = 10 * 1024 * 1024


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(model_path: str, max_bytes: int = MAX_BYTES, max_pixels: Optional[int] = None) -> FastAPI:
    """The service of one exported model: ``GET /health`` and ``POST /predict``; ``max_pixels``: the
    largest image (from its header) decoded, default :func:`cvkit.data.io.max_image_pixels`."""
    max_pixels = max_image_pixels(max_pixels)
    deployed = load_deployed(model_path)
    task, classes, tuning = deployed.task, deployed.classes, deployed.tuning
    app = FastAPI(title=f"cvkit {task.name}")

    def predict(image: Any, size: Any, name: str) -> Dict[str, Any]:
        prediction = next(deployed.predict_arrays([image], [name], sizes=[size]))
        decoded = prediction.decode(task, classes)
        rows = task.rows(name, decoded, classes, probs=True, tuning=tuning)
        return {"task": task.name, "height": prediction.height, "width": prediction.width, "rows": rows}

    @app.get("/health")
    def health() -> Dict[str, Any]:
        return {"status": "ok", "task": task.name, "format": deployed.contract["format"], "classes": classes}

    @app.post("/predict")
    async def predict_endpoint(request: Request) -> Any:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_bytes:
            return _error(413, f"request of {declared} bytes is over the limit of {max_bytes}")
        name = "image"
        if kind == "multipart/form-data":
            form = await request.form()
            upload = next((v for v in form.values() if hasattr(v, "read")), None)
            if upload is None:
                return _error(400, "multipart request without a file part; send the image as a file field")
            name = upload.filename or name
            data = await upload.read(max_bytes + 1)
        elif kind.startswith("image/") or kind == "application/octet-stream":
            data = await request.body()
        else:
            return _error(415, f"content type {kind or 'none'!r}; expected image/* , application/octet-stream "
                               "or multipart/form-data")
        if len(data) > max_bytes:
            return _error(413, f"image of {len(data)} bytes is over the limit of {max_bytes}")
        try:
            image, size = decode_image(data, name, deployed.preprocess.size, max_pixels)
        except ImageTooLargeError as exc:
            return _error(413, str(exc))
        except ValueError as exc:
            return _error(400, str(exc))
        return await run_in_threadpool(predict, image, size, name)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        return _error(500, f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}")

    return app


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="an exported model (model.onnx or model.pt, its contract JSON beside it)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--max-bytes", type=int, default=MAX_BYTES, help="largest accepted upload")
    parser.add_argument("--max-pixels", type=int, help="largest image decoded, in pixels from its header "
                                                       "(default: $CVKIT_MAX_IMAGE_PIXELS or 64 megapixels)")
    args = parser.parse_args()
    try:
        app = create_app(args.model, args.max_bytes, args.max_pixels)
    except (ValueError, OSError) as exc:  # the model, its contract or the options: one line, not a traceback
        parser.exit(2, f"{parser.prog}: error: {' '.join(str(exc).split())}\n")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
