"""SavedModel export: servable by stock TensorFlow, equal to the in-process
model, clear errors on bad requests, and the serving client's requests."""

from concurrent import futures
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from st_keras import export
from st_keras import models
from st_keras import ops
from st_keras import sample
from st_keras import serving_client

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
CUSTOM_OP = "SparseTransformer>BlockSparseAttention"


def _model(pattern="fixed"):
  model = models.SparseTransformer(seq_len=64, width=24, num_layers=2,
                                   num_heads=2, pattern=pattern, stride=16,
                                   summary_size=4, block_size=16)
  model.build()
  rng = np.random.default_rng()
  model.set_weights([w + rng.normal(0, 0.3, w.shape).astype(w.dtype)
                     for w in model.get_weights()])
  return model


def _requests(rng):
  """Valid inputs of every signature (a ragged batch for the sequences)."""
  tokens = rng.integers(0, 256, (3, 65)).astype(np.int32)
  return {
      "score": {"tokens": tokens, "lengths": np.array([65, 2, 30], np.int32)},
      "next_token": {"tokens": tokens[:, :50],
                     "lengths": np.array([50, 1, 17], np.int32)},
      "generate": {"prompt": tokens[:2, :5], "length": np.int32(20),
                   "temperature": np.float32(0.8),
                   "seed": np.int64(rng.integers(1 << 40))},
  }


def _expected(model, requests):
  """The signatures' outputs computed with the in-process model."""
  score = requests["score"]
  inputs = np.zeros((3, 64), np.int32)
  inputs[:, :64] = score["tokens"][:, :64]
  logits = model(inputs).numpy().astype(np.float64)  # (3, 64, 256)
  log_softmax = logits - np.log(np.exp(
      logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - (
          logits.max(-1, keepdims=True))
  log_probs = np.take_along_axis(log_softmax, score["tokens"][:, 1:, None],
                                 axis=-1)[..., 0]  # (3, 64)
  scored = np.arange(1, 65)[None] < score["lengths"][:, None]
  log_probs = np.where(scored, log_probs, 0.0)
  bits = -log_probs.sum(1) / (score["lengths"] - 1) / np.log(2)
  nxt = requests["next_token"]
  next_logits = model(np.pad(nxt["tokens"], [[0, 0], [0, 14]])).numpy()
  gen = requests["generate"]
  tokens = sample.generate(model, gen["prompt"], int(gen["length"]),
                           temperature=float(gen["temperature"]),
                           seed=int(gen["seed"]))
  return {
      "score/bits_per_byte": bits, "score/log_probs": log_probs,
      "next_token/logits": next_logits[np.arange(3), nxt["lengths"] - 1],
      "generate/tokens": tokens.astype(np.int32),
  }


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  root = tmp_path_factory.mktemp("export")
  model = _model()
  path = export.export(model, str(root / "model" / "1"))
  requests = _requests(np.random.default_rng())
  with open(root / "requests.json", "w") as f:
    json.dump({sig: {k: np.asarray(v).tolist() for k, v in inputs.items()}
               for sig, inputs in requests.items()}, f)
  np.savez(root / "expected.npz", **_expected(model, requests))
  return {"root": root, "path": path, "model": model, "requests": requests}


# The check run in a fresh interpreter that cannot import st_keras.
FRESH_PROCESS = textwrap.dedent("""
    import importlib.abc, json, sys
    import numpy as np

    class NoProjectCode(importlib.abc.MetaPathFinder):
      def find_spec(self, name, path=None, target=None):
        if name == "st_keras" or name.startswith("st_keras."):
          raise ImportError("st_keras is not importable here")

    sys.meta_path.insert(0, NoProjectCode())
    import tensorflow as tf
    from tensorflow.core.protobuf import saved_model_pb2
    from tensorflow.python.framework import op_def_registry

    root, path = sys.argv[1], sys.argv[2]
    try:
      import st_keras
      raise SystemExit("st_keras was importable")
    except ImportError:
      pass

    # Every op type of the graph and its functions is a stock TensorFlow op.
    proto = saved_model_pb2.SavedModel()
    with open(path + "/saved_model.pb", "rb") as f:
      proto.ParseFromString(f.read())
    op_types = set()
    for meta in proto.meta_graphs:
      op_types.update(n.op for n in meta.graph_def.node)
      for fn in meta.graph_def.library.function:
        op_types.update(n.op for n in fn.node_def)
    unknown = sorted(o for o in op_types if op_def_registry.get(o) is None)
    assert not unknown, unknown
    assert len(op_types) > 20, op_types

    loaded = tf.saved_model.load(path)
    assert sorted(loaded.signatures) == ["generate", "next_token", "score"]
    requests = json.load(open(root + "/requests.json"))
    expected = np.load(root + "/expected.npz")
    dtypes = {"temperature": tf.float32, "seed": tf.int64}
    for signature, inputs in requests.items():
      feed = {k: tf.constant(v, dtypes.get(k, tf.int32))
              for k, v in inputs.items()}
      out = loaded.signatures[signature](**feed)
      for name, value in out.items():
        want = expected[signature + "/" + name]
        if value.dtype.is_integer:
          np.testing.assert_array_equal(value.numpy(), want)
        else:
          np.testing.assert_allclose(value.numpy(), want, rtol=2e-4,
                                     atol=2e-4, err_msg=signature + name)

    # Bad requests: an exception with a clear message, never a crash.
    score, generate = loaded.signatures["score"], loaded.signatures["generate"]
    ok = tf.constant([[1, 2, 3]])
    cases = [
        ("dtype", lambda: score(tokens=tf.constant([[1.0, 2.0]]),
                                lengths=tf.constant([2])), "int32"),
        ("rank", lambda: score(tokens=tf.constant([1, 2]),
                               lengths=tf.constant([2])), "tokens [2]"),
        ("empty", lambda: score(tokens=tf.zeros([0, 4], tf.int32),
                                lengths=tf.zeros([0], tf.int32)),
         "batch is empty"),
        ("range", lambda: score(tokens=tf.constant([[1, 256]]),
                                lengths=tf.constant([2])), "0..255"),
        ("negative", lambda: score(tokens=tf.constant([[-1, 2]]),
                                   lengths=tf.constant([2])), "0..255"),
        ("lengths", lambda: score(tokens=ok, lengths=tf.constant([3, 3])),
         "lengths"),
        ("short", lambda: score(tokens=ok, lengths=tf.constant([1])),
         "lengths"),
        ("long", lambda: generate(prompt=ok, length=tf.constant(63),
                                  temperature=tf.constant(1.0),
                                  seed=tf.constant(1, tf.int64)),
         "fit the context"),
        ("temperature", lambda: generate(prompt=ok, length=tf.constant(2),
                                         temperature=tf.constant(0.0),
                                         seed=tf.constant(1, tf.int64)),
         "temperature"),
    ]
    for case, call, message in cases:
      try:
        call()
      except (tf.errors.InvalidArgumentError, TypeError, ValueError) as e:
        assert message in str(e), (case, str(e)[:500])
      else:
        raise AssertionError(case + " was accepted")
    # The longest accepted: the last byte is drawn, never fed back.
    whole = generate(prompt=ok, length=tf.constant(62),
                     temperature=tf.constant(1.0),
                     seed=tf.constant(1, tf.int64))["tokens"]
    assert tuple(whole.shape) == (1, 65)

    assert op_def_registry.get("%s") is None  # the op library never loaded
    assert not [m for m in sys.modules if m.startswith("st_keras")]
    print("FRESH-PROCESS-OK")
""" % CUSTOM_OP)


def test_savedmodel_runs_in_a_process_without_st_keras(exported, tmp_path):
  script = tmp_path / "check.py"
  script.write_text(FRESH_PROCESS)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["TF_CPP_MIN_LOG_LEVEL"] = "2"
  proc = subprocess.run(
      [sys.executable, "-I", str(script), str(exported["root"]),
       exported["path"]], cwd=tmp_path, env=env, capture_output=True,
      text=True, timeout=600)
  assert proc.returncode == 0 and "FRESH-PROCESS-OK" in proc.stdout, (
      proc.stdout[-3000:] + proc.stderr[-3000:])


def test_saved_model_cli_lists_the_signatures(exported):
  proc = subprocess.run(
      [os.path.join(BIN, "saved_model_cli"), "show", "--dir",
       exported["path"], "--all"], capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  for signature, inputs in serving_client.SIGNATURE_INPUTS.items():
    assert f"signature_def['{signature}']" in proc.stdout
    for name in inputs:
      assert f"inputs['{name}']" in proc.stdout
  for names in serving_client.SIGNATURE_OUTPUTS.values():
    for name in names:
      assert f"outputs['{name}']" in proc.stdout


def _meta_graph(path):
  """The MetaGraphDef of the SavedModel at `path`."""
  proto = saved_model_pb2.SavedModel()
  with open(os.path.join(path, "saved_model.pb"), "rb") as f:
    proto.ParseFromString(f.read())
  return proto.meta_graphs[0]


def test_client_requests_match_the_signature_definitions(exported):
  defs = _meta_graph(exported["path"]).signature_def
  loaded = tf.saved_model.load(exported["path"])
  for signature, inputs in exported["requests"].items():
    request = serving_client.predict_request(signature, inputs, version=1)
    assert request.model_spec.signature_name == signature
    sig_def = defs[signature]
    assert set(request.inputs) == set(sig_def.inputs)
    assert set(sig_def.outputs) == set(
        serving_client.SIGNATURE_OUTPUTS[signature])
    for name, tensor in request.inputs.items():
      assert tensor.dtype == sig_def.inputs[name].dtype, name
      assert len(tensor.tensor_shape.dim) == len(
          sig_def.inputs[name].tensor_shape.dim), name
    # The request's tensors and the REST body run the signature unchanged.
    direct = loaded.signatures[signature](
        **{k: tf.constant(v) for k, v in
           serving_client.signature_inputs(signature, inputs).items()})
    from_proto = loaded.signatures[signature](
        **{k: tf.constant(tf.make_ndarray(v))
           for k, v in request.inputs.items()})
    body = json.loads(json.dumps(serving_client.rest_body(signature, inputs)))
    assert body["signature_name"] == signature
    from_rest = loaded.signatures[signature](
        **{k: tf.constant(np.asarray(v), sig_def.inputs[k].dtype)
           for k, v in body["inputs"].items()})
    for name in direct:
      np.testing.assert_array_equal(from_proto[name].numpy(),
                                    direct[name].numpy())
      np.testing.assert_array_equal(from_rest[name].numpy(),
                                    direct[name].numpy())


def test_client_rejects_bad_inputs_by_name():
  with pytest.raises(ValueError, match="signature"):
    serving_client.predict_request("classify", {})
  with pytest.raises(ValueError, match="lengths"):
    serving_client.predict_request("score", {"tokens": [[1, 2]]})
  with pytest.raises(ValueError, match="tokens: rank 2"):
    serving_client.predict_request("score", {"tokens": [1, 2],
                                             "lengths": [2]})
  with pytest.raises(ValueError, match="empty"):
    serving_client.pad_texts([])
  tokens, lengths = serving_client.pad_texts([b"ab", "\u00e9xyz"])
  np.testing.assert_array_equal(lengths, [2, 5])
  assert tokens.shape == (2, 5) and tokens[0, 2:].sum() == 0
  assert bytes(tokens[1].astype(np.uint8)) == "\u00e9xyz".encode("utf-8")


def test_predict_grpc_against_a_prediction_service(exported):
  """The client's gRPC path against a PredictionService backed by the
  SavedModel (the protocol tensorflow_model_server speaks)."""
  import grpc  # pylint: disable=import-outside-toplevel
  from tensorflow_serving.apis import predict_pb2  # pylint: disable=import-outside-toplevel
  from tensorflow_serving.apis import prediction_service_pb2_grpc  # pylint: disable=import-outside-toplevel
  loaded = tf.saved_model.load(exported["path"])

  class Service(prediction_service_pb2_grpc.PredictionServiceServicer):

    def Predict(self, request, context):  # pylint: disable=invalid-name
      fn = loaded.signatures[request.model_spec.signature_name]
      out = fn(**{k: tf.constant(tf.make_ndarray(v))
                  for k, v in request.inputs.items()})
      response = predict_pb2.PredictResponse()
      for name, value in out.items():
        response.outputs[name].CopyFrom(tf.make_tensor_proto(value.numpy()))
      return response

  server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
  prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
      Service(), server)
  port = server.add_insecure_port("localhost:0")
  server.start()
  try:
    expected = np.load(exported["root"] / "expected.npz")
    for signature, inputs in exported["requests"].items():
      out = serving_client.predict_grpc(
          f"localhost:{port}",
          serving_client.predict_request(signature, inputs))
      for name in serving_client.SIGNATURE_OUTPUTS[signature]:
        np.testing.assert_allclose(out[name],
                                   expected[f"{signature}/{name}"],
                                   rtol=2e-4, atol=2e-4)
  finally:
    server.stop(None)


def test_custom_op_export_keeps_the_fused_op(exported, tmp_path):
  assert ops.custom_op_available(), ops.load_error()
  path = export.export(exported["model"], str(tmp_path / "1"),
                       custom_op=True)
  op_types = set()
  for fn in _meta_graph(path).graph_def.library.function:
    op_types.update(n.op for n in fn.node_def)
  assert CUSTOM_OP in op_types
  assert CUSTOM_OP + "Grad" not in op_types  # no gradients exported
  loaded = tf.saved_model.load(path)  # the library is loaded here
  score = exported["requests"]["score"]
  out = loaded.signatures["score"](tokens=tf.constant(score["tokens"]),
                                   lengths=tf.constant(score["lengths"]))
  expected = np.load(exported["root"] / "expected.npz")
  np.testing.assert_allclose(out["bits_per_byte"].numpy(),
                             expected["score/bits_per_byte"], rtol=2e-4)


def test_cli_exports_a_versioned_directory(tmp_path):
  model = _model("strided")
  model.save(str(tmp_path / "model.keras"))
  base = tmp_path / "serving"
  assert export.main(["--model", str(tmp_path / "model.keras"), "--output",
                      str(base), "--version", "3"]) == 0
  assert os.path.exists(base / "3" / "saved_model.pb")
  with pytest.raises(SystemExit):  # never overwrites a version
    export.main(["--model", str(tmp_path / "model.keras"), "--output",
                 str(base), "--version", "3"])
