"""A tiny writer of lorp-fx output directories, run as a subprocess by the fault-injection tests.

    python save_helper.py OUT RUN_ID [--overwrite] [--files N]

Writes N files holding RUN_ID plus a manifest into OUT through
`lorp_fx.io.output_dir.write_directory_atomic` (marker in report.json included), with the
fault-injection hook `LORP_FX_FAULT` (lorp_fx/atomic.py) active. It imports only
lorp_fx's errors, atomic and output modules, not the package (torch, transformers):
a run takes a few tens of milliseconds. Exit status: 0 written, 2 refused
(OutputDirError, its message on stderr).
"""

import json
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
package = types.ModuleType("lorp_fx")
package.__path__ = [str(ROOT / "lorp_fx")]
package.__version__ = "test"
sys.modules.setdefault("lorp_fx", package)

from lorp_fx.core.errors import OutputDirError  # noqa: E402
from lorp_fx.io import atomic  # noqa: E402
from lorp_fx.io.output_dir import write_directory_atomic  # noqa: E402


def write_run(tmp: Path, run_id: str, files: int) -> None:
    names = [f"part-{i}.txt" for i in range(files)]
    for i, name in enumerate(names):
        (tmp / name).write_text(run_id)
        if i == files // 2:
            atomic.checkpoint("half-written")
    (tmp / "manifest.json").write_text(json.dumps({"run": run_id, "files": names}))
    (tmp / "report.json").write_text(json.dumps({"run": run_id}))


def main(argv: list[str]) -> int:
    out, run_id = argv[0], argv[1]
    files = int(argv[argv.index("--files") + 1]) if "--files" in argv else 6
    try:
        write_directory_atomic(out, lambda tmp: write_run(tmp, run_id, files), overwrite="--overwrite" in argv,
                               protect=argv[argv.index("--protect") + 1 :] if "--protect" in argv else ())
    except OutputDirError as error:
        print(f"refused: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
