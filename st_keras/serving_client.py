"""A client for an exported SparseTransformer behind TensorFlow Serving.

Builds requests for the `score`, `next_token` and `generate` signatures of
`st_keras.export` and sends them over gRPC (`tensorflow-serving-api` protos,
installed with `pip install --no-deps`) or REST (JSON). Needs no st_keras
model code: only TensorFlow's tensor protos and the serving protos.

Example (a server started as README.md shows):

    from st_keras import serving_client as sc
    tokens, lengths = sc.pad_texts([b"def main():", b"import os"])
    request = sc.predict_request("score", {"tokens": tokens,
                                           "lengths": lengths})
    print(sc.predict_grpc("localhost:8500", request)["bits_per_byte"])
"""

from __future__ import annotations

import json
from typing import Dict, Optional, Sequence
import urllib.request

import numpy as np
import tensorflow as tf

# Every signature's inputs: name -> (dtype, rank).
SIGNATURE_INPUTS = {
    "score": {"tokens": (np.int32, 2), "lengths": (np.int32, 1)},
    "next_token": {"tokens": (np.int32, 2), "lengths": (np.int32, 1)},
    "generate": {"prompt": (np.int32, 2), "length": (np.int32, 0),
                 "temperature": (np.float32, 0), "seed": (np.int64, 0)},
}
SIGNATURE_OUTPUTS = {"score": ("bits_per_byte", "log_probs"),
                     "next_token": ("logits",), "generate": ("tokens",)}


def pad_texts(texts: Sequence[bytes]) -> tuple:
  """A padded batch of byte strings.

  Args:
    texts: byte strings (str is encoded as UTF-8).

  Returns:
    (tokens [batch, longest] int32 zero-padded, lengths [batch] int32).
  """
  data = [t.encode("utf-8") if isinstance(t, str) else bytes(t)
          for t in texts]
  if not data:
    raise ValueError("texts: the batch is empty")
  tokens = np.zeros((len(data), max(len(d) for d in data)), np.int32)
  for row, d in zip(tokens, data):
    row[:len(d)] = np.frombuffer(d, np.uint8)
  return tokens, np.array([len(d) for d in data], np.int32)


def signature_inputs(signature: str, inputs: Dict[str, object]) -> dict:
  """`inputs` as numpy arrays of the signature's dtypes, checked.

  Values are never wrapped, truncated or rounded to fit: an integer input
  must hold integers (floats only when whole) within its dtype's range, and
  a float input finite numbers within its dtype's range.

  Args:
    signature: 'score', 'next_token' or 'generate'.
    inputs: the signature's inputs (see SIGNATURE_INPUTS).

  Returns:
    {input name: numpy array of the signature's dtype}.

  Raises:
    ValueError: an unknown signature, a missing or extra input, or an input
      of the wrong rank, of non-numbers, or of values its dtype does not
      hold (the message names it).
  """
  if signature not in SIGNATURE_INPUTS:
    raise ValueError(f"signature must be one of {sorted(SIGNATURE_INPUTS)}, "
                     f"got {signature!r}")
  spec = SIGNATURE_INPUTS[signature]
  if set(inputs) != set(spec):
    raise ValueError(f"{signature} takes inputs {sorted(spec)}, got "
                     f"{sorted(inputs)}")
  out = {}
  for name, (dtype, rank) in spec.items():
    value = np.asarray(inputs[name])
    if value.ndim != rank:
      raise ValueError(f"{name}: rank {rank} expected, got shape "
                       f"{value.shape}")
    if np.issubdtype(dtype, np.integer):
      out[name] = _as_integers(name, value, dtype)
    else:
      out[name] = _as_floats(name, value, dtype)
  return out


def _as_integers(name: str, value: np.ndarray, dtype) -> np.ndarray:
  """`value` as `dtype` integers, which must hold it exactly.

  Raises:
    ValueError, naming the input: the values are not integers (bools,
      strings, NaN or floats with a fraction) or do not fit `dtype`.
  """
  type_name = np.dtype(dtype).name
  if value.dtype.kind not in "iuf":
    raise ValueError(f"{name}: {type_name} integers expected, got dtype "
                     f"{value.dtype}")
  if value.dtype.kind == "f" and not np.all(np.isfinite(value) &
                                            (value == np.round(value))):
    raise ValueError(f"{name}: {type_name} integers expected, got "
                     "non-integral values")
  info = np.iinfo(dtype)
  # .item() gives Python numbers, which compare exactly with the bounds.
  if value.size and not (info.min <= value.min().item() and
                         value.max().item() <= info.max):
    raise ValueError(f"{name}: values must fit {type_name} "
                     f"({info.min}..{info.max}), got {value.min()}.."
                     f"{value.max()}")
  return value.astype(dtype)


def _as_floats(name: str, value: np.ndarray, dtype) -> np.ndarray:
  """`value` as `dtype` floats, which must be finite.

  Raises:
    ValueError, naming the input: the values are not numbers (bools,
      strings), not finite, or beyond the range of `dtype`.
  """
  if value.dtype.kind not in "iuf":
    raise ValueError(f"{name}: numbers expected, got dtype {value.dtype}")
  bad = ~(np.isfinite(value) & (np.abs(value) <= np.finfo(dtype).max))
  if np.any(bad):
    raise ValueError(f"{name}: finite {np.dtype(dtype).name} numbers "
                     f"expected, got {value[bad].ravel()[0]}")
  return value.astype(dtype)


def predict_request(signature: str, inputs: Dict[str, object],
                    model_name: str = "sparse_transformer",
                    version: Optional[int] = None):
  """A `tensorflow.serving.PredictRequest` for one signature.

  Args:
    signature: 'score', 'next_token' or 'generate'.
    inputs: the signature's inputs (see SIGNATURE_INPUTS).
    model_name: the server's --model_name.
    version: a model version (None: the server's latest).

  Returns:
    A `predict_pb2.PredictRequest`.
  """
  from tensorflow_serving.apis import predict_pb2  # pylint: disable=import-outside-toplevel
  request = predict_pb2.PredictRequest()
  request.model_spec.name = model_name
  request.model_spec.signature_name = signature
  if version is not None:
    request.model_spec.version.value = version
  for name, value in signature_inputs(signature, inputs).items():
    request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
  return request


def rest_body(signature: str, inputs: Dict[str, object]) -> dict:
  """The JSON body of a REST predict call (columnar 'inputs' format)."""
  return {"signature_name": signature,
          "inputs": {name: value.tolist() for name, value in
                     signature_inputs(signature, inputs).items()}}


def predict_grpc(target: str, request, timeout: float = 60.0) -> dict:
  """Sends a PredictRequest over gRPC; returns the outputs as numpy arrays.

  Args:
    target: host:port of the server's gRPC port (8500 by default).
    request: from `predict_request`.
    timeout: seconds.
  """
  import grpc  # pylint: disable=import-outside-toplevel
  from tensorflow_serving.apis import prediction_service_pb2_grpc  # pylint: disable=import-outside-toplevel
  with grpc.insecure_channel(target) as channel:
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    response = stub.Predict(request, timeout)
  return {name: tf.make_ndarray(proto)
          for name, proto in response.outputs.items()}


def predict_rest(url: str, signature: str, inputs: Dict[str, object],
                 timeout: float = 60.0) -> dict:
  """POSTs a REST predict call and returns the outputs as numpy arrays.

  Args:
    url: e.g. http://localhost:8501/v1/models/sparse_transformer:predict
    signature, inputs: as for `predict_request`.
    timeout: seconds.
  """
  body = json.dumps(rest_body(signature, inputs)).encode("utf-8")
  request = urllib.request.Request(
      url, data=body, headers={"Content-Type": "application/json"})
  with urllib.request.urlopen(request, timeout=timeout) as response:
    outputs = json.load(response)["outputs"]
  if not isinstance(outputs, dict):  # a single output comes unnamed
    outputs = {SIGNATURE_OUTPUTS[signature][0]: outputs}
  return {name: np.asarray(value) for name, value in outputs.items()}
