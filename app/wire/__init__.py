"""The Tinker wire protocol, translated once at the edge (docs: tinker-protocol.md).

- `proto`: the SDK's own protobuf schema (`pb`).
- `compression`, `tensors`, `codec`: the protobuf side (fwd/bwd requests in; fwd/bwd and sample
  results out).
- `json_models`, `translate`: JSON request bodies and their translation into `app.domain` ops.
- `responses`: future results and polling replies; `errors`: domain errors -> HTTP.

Pure translation: no database, queue, web framework or torch here.
"""
