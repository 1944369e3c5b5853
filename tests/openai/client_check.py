"""The official `openai` Python client against a running clipcap server.

Usage: client_check.py URL API_KEY MODEL[,MODEL...]
Prints one "ok <check>" line per check and "all checks passed" at the end; any failed
assertion or unexpected exception exits non-zero (tests/openai_api.rs runs this).
"""
import base64
import io
import json
import sys
import urllib.request

import openai
from openai import OpenAI
from PIL import Image, ImageDraw

URL, KEY, MODELS = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
client = OpenAI(base_url=URL + "/v1", api_key=KEY, max_retries=0, timeout=300)


def image(seed, w=64, h=48):
    im = Image.new("RGB", (w, h), ((40 * seed) % 256, (90 + 17 * seed) % 256, (200 - 13 * seed) % 256))
    d = ImageDraw.Draw(im)
    d.rectangle([seed % 20, seed % 15, seed % 20 + w // 3, seed % 15 + h // 3], fill=(250 - seed, 30, 60 + seed))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def messages(uri, text=None):
    parts = [{"type": "image_url", "image_url": {"url": uri}}]
    if text is not None:
        parts.append({"type": "text", "text": text})
    return [{"role": "system", "content": "You caption images."}, {"role": "user", "content": parts}]


def caption(uri, **opts):
    """POST /caption with the same image and options: its captions' texts."""
    body = json.dumps({"image": uri, **opts}).encode()
    req = urllib.request.Request(URL + "/caption", data=body, headers={
        "content-type": "application/json", "authorization": "Bearer " + KEY})
    with urllib.request.urlopen(req, timeout=300) as r:
        out = json.load(r)
    return [c["text"] for c in out["results"][0]["captions"]]


def streamed(**kwargs):
    """Each choice's concatenated streamed text, its finish reason, and the usage chunk."""
    texts, finish, usage, roles = {}, {}, None, set()
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs):
        assert chunk.object == "chat.completion.chunk", chunk
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.role:
                roles.add(c.index)
            if c.delta.content:
                texts[c.index] = texts.get(c.index, "") + c.delta.content
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    return texts, finish, usage, roles


def ok(name):
    print("ok", name, flush=True)


images = [image(s, 48 + 8 * s, 40 + 4 * s) for s in range(1, 4)]

# 1. With no options, exactly /caption's caption (the bundle's defaults: beam search).
for m in MODELS:
    for uri in images:
        r = client.chat.completions.create(model=m, messages=messages(uri))
        assert r.object == "chat.completion" and r.model == m, r
        assert r.id.startswith("chatcmpl-"), r.id
        assert len(r.choices) == 1 and r.choices[0].message.role == "assistant", r
        assert r.choices[0].finish_reason in ("stop", "length"), r
        want = caption(uri, model=m)[0]
        assert r.choices[0].message.content == want, (r.choices[0].message.content, want)
        assert r.usage.completion_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, r.usage
ok("default options equal /caption for every model and image")

# 2. n=3: three distinct choices, the 3 best beams /caption gives.
r = client.chat.completions.create(model=MODELS[0], messages=messages(images[0]), n=3)
contents = [c.message.content for c in r.choices]
assert [c.index for c in r.choices] == [0, 1, 2], r
assert len(set(contents)) == 3, contents
assert contents == caption(images[0], model=MODELS[0], n=3), contents
ok("n=3 gives 3 distinct choices")

# 3. Streaming equals non-streaming: beam, greedy (temperature 0), sampling with a seed and n=2,
# clipcap's own options through extra_body, and a prompt.
cases = [
    {},
    {"temperature": 0},
    {"seed": 7, "n": 2, "max_tokens": 12},
    {"extra_body": {"strategy": "sample", "top_k": 40, "seed": 3}, "max_completion_tokens": 10},
    {"extra_body": {"beam_size": 3}},
    {"temperature": 0, "prompt_text": "A photo of"},
]
for case in cases:
    case = dict(case)
    text = case.pop("prompt_text", None)
    kwargs = dict(model=MODELS[0], messages=messages(images[1], text), **case)
    whole = client.chat.completions.create(**kwargs)
    texts, finish, usage, roles = streamed(**kwargs)
    n = len(whole.choices)
    assert roles == set(range(n)), (case, roles)
    for c in whole.choices:
        assert texts.get(c.index, "") == c.message.content, (case, texts, c.message.content)
        assert finish[c.index] == c.finish_reason, (case, finish)
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens, (case, usage, whole.usage)
    assert usage.prompt_tokens == whole.usage.prompt_tokens, (usage, whole.usage)
ok("streamed text equals the non-streamed content (beam, greedy, sampling, extra_body, prompt)")

# 4. A text part is the caption's beginning, for beam, greedy and sampling; /caption's prompt
# field gives the same caption.
prompt = "A photo of"
for case, opts in [({}, {}), ({"temperature": 0}, {"strategy": "greedy"}),
                   ({"seed": 5}, {"strategy": "sample", "seed": 5})]:
    r = client.chat.completions.create(model=MODELS[0], messages=messages(images[2], prompt), max_tokens=8, **case)
    content = r.choices[0].message.content
    assert content.startswith(prompt) and len(content) > len(prompt), (case, content)
    assert content == caption(images[2], model=MODELS[0], prompt=prompt, max_tokens=8, **opts)[0], (case, content)
    # The prompt's tokens count as prompt tokens, not as completion tokens.
    plain = client.chat.completions.create(model=MODELS[0], messages=messages(images[2]), max_tokens=8, **case)
    assert r.usage.prompt_tokens > plain.usage.prompt_tokens, (r.usage, plain.usage)
    assert r.usage.completion_tokens <= 8, r.usage
ok("a text part is continued: the content starts with it (beam, greedy, sampling)")

# 5. Models.
listed = [m.id for m in client.models.list()]
assert sorted(listed) == sorted(MODELS), listed
assert client.models.retrieve(MODELS[-1]).id == MODELS[-1]
ok("models.list names every bundle; models.retrieve finds one")

# 6. Errors, as the SDK raises them.
def raises(cls, fn, param=None):
    try:
        fn()
    except cls as e:
        body = e.body if isinstance(e.body, dict) else {}
        assert "message" in body, e.body
        if param is not None:
            assert body.get("param") == param, e.body
        return e
    raise AssertionError(f"expected {cls.__name__}")

raises(openai.NotFoundError, lambda: client.chat.completions.create(model="no-such-model", messages=messages(images[0])), "model")
raises(openai.NotFoundError, lambda: client.models.retrieve("no-such-model"))
raises(openai.BadRequestError, lambda: client.chat.completions.create(
    model=MODELS[0], messages=[{"role": "user", "content": "describe this"}]), "messages")
raises(openai.BadRequestError, lambda: client.chat.completions.create(
    model=MODELS[0], messages=messages("http://example.com/cat.jpg")))
raises(openai.BadRequestError, lambda: client.chat.completions.create(
    model=MODELS[0], messages=messages(images[0]), stop=["."]), "stop")
raises(openai.UnprocessableEntityError, lambda: client.chat.completions.create(
    model=MODELS[0], messages=messages(images[0]), n=99), "n")
e = raises(openai.APIStatusError, lambda: client.chat.completions.create(
    model=MODELS[0], messages=messages("data:image/png;base64,aGVsbG8=")))
assert e.status_code == 415, e  # "hello" is no image format
wrong = OpenAI(base_url=URL + "/v1", api_key="wrong-key", max_retries=0)
raises(openai.AuthenticationError, lambda: wrong.models.list())
raises(openai.AuthenticationError, lambda: wrong.chat.completions.create(model=MODELS[0], messages=messages(images[0])))
ok("unknown model, missing image, bad parameters and a wrong key raise the SDK's errors")

print("all checks passed")
