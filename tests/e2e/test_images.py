"""Images through the real server and real libmtmd, on a tiny random vision-language
model written for the test session (tests/vlm.py): 32x32 images, 16 tokens each."""

from __future__ import annotations

import asyncio
import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.e2e.conftest import MODEL
from tests.vlm import N_IMAGE_TOKENS, make_tiny_vlm

VLM = "tiny-vlm"


@pytest.fixture(scope="module")
def vlm_url(tmp_path_factory, start_module_server):
    lm, mmproj = make_tiny_vlm(tmp_path_factory.mktemp("vlm"))
    server = start_module_server(
        "--model",
        str(lm),
        "--mmproj",
        str(mmproj),
        "--model-name",
        VLM,
        "--weights",
        "original",
        "--max-image-bytes",
        "20000",
    )
    return server.url


@pytest.fixture
def vlm(vlm_url):
    with httpx.Client(base_url=vlm_url, timeout=120) as c:
        yield c


def image_uri(seed: int, size: int = 32, kind: str = "png") -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format={"jpg": "JPEG"}.get(kind, kind.upper()))
    return (
        f"data:image/{'jpeg' if kind == 'jpg' else kind};base64,"
        + base64.b64encode(buf.getvalue()).decode()
    )


def post(client, **body):
    r = client.post(
        "/v1/completions", json={"model": VLM, "max_tokens": 4, "temperature": 0, **body}
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_models_says_vision(vlm):
    (model,) = vlm.get("/v1/models").json()["data"]
    assert model["capabilities"] == ["completion", "vision"]


def test_one_and_two_images_complete_and_count_as_prompt_tokens(vlm):
    text = post(vlm, prompt="describe this please", return_token_ids=True)
    one = post(
        vlm,
        prompt="describe <image> please",
        images=[image_uri(1)],
        return_token_ids=True,
        echo=True,
    )
    two = post(
        vlm,
        prompt="<image> and <image>?",
        images=[image_uri(1, kind="jpg"), image_uri(2, kind="webp")],
        return_token_ids=True,
    )
    for out, num_images in ((one, 1), (two, 2)):
        ids = out["choices"][0]["prompt_token_ids"]
        assert sum(1 for t in ids if t < 0) == num_images * N_IMAGE_TOKENS
        assert out["usage"]["prompt_tokens"] == len(ids)
        assert out["usage"]["completion_tokens"] == 4
    assert one["choices"][0]["text"].startswith("describe <image> please")  # echo keeps markers
    assert text["usage"]["prompt_tokens"] < one["usage"]["prompt_tokens"]


def first_token_scores(client, uri: str) -> dict[str, float]:
    out = post(client, prompt="what is in <image>", images=[uri], max_tokens=1, logprobs=5)
    return out["choices"][0]["logprobs"]["top_logprobs"][0]


def test_the_image_reaches_the_model(vlm):
    a = first_token_scores(vlm, image_uri(10))
    b = first_token_scores(vlm, image_uri(11))
    a_again = first_token_scores(vlm, image_uri(10))
    assert a == a_again
    assert a != b


def test_image_and_text_requests_batched_together(vlm_url, vlm):
    prompts = [("what is in <image>", [image_uri(20 + i)]) for i in range(3)]
    texts = ["hello there", "one two three"]
    alone_images = [post(vlm, prompt=p, images=i, max_tokens=1) for p, i in prompts]
    alone_texts = [post(vlm, prompt=t, max_tokens=1) for t in texts]

    async def main():
        async with httpx.AsyncClient(base_url=vlm_url, timeout=120) as c:
            bodies = [{"prompt": p, "images": i} for p, i in prompts] + [
                {"prompt": t} for t in texts
            ]
            rs = await asyncio.gather(
                *(
                    c.post(
                        "/v1/completions",
                        json={"model": VLM, "max_tokens": 1, "temperature": 0, **b},
                    )
                    for b in bodies
                )
            )
            return [r.json() for r in rs]

    together = asyncio.run(main())
    alone = alone_images + alone_texts
    for t, a in zip(together, alone, strict=True):
        assert t["choices"][0]["text"] == a["choices"][0]["text"]
        assert t["usage"]["prompt_tokens"] == a["usage"]["prompt_tokens"]


@pytest.mark.parametrize(
    ("prompt", "images", "needle"),
    [
        ("no marker here", [image_uri(1)], "marker"),
        ("<image> <image>", [image_uri(1)], "marker"),
        ("look <image>", [], "marker"),
        ("look <image>", ["data:image/png;base64,!!!not base64!!!"], "base64"),
        ("look <image>", ["https://example.com/cat.png"], "data URI"),
        ("look <image>", ["data:image/bmp;base64,Qk0="], "unsupported"),
        (
            "look <image>",
            ["data:image/png;base64," + base64.b64encode(b"nope" * 9).decode()],
            "decoded",
        ),
        ("look <image>", [image_uri(1, size=128)], "larger"),
        ("look <image>", [[image_uri(1)], [image_uri(2)]], "prompts"),
    ],
)
def test_bad_images_are_400_and_the_server_keeps_serving(vlm, prompt, images, needle):
    body = {"model": VLM, "prompt": prompt}
    if images or prompt == "look <image>":
        body["images"] = images
    r = vlm.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "images" and needle in error["message"], error
    assert post(vlm, prompt="still fine")["choices"]


def test_per_prompt_images(vlm):
    out = post(
        vlm,
        prompt=["a <image>", "b", "c <image> <image>"],
        images=[[image_uri(1)], [], [image_uri(2), image_uri(3)]],
        return_token_ids=True,
    )
    counts = [sum(1 for t in c["prompt_token_ids"] if t < 0) for c in out["choices"]]
    assert counts == [16, 0, 32]


def test_a_model_without_a_projector_refuses_images(client):
    r = client.post(
        "/v1/completions", json={"model": MODEL, "prompt": "look <image>", "images": [image_uri(1)]}
    )
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "model does not accept images"


def test_echo_logprobs_cover_text_positions_only(vlm):
    out = post(
        vlm,
        prompt="see <image> now",
        images=[image_uri(5)],
        max_tokens=1,
        echo=True,
        logprobs=1,
        return_token_ids=True,
    )
    choice = out["choices"][0]
    text_ids = [t for t in choice["prompt_token_ids"] if t >= 0]
    lp = choice["logprobs"]
    assert lp["token_ids"] == text_ids + choice["token_ids"]
    assert lp["token_logprobs"][0] is None
    assert all(isinstance(x, float) for x in lp["token_logprobs"][-1:])


def test_the_same_image_is_not_encoded_again(vlm):
    body = {
        "prompt": "a picture: <image> tell me about it",
        "images": [image_uri(42)],
        "max_tokens": 2,
    }
    first = post(vlm, **body)
    second = post(vlm, **body)
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached > N_IMAGE_TOKENS  # the prefix through the image came from the cache
    assert first["choices"][0]["text"] == second["choices"][0]["text"]
    other = post(vlm, **{**body, "images": [image_uri(43)]})
    assert other["usage"]["prompt_tokens_details"]["cached_tokens"] < N_IMAGE_TOKENS
