"""Run a Pare script with some of its recipe constants changed, as a subprocess would run it.

    python tests/patched.py distill _STOP_AT_STEP=4 _CHECKPOINT_EVERY=3 -- STUDENT=... OUTPUT=...

(Recipe constants are not per-run knobs; the tests need a few of them small.)
"""

import ast
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402

if __name__ == "__main__":
    cut = sys.argv.index("--")
    module = importlib.import_module(sys.argv[1])
    for item in sys.argv[2:cut]:
        name, _, value = item.partition("=")
        assert hasattr(module, name), name
        setattr(module, name, ast.literal_eval(value))
    sys.argv = [module.__file__, *sys.argv[cut + 1:]]
    common.run(module.main)
