"""The same round trips under SDK 0.25.0, which cannot share the venv with 0.38.

Opt-in: set TUFT_TINKER_025_SRC to a directory holding 0.25.0's `tinker/` package, e.g.
`pip download tinker==0.25.0 --no-deps -d /tmp/t025 && unzip /tmp/t025/*.whl -d /tmp/t025/src`.
The 0.25 code runs in a subprocess with that directory first on sys.path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.domain.results import ForwardBackwardResult, SampledSequence, SampleResult, TokenTable
from app.domain.sampling import PromptGrid
from app.domain.tensors import Array
from app.wire.codec import decode_forward_backward, encode_forward_backward_output, encode_sample_response

SRC = os.environ.get("TUFT_TINKER_025_SRC")
pytestmark = pytest.mark.skipif(not SRC or not (Path(SRC) / "tinker").is_dir(), reason="TUFT_TINKER_025_SRC not set")

_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.proto.response_conv import deserialize_forward_backward_output, deserialize_sample_response
assert not hasattr(types, "TopkLogprobs"), "not the 0.25 SDK"
inp = json.load(sys.stdin)
datum = types.Datum(
    model_input=types.ModelInput.from_ints([1, 2, 3]),
    loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0, 1.0, 0.0]},
)
fb_input = types.ForwardBackwardInput(data=[datum], loss_fn="ppo", loss_fn_config={"clip_low_threshold": 0.7})
req = types.ForwardBackwardRequest(forward_backward_input=fb_input, model_id="s:train:0", seq_id=2)
sample = deserialize_sample_response(bytes.fromhex(inp["sample"]))
fbout = deserialize_forward_backward_output(bytes.fromhex(inp["fbout"]))
print(json.dumps({
    "request": forward_backward_request_to_proto(req).SerializeToString().hex(),
    "prompt_logprobs": sample.prompt_logprobs,
    "topk": sample.topk_prompt_logprobs,
    "sequences": [[s.tokens, s.logprobs, s.stop_reason] for s in sample.sequences],
    "logprobs": [o["logprobs"].tolist() for o in fbout.loss_fn_outputs],
    "metrics": fbout.metrics,
}))
"""


def test_sdk_0_25_round_trips() -> None:
    sample = SampleResult(
        sequences=(SampledSequence(tokens=(5, 6), logprobs=(-0.5, -1.0), stop_reason="length"),),
        prompt_logprobs=(None, -0.25),
        topk_prompt_logprobs=(None, ((3, -0.25), (4, -2.0))),
    )
    fbout = ForwardBackwardResult(
        outputs=({"logprobs": Array.from_list([-1.0, -2.0], "float32")},), metrics={"loss:sum": 3.0}
    )
    payload = json.dumps(
        {"sample": encode_sample_response(sample).hex(), "fbout": encode_forward_backward_output(fbout).hex()}
    )
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(SRC)], input=payload, capture_output=True, text=True, check=True
    )
    out = json.loads(proc.stdout)
    assert out["prompt_logprobs"] == [None, -0.25]
    assert out["topk"] == [None, [[3, -0.25], [4, -2.0]]]
    assert out["sequences"] == [[[5, 6], [-0.5, -1.0], "length"]]
    assert out["logprobs"] == [[-1.0, -2.0]]
    assert out["metrics"] == {"loss:sum": 3.0}
    model_id, seq_id, op = decode_forward_backward(bytes.fromhex(out["request"]), None, 1 << 20)
    assert (model_id, seq_id, op.loss_fn) == ("s:train:0", 2, "ppo")
    assert op.loss_fn_config == {"clip_low_threshold": 0.7}  # 0.25 writes only the legacy map
    assert op.data[0].tokens == (1, 2, 3)
    assert op.data[0].loss_fn_inputs["weights"].tolist() == [1.0, 1.0, 0.0]


_EXTRAS_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from tinker import types
from tinker.proto.response_conv import deserialize_sample_response
assert not hasattr(types, "TopkLogprobs"), "not the 0.25 SDK"
sample = deserialize_sample_response(bytes.fromhex(sys.stdin.read()))
print(json.dumps({
    "prompt_logprobs": sample.prompt_logprobs,
    "sequences": [[s.tokens, s.logprobs, s.stop_reason] for s in sample.sequences],
}))
"""


def test_sdk_0_25_reads_a_reply_carrying_0_38_fields() -> None:
    # 0.25 cannot ask for the extras, but a stored reply may carry them; it must skip them (§11 row 4).
    table = TokenTable(
        token_ids=Array.from_list([5, 1], "int64", (1, 2)), logprobs=Array.from_list([-0.5, -2.0], "float32", (1, 2))
    )
    sample = SampleResult(
        sequences=(SampledSequence(tokens=(5,), logprobs=(-0.5,), stop_reason="stop", topk_logprobs=table),),
        prompt_logprobs=(None, -0.25),
        target_prompt_logprobs=PromptGrid(shape=(1, 1), values=Array.from_list([-0.25], "float32")),
        prompt_alt_tokens=table,
    )
    proc = subprocess.run(
        [sys.executable, "-c", _EXTRAS_SCRIPT, str(SRC)],
        input=encode_sample_response(sample).hex(),
        capture_output=True,
        text=True,
        check=True,
    )
    out = json.loads(proc.stdout)
    assert out == {"prompt_logprobs": [None, -0.25], "sequences": [[[5], [-0.5], "stop"]]}
