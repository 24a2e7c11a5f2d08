"""The OpenAI-compatible endpoint on a live server: a LoRA trained with the tinker SDK to memorise a
text continuation and a chat reply answers both through /oai/api/v1 at temperature 0."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from tinker import types

from tests.e2e.server import REPO, TUFT, LiveServer, embedded
from tests.e2e.test_training import client_for, memorise_datum, new_training

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DEV_KEY = "tml-local-dev-key"
EOS, IM_END = 151_643, 151_645
# Qwen BPE ids of the texts (the server tokenizes the texts itself, so wrong ids here could not
# make the model produce the continuation).
PROMPT = "The secret word of TuFT is"
PROMPT_IDS = [785, 6234, 3409, 315, 28649, 3994, 374]
CONTINUATION = " pineapple harbour."
CONTINUATION_IDS = [77082, 74642, 13]
QUESTION = "What is the secret word?"
# "<|im_start|>user\nWhat is the secret word?<|im_end|>\n<|im_start|>assistant\n": the ChatML
# template docs/openai.md documents for the built-in model.
CHAT_PROMPT_IDS = [151644, 872, 198, 3838, 374, 279, 6234, 3409, 30, 151645, 198, 151644, 77091, 198]
REPLY = "Pineapple harbour!"
REPLY_IDS = [47, 482, 22377, 74642, 0]


@dataclass
class Trained:
    server: LiveServer
    path: str
    other_key: str

    def post(self, route: str, body: dict[str, Any], key: str = DEV_KEY) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"}
        return httpx.post(f"{self.server.url}/oai/api/v1{route}", json=body, headers=headers, timeout=120)


def _create_key(server: LiveServer, tenant: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUFT_")}
    args = ["keys", "create", "--tenant", tenant, "--name", "oai-e2e", "--json", "--data-dir", str(server.data_dir)]
    done = subprocess.run([*TUFT, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return str(json.loads(done.stdout)["key"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trained]:
    server = embedded(tmp_path_factory.mktemp("oai")).start()
    try:
        training = new_training(client_for(server))
        data = [
            memorise_datum(PROMPT_IDS, [*CONTINUATION_IDS, EOS]),
            memorise_datum(CHAT_PROMPT_IDS, [*REPLY_IDS, IM_END]),
        ]
        for _ in range(25):
            fb = training.forward_backward(data, "cross_entropy")
            training.optim_step(types.AdamParams(learning_rate=1e-2))
        assert fb.result(timeout=120).metrics["loss:sum"] < 0.1
        path = training.save_weights_for_sampler("oai-memorised").result(timeout=60).path
        yield Trained(server, path, _create_key(server, "oai-other"))
    finally:
        server.stop()


def test_completion_returns_the_memorised_text(trained: Trained) -> None:
    body = {"model": trained.path, "prompt": PROMPT, "max_tokens": 10, "temperature": 0}
    r = trained.post("/completions", body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "text_completion" and out["model"] == trained.path and out["id"].startswith("cmpl-")
    assert [(c["index"], c["text"], c["finish_reason"]) for c in out["choices"]] == [(0, CONTINUATION, "stop")]
    # The EOS that ended it counts as generated but is not in the text.
    assert out["usage"] == {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}

    # A stop string cuts the text before it; max_tokens cuts it with "length".
    stopped = trained.post("/completions", {**body, "stop": [" harbour"]}).json()["choices"][0]
    assert (stopped["text"], stopped["finish_reason"]) == (" pineapple", "stop")
    short = trained.post("/completions", {**body, "max_tokens": 1}).json()
    assert (short["choices"][0]["text"], short["choices"][0]["finish_reason"]) == (" pineapple", "length")
    # The base model has not learnt it: the adapter is what answers.
    base = trained.post("/completions", {**body, "model": "tuft/tiny-qwen3"})
    assert base.status_code == 200 and base.json()["choices"][0]["text"] != CONTINUATION


def test_chat_completion_answers_with_the_memorised_reply(trained: Trained) -> None:
    body = {"model": trained.path, "messages": [{"role": "user", "content": QUESTION}], "temperature": 0}
    r = trained.post("/chat/completions", {**body, "max_tokens": 12, "logprobs": True})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    choice = out["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": REPLY}
    assert choice["finish_reason"] == "stop"  # at <|im_end|>
    assert out["usage"] == {"prompt_tokens": len(CHAT_PROMPT_IDS), "completion_tokens": 6, "total_tokens": 20}
    tokens = choice["logprobs"]["content"]
    assert "".join(t["token"] for t in tokens) == REPLY
    assert all(-1.0 < t["logprob"] <= 0 for t in tokens)  # memorised: each token is near certain


def test_models_and_other_tenants(trained: Trained) -> None:
    headers = {"X-API-Key": DEV_KEY}
    listed = httpx.get(f"{trained.server.url}/oai/api/v1/models", headers=headers, timeout=30).json()
    ids = [m["id"] for m in listed["data"]]
    assert ids[0] == "tuft/tiny-qwen3" and trained.path in ids

    other = trained.other_key
    theirs = httpx.get(f"{trained.server.url}/oai/api/v1/models", headers={"Authorization": f"Bearer {other}"}).json()
    assert [m["id"] for m in theirs["data"]] == ["tuft/tiny-qwen3"]
    for route, extra in (
        ("/completions", {"prompt": PROMPT}),
        ("/chat/completions", {"messages": [{"role": "user", "content": QUESTION}]}),
    ):
        r = trained.post(route, {"model": trained.path, **extra}, key=other)
        assert r.status_code == 404, r.text
        assert r.json()["error"]["code"] == "model_not_found"
    # The other tenant can still use the base model.
    r = trained.post("/completions", {"model": "tuft/tiny-qwen3", "prompt": PROMPT, "max_tokens": 2}, key=other)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 7
