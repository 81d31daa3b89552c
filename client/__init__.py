"""Classify images through the gateway over HTTP, or straight through Triton's gRPC endpoint.

    python -m client --model digits photo.jpg other.png                  # via the gateway
    python -m client --model digits --grpc 127.0.0.1:8001 photo.jpg      # via Triton gRPC

The gRPC path preprocesses locally with the spec the model was published with (read from Triton's
model-config API), so both paths give the same predictions.
"""

from __future__ import annotations

import argparse
import json
import mimetypes
import sys
from collections.abc import Sequence
from pathlib import Path

import httpx
import numpy as np

from server.postprocess import top_k as top_k_classes
from server.preprocess import ImageTooLargeError, InvalidImageError, preprocess_bytes
from server.triton import REPOSITORY_KEY_HEADER
from stack.settings import TritonSettings
from stack.supervisor import triton_api_key

Image = Path | bytes


def _read(image: Image) -> bytes:
    return Path(image).read_bytes() if isinstance(image, (str, Path)) else bytes(image)


def classify(
    images: Sequence[Image],
    *,
    model: str,
    url: str = "http://127.0.0.1:8080",
    top_k: int = 5,
    timeout_s: float = 30.0,
    api_key: str | None = None,
) -> dict:
    """Classify images through the gateway (one multipart request); returns its JSON answer."""
    files = []
    for position, image in enumerate(images):
        name = Path(image).name if isinstance(image, (str, Path)) else f"image{position}"
        media_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        files.append(("image", (name, _read(image), media_type)))
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.post(
        f"{url.rstrip('/')}/v1/models/{model}/classify",
        params={"top_k": top_k},
        files=files,
        headers=headers,
        timeout=timeout_s,
    )
    if response.status_code != 200:
        try:
            error = response.json()["error"]
            message = f"{error['code']}: {error['message']}"
        except (ValueError, KeyError, TypeError):
            message = response.text[:200]
        raise RuntimeError(f"gateway answered {response.status_code}: {message}")
    return response.json()


def classify_grpc(
    images: Sequence[Image],
    *,
    model: str,
    url: str = "127.0.0.1:8001",
    top_k: int = 5,
    version: str = "",
    timeout_s: float = 30.0,
    triton_key: str | None = None,
) -> dict:
    """Preprocess locally with the model's published spec and infer over Triton's gRPC endpoint
    (`triton_key`: the key of a Triton whose inference API is restricted, as the local stack's is)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from server.triton import model_info_from_config

    client = grpcclient.InferenceServerClient(url)
    headers = {f"triton-grpc-protocol-{REPOSITORY_KEY_HEADER}": triton_key} if triton_key else None
    try:
        config = client.get_model_config(model, as_json=True, client_timeout=timeout_s)["config"]
        info = model_info_from_config(model, config)
        batch = np.stack([preprocess_bytes(_read(image), info.spec, pixel_input=info.pixel_input) for image in images])
        step = info.images_per_call or len(batch)
        logits, served_version = [], version
        for start in range(0, len(batch), step):
            chunk = batch[start : start + step]
            tensor = grpcclient.InferInput(info.input_name, list(chunk.shape), info.input_datatype)
            tensor.set_data_from_numpy(chunk)
            result = client.infer(
                model,
                [tensor],
                model_version=version,
                client_timeout=timeout_s,
                outputs=[grpcclient.InferRequestedOutput(info.output_name)],
                headers=headers,
            )
            logits.append(result.as_numpy(info.output_name))
            served_version = result.get_response(as_json=True).get("model_version", version)
    except InferenceServerException as e:
        raise RuntimeError(f"Triton answered: {e.message()}") from e
    except (InvalidImageError, ImageTooLargeError) as e:
        raise RuntimeError(str(e)) from e
    finally:
        client.close()
    return {
        "model": model,
        "version": str(served_version),
        "results": top_k_classes(np.concatenate(logits), top_k, info.labels),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client", description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--model", required=True)
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="the gateway")
    parser.add_argument("--grpc", metavar="HOST:PORT", help="call Triton's gRPC endpoint directly instead")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--api-key", help="bearer token, if the gateway requires one")
    parser.add_argument(
        "--triton-key",
        help="with --grpc: Triton's key (default: $TRITON_REPOSITORY_API_KEY, "
        "else the one `make serve` keeps in .cache/triton)",
    )
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.images if not p.is_file()]
    if missing:
        print(f"client: error: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        if args.grpc:
            key = args.triton_key or triton_api_key(TritonSettings())
            answer = classify_grpc(args.images, model=args.model, url=args.grpc, top_k=args.top_k, triton_key=key)
        else:
            answer = classify(args.images, model=args.model, url=args.url, top_k=args.top_k, api_key=args.api_key)
    except (RuntimeError, httpx.HTTPError) as e:
        print(f"client: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(answer, indent=2))
    return 0
