"""Run configurations: YAML files checked against typed sections.

A config has three sections, `model`, `data` and `train`, whose keys are the
fields below. Unknown keys and values of the wrong type are errors that name
the key; `override()` applies `section.key=value` strings from the command
line (values parsed as YAML).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import List, Optional, Sequence

import yaml

DATA_KINDS = ("text", "enwik8", "cifar10", "imagenet64", "audio")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
STRATEGIES = ("auto", "mirrored", "multi_worker", "none")


@dataclasses.dataclass
class ModelConfig:
  """Arguments of `st_keras.models.SparseTransformer` (seq_len comes from
  data.context)."""
  width: int = 256
  num_layers: int = 4
  num_heads: int = 4
  vocab_size: int = 256
  pattern: str = "fixed"
  integration: str = "merged"
  stride: int = 128
  summary: int = 32
  num_summary_patterns: int = 1
  block_size: int = 32
  qk_ratio: float = 1.0
  ff_multiplier: float = 4.0
  dropout: float = 0.0
  embedding_axes: Optional[List[int]] = None
  recompute: bool = False
  attention_implementation: Optional[str] = None


@dataclasses.dataclass
class DataConfig:
  """Where the bytes come from and how they are cut."""
  kind: str = "text"
  # text: a file or directory (None: the Python standard library sources);
  # enwik8: the enwik8 file; cifar10: cifar-10-batches-bin; imagenet64: a
  # directory of .npz batches (train) -- valid_path for the held-out ones;
  # audio: a .wav file or directory.
  path: Optional[str] = None
  valid_path: Optional[str] = None
  context: int = 1024
  batch_size: int = 8
  # Share of the bytes held out for validation when the source has no
  # split of its own (text files other than enwik8 and the default, audio).
  valid_fraction: float = 0.05
  # text (a path or the default corpus): the byte placed before each file
  # so the model sees where a file begins, even inside a window that crosses
  # into the next; null: the files run together. 28 is ASCII's "file
  # separator" (st_keras.data.text.DOCUMENT_SEPARATOR), which text files
  # do not hold.
  separator: Optional[int] = 28


@dataclasses.dataclass
class TrainConfig:
  """Optimisation, checkpoints and logging."""
  steps: int = 1000
  learning_rate: float = 5e-4
  warmup_steps: int = 5000
  weight_decay: float = 0.01
  clipnorm: float = 1.0
  beta_1: float = 0.9
  beta_2: float = 0.95
  checkpoint_every: int = 100
  log_every: int = 50
  eval_batches: int = 16
  output_dir: str = "runs/default"
  seed: int = 0
  precision: str = "float32"
  strategy: str = "auto"
  sample_bytes: int = 256


@dataclasses.dataclass
class Config:
  """A whole run."""
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}
CHOICES = {("data", "kind"): DATA_KINDS, ("train", "precision"): PRECISIONS,
           ("train", "strategy"): STRATEGIES}


def _check_value(where: str, value, hint):
  """Returns value converted to the field type `hint`, or raises."""
  origin = typing.get_origin(hint)
  if origin is typing.Union:  # Optional[X]
    (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
    return None if value is None else _check_value(where, value, inner)
  if origin in (list, List):
    (inner,) = typing.get_args(hint)
    if not isinstance(value, (list, tuple)):
      raise TypeError(f"config key {where} must be a list, got "
                      f"{value!r}")
    return [_check_value(f"{where}[{i}]", v, inner)
            for i, v in enumerate(value)]
  if hint is float and isinstance(value, int) and not isinstance(value,
                                                                 bool):
    return float(value)
  if hint in (int, float) and isinstance(value, bool) or not isinstance(
      value, hint):
    raise TypeError(f"config key {where} must be {hint.__name__}, got "
                    f"{type(value).__name__} {value!r}")
  return value


def from_dict(raw: dict) -> Config:
  """Builds a checked Config from nested dicts (missing keys: defaults)."""
  if not isinstance(raw, dict):
    raise TypeError(f"a config must be a mapping of sections, got "
                    f"{type(raw).__name__}")
  unknown = set(raw) - set(SECTIONS)
  if unknown:
    raise KeyError(f"unknown config section(s) {sorted(unknown)}; known: "
                   f"{sorted(SECTIONS)}")
  sections = {}
  for name, cls in SECTIONS.items():
    values = raw.get(name) or {}
    if not isinstance(values, dict):
      raise TypeError(f"config section {name} must be a mapping, got "
                      f"{values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    for key in values:
      if key not in fields:
        raise KeyError(f"unknown config key {name}.{key}; known keys of "
                       f"{name}: {sorted(fields)}")
    checked = {k: _check_value(f"{name}.{k}", v, hints[k])
               for k, v in values.items()}
    for (section, key), allowed in CHOICES.items():
      if section == name and key in checked and checked[key] not in allowed:
        raise ValueError(f"config key {name}.{key} must be one of "
                         f"{allowed}, got {checked[key]!r}")
    sections[name] = cls(**checked)
  return Config(**sections)


def override(raw: dict, assignments: Sequence[str]) -> dict:
  """Applies 'section.key=value' strings to a raw config dict (a copy).

  Args:
    raw: nested dict as read from YAML.
    assignments: strings such as 'train.steps=200' or
      'model.embedding_axes=[32, 32, 3]'; values are parsed as YAML.

  Returns:
    The updated copy.
  """
  out = {k: dict(v or {}) for k, v in raw.items()}
  for item in assignments:
    key, sep, text = item.partition("=")
    section, dot, field = key.strip().partition(".")
    if not sep or not dot or not field:
      raise ValueError(f"override {item!r} must look like section.key=value")
    out.setdefault(section, {})[field] = yaml.safe_load(text)
  return out


def load(path: str, overrides: Sequence[str] = ()) -> Config:
  """Reads a YAML config and applies overrides.

  Args:
    path: YAML file.
    overrides: 'section.key=value' strings.

  Returns:
    A checked `Config`.
  """
  with open(path) as f:
    raw = yaml.safe_load(f) or {}
  return from_dict(override(raw, overrides))
