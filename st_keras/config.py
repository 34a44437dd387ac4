"""Run configurations: YAML files checked against typed sections.

A config has three sections, `model`, `data` and `train`, whose keys are the
fields below. Unknown keys, values of the wrong type and values out of their
range (`RANGES`) are errors that name the key; `override()` applies
`section.key=value` strings from the command line (values parsed as YAML).
YAML is read with the safe loader, plus YAML 1.2's floats: 1e-3 and 1.0e4
are numbers, as in Python.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import yaml

from st_keras.data import kinds as data_kinds
from st_keras.models import ModelConfig

DATA_KINDS = data_kinds.NAMES
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
STRATEGIES = ("auto", "mirrored", "multi_worker", "none")


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


def _at_least(low) -> Tuple[Callable, str]:
  return (lambda x: math.isfinite(x) and x >= low), f">= {low}"


def _above(low) -> Tuple[Callable, str]:
  return (lambda x: math.isfinite(x) and x > low), f"> {low}"


def _in_unit(low_open: bool) -> Tuple[Callable, str]:
  if low_open:
    return (lambda x: 0.0 < x < 1.0), "in (0, 1)"
  return (lambda x: 0.0 <= x < 1.0), "in [0, 1)"


# (section, key) -> (check of a non-None value, what it must be).
RANGES: Dict[Tuple[str, str], Tuple[Callable, str]] = {
    **{("model", key): _at_least(1) for key in (
        "width", "num_layers", "num_heads", "vocab_size", "stride",
        "summary_size", "num_summary_patterns", "block_size")},
    ("model", "qk_ratio"): _above(0),
    ("model", "ff_multiplier"): _above(0),
    ("model", "dropout"): _in_unit(low_open=False),
    ("data", "context"): _at_least(1),
    ("data", "batch_size"): _at_least(1),
    ("data", "valid_fraction"): _in_unit(low_open=True),
    ("train", "steps"): _at_least(0),
    ("train", "learning_rate"): _at_least(0),
    ("train", "warmup_steps"): _at_least(0),
    ("train", "weight_decay"): _at_least(0),
    ("train", "clipnorm"): _above(0),
    ("train", "beta_1"): _in_unit(low_open=False),
    ("train", "beta_2"): _in_unit(low_open=False),
    ("train", "checkpoint_every"): _at_least(1),
    ("train", "log_every"): _at_least(0),
    ("train", "eval_batches"): _at_least(1),
    ("train", "sample_bytes"): _at_least(0),
}


class _Loader(yaml.SafeLoader):  # pylint: disable=too-many-ancestors
  """The safe loader, reading YAML 1.2 floats such as 1e-3 and 1.0e4
  (YAML 1.1 wants a dot and a signed exponent: it reads them as strings)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)"
               r"[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def parse_yaml(text: str, source: str = "<string>"):
  """Parses YAML text with `_Loader`.

  Args:
    text: YAML.
    source: where it came from, for the error.

  Returns:
    The parsed value.

  Raises:
    ValueError: one line naming the source, the line and column, and the
      problem (syntax errors, tags other than the safe ones such as
      !!python/object, aliases that refer to themselves).
  """
  try:
    value = yaml.load(text, Loader=_Loader)  # nosec: a SafeLoader subclass
    _check_acyclic(value)
  except yaml.MarkedYAMLError as e:
    mark = e.problem_mark or e.context_mark
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = " ".join(str(e.problem or e.context or e).split())
    raise ValueError(f"{source}: invalid YAML{where}: {problem}") from None
  except (yaml.YAMLError, ValueError) as e:
    raise ValueError(f"{source}: invalid YAML: "
                     f"{' '.join(str(e).split())}") from None
  return value


def _check_acyclic(value, parents: Tuple[int, ...] = (),
                   checked: Optional[set] = None) -> None:
  """Raises ValueError when a YAML alias makes a value contain itself.

  Nodes shared through aliases are walked once (`checked`), so a document
  of nested aliases costs its number of distinct nodes, not its expansion.
  """
  checked = set() if checked is None else checked
  if not isinstance(value, (list, dict)) or id(value) in checked:
    return
  if id(value) in parents:
    raise ValueError("an alias refers to a node that contains it (a loop)")
  items = value.values() if isinstance(value, dict) else value
  for item in items:
    _check_acyclic(item, parents + (id(value),), checked)
  checked.add(id(value))


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


# Keys renamed since they were first written: (section, old name) -> new
# name. Config files and saved runs (config.json) that use an old name still
# load; `upgrade` renames it.
RENAMED = {("model", "summary"): "summary_size"}  # keras.Model.summary()


def upgrade(raw: dict) -> dict:
  """A copy of nested config dicts with RENAMED keys under their new names.

  Args:
    raw: nested dict as read from YAML or config.json.

  Returns:
    The renamed copy (raw itself is not changed).

  Raises:
    ValueError: a section holds both a key's old and new name.
  """
  raw = {name: dict(values) if isinstance(values, dict) else values
         for name, values in raw.items()}
  for (section, old), new in RENAMED.items():
    values = raw.get(section)
    if isinstance(values, dict) and old in values:
      if new in values:
        raise ValueError(f"config keys {section}.{old} and {section}.{new} "
                         f"are one setting ({old} is its old name); give one")
      values[new] = values.pop(old)
  return raw


def from_dict(raw: dict) -> Config:
  """Builds a checked Config from nested dicts (missing keys: defaults;
  RENAMED keys under either name)."""
  _check_sections(raw)
  raw = upgrade(raw)
  unknown = set(raw) - set(SECTIONS)
  if unknown:
    raise KeyError(f"unknown config section(s) {sorted(unknown)}; known: "
                   f"{sorted(SECTIONS)}")
  sections = {}
  for name, cls in SECTIONS.items():
    values = raw.get(name) or {}
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
    for (section, key), (check, what) in RANGES.items():
      value = checked.get(key)
      if section == name and value is not None and not check(value):
        raise ValueError(f"config key {name}.{key} must be {what}, got "
                         f"{value!r}")
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
  _check_sections(raw)
  out = {k: dict(v or {}) for k, v in raw.items()}
  for item in assignments:
    key, sep, text = item.partition("=")
    section, dot, field = key.strip().partition(".")
    if not sep or not dot or not field:
      raise ValueError(f"override {item!r} must look like section.key=value")
    out.setdefault(section, {})[field] = parse_yaml(text, f"override {item!r}")
  return out


def _check_sections(raw) -> None:
  """Raises TypeError unless raw is a mapping of mappings (or nulls)."""
  if not isinstance(raw, dict):
    raise TypeError(f"a config must be a mapping of sections "
                    f"{sorted(SECTIONS)}, got {type(raw).__name__}")
  for name, values in raw.items():
    if values is not None and not isinstance(values, dict):
      raise TypeError(f"config section {name} must be a mapping of keys, "
                      f"got {values!r}")


# The configs shipped with the package (the paper's runs and the demos).
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           "configs")


def shipped() -> list:
  """Returns the names of the shipped configs, sorted."""
  return sorted(f[:-len(".yaml")] for f in os.listdir(SHIPPED_DIR)
                if f.endswith(".yaml"))


def resolve(path: str) -> str:
  """The YAML file `path` names: a file, or a shipped config's name.

  Args:
    path: a YAML file's path, or the name of a shipped config ('demo_text'
      or 'demo_text.yaml').

  Returns:
    A path to an existing file.

  Raises:
    FileNotFoundError: neither, with the shipped names.
  """
  if os.path.isfile(path):
    return path
  name = os.path.basename(path)
  name = name[:-len(".yaml")] if name.endswith(".yaml") else name
  if name in shipped() and os.sep not in path:
    return os.path.join(SHIPPED_DIR, name + ".yaml")
  raise FileNotFoundError(
      f"config {path!r} is neither a file nor a shipped config "
      f"({', '.join(shipped())})")


def load(path: str, overrides: Sequence[str] = ()) -> Config:
  """Reads a YAML config and applies overrides.

  Args:
    path: YAML file, or a shipped config's name (`resolve`).
    overrides: 'section.key=value' strings.

  Returns:
    A checked `Config`.
  """
  path = resolve(path)
  with open(path) as f:
    raw = parse_yaml(f.read(), path)
  return from_dict(override({} if raw is None else raw, overrides))
