"""The TuFT quickstart, unchanged but for the API key (the SDK refuses keys without `tml-`).

Run `make run` in one terminal, then `python examples/quickstart.py` in another.
TUFT_BASE_URL overrides the server address (the test suite uses it).
"""

import os

import tinker
from tinker import types

client = tinker.ServiceClient(
    base_url=os.environ.get("TUFT_BASE_URL", "http://localhost:10610"), api_key="tml-local-dev-key"
)
capabilities = client.get_server_capabilities()
base_model = capabilities.supported_models[0].model_name
for model in capabilities.supported_models:
    print("-", model.model_name or "(unknown)")

prompt_tokens = [101, 42, 37, 102]
target_tokens = [101, 99, 73, 102]
datum = types.Datum(
    model_input=types.ModelInput.from_ints(prompt_tokens),
    loss_fn_inputs={
        "target_tokens": types.TensorData(data=target_tokens, dtype="int64", shape=[4]),
        "weights": types.TensorData(data=[1.0, 1.0, 1.0, 1.0], dtype="float32", shape=[4]),
    },
)
training = client.create_lora_training_client(base_model=base_model, rank=8)
fwdbwd = training.forward_backward([datum], "cross_entropy").result(timeout=30)
print("Loss metrics:", fwdbwd.metrics)
optim = training.optim_step(types.AdamParams(learning_rate=1e-4)).result(timeout=30)
print("Optimizer metrics:", optim.metrics)

checkpoint = training.save_state("demo-checkpoint").result(timeout=60)
print("Checkpoint saved to:", checkpoint.path)
sampler_weights = training.save_weights_for_sampler("demo-sampler").result(timeout=60)
print("Sampler weights saved to:", sampler_weights.path)
rest = client.create_rest_client()
session_info = rest.get_session(client.holder.get_session_id()).result(timeout=30)
print("Session contains training runs:", session_info.training_run_ids)

sampling = client.create_sampling_client(model_path=sampler_weights.path)
sample = sampling.sample(
    prompt=types.ModelInput.from_ints([101, 57, 12, 7, 102]),
    num_samples=1,
    sampling_params=types.SamplingParams(max_tokens=5, temperature=0.5),
).result(timeout=30)
print("Sample tokens:", sample.sequences[0].tokens)
