"""Send images to the gateway and get the top-k classes back.

    python -m server.client --model digits photo.jpg other.png
"""

from __future__ import annotations

import argparse
import json
import mimetypes
import sys
from pathlib import Path
from typing import Sequence

import httpx


def classify(
    images: Sequence[Path | bytes], *, model: str, url: str = "http://127.0.0.1:8080", top_k: int = 5,
    timeout_s: float = 30.0,
) -> dict:
    """Classify images through the gateway (one multipart request); returns its JSON answer."""
    files = []
    for position, image in enumerate(images):
        if isinstance(image, (str, Path)):
            path = Path(image)
            media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            files.append(("image", (path.name, path.read_bytes(), media_type)))
        else:
            files.append(("image", (f"image{position}", bytes(image), "application/octet-stream")))
    response = httpx.post(f"{url.rstrip('/')}/v1/models/{model}/classify", params={"top_k": top_k},
                          files=files, timeout=timeout_s)
    if response.status_code != 200:
        try:
            error = response.json()["error"]
            message = f"{error['code']}: {error['message']}"
        except (ValueError, KeyError, TypeError):
            message = response.text[:200]
        raise RuntimeError(f"gateway answered {response.status_code}: {message}")
    return response.json()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.client", description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--model", required=True)
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="the gateway")
    parser.add_argument("--top-k", type=int, default=5)
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.images if not p.is_file()]
    if missing:
        print(f"client: error: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        answer = classify(args.images, model=args.model, url=args.url, top_k=args.top_k)
    except (RuntimeError, httpx.HTTPError) as e:
        print(f"client: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(answer, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
