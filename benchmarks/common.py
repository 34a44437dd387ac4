"""What the benchmark scripts share: the repository root, byte units, the
/proc memory readers, the machine's description, the command line a section
records and writing a marked section of a Markdown file."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import platform
import shlex

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS_MD = os.path.join(REPO_ROOT, "BENCHMARKS.md")
MIB, GIB = 2**20, 2**30


def proc_status_bytes(field: str, pid="self") -> int:
  """Reads a kB field (VmRSS, VmHWM) of /proc/<pid>/status.

  Args:
    field: the field name.
    pid: a process id or "self".

  Returns:
    The value in bytes, or 0 when the process is gone.
  """
  try:
    with open(f"/proc/{pid}/status") as status:
      for line in status:
        if line.startswith(field + ":"):
          return int(line.split()[1]) * 1024
  except (FileNotFoundError, ProcessLookupError):
    pass
  return 0


def meminfo_kib(field: str) -> int:
  """A field of /proc/meminfo.

  Args:
    field: the field name (MemTotal, MemAvailable, ...).

  Returns:
    Its value in KiB, or 0 when absent.
  """
  with open("/proc/meminfo") as meminfo:
    for line in meminfo:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  return 0


def release_free_memory() -> None:
  """Returns the C heap's free pages to the OS (glibc malloc_trim)."""
  gc.collect()
  libc_name = ctypes.util.find_library("c")
  try:
    ctypes.CDLL(libc_name).malloc_trim(0)
  except (OSError, AttributeError):  # not glibc: RSS may then keep freed pages
    pass


def reset_peak_rss() -> None:
  """Resets this process's VmHWM to its current RSS."""
  with open("/proc/self/clear_refs", "w") as clear_refs:
    clear_refs.write("5")


def machine_description() -> str:
  """A one-line description of the CPU, cores and memory.

  Returns:
    'model, N cores (ISA flags), X GiB RAM, OS release'.
  """
  model, flags = platform.processor() or "unknown CPU", set()
  with open("/proc/cpuinfo") as cpuinfo:
    for line in cpuinfo:
      name, _, value = line.partition(":")
      if name.strip() == "model name":
        model = value.strip()
      elif name.strip() == "flags":
        flags = set(value.split())
  isa = [f for f in ("avx2", "fma") if f in flags]
  isa.append("AVX-512" if "avx512f" in flags else "no AVX-512")
  mem_gib = meminfo_kib("MemTotal") / 2**20
  return (f"{model}, {os.cpu_count()} cores ({', '.join(isa)}), "
          f"{mem_gib:.1f} GiB RAM, {platform.system()} {platform.release()}")


def command(script: str, args=()) -> str:
  """The command that reruns a benchmark from the repository root.

  Args:
    script: the module under benchmarks/ ('attention', 'paper_tables').
    args: its arguments, quoted for the shell where needed.

  Returns:
    'python -m benchmarks.SCRIPT ARGS'.
  """
  return " ".join([f"python -m benchmarks.{script}", shlex.join(args)]).strip()


def write_section(path: str, section: str, begin_marker: str,
                  end_marker: str) -> None:
  """Replaces (or appends) one marked section of a Markdown file.

  Args:
    path: the Markdown file; created with a title when missing.
    section: the new text, markers included.
    begin_marker, end_marker: the section's markers.
  """
  text = "# Benchmarks\n\n"
  if os.path.exists(path):
    with open(path) as f:
      text = f.read()
  begin, end = text.find(begin_marker), text.find(end_marker)
  if begin >= 0 and end > begin:
    text = text[:begin] + section + text[end + len(end_marker):].lstrip("\n")
  else:
    text = text.rstrip("\n") + "\n\n" + section
  with open(path, "w") as f:
    f.write(text)
