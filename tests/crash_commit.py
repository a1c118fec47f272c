"""Run a job inline and kill the process (os._exit, no clean-up) at one step
of the output commit protocol. Used by tests/test_outputs.py:

    python tests/crash_commit.py JOB.toml POINT

POINT (the second shard is the one that dies, so the first one is committed):
  part-partial    half of the shard's first part is written, then the process dies
  between-tables  its results part is in place, the sources part not yet
  before-marker   every part is in place, the _done marker not yet
  after-marker    the first shard's marker is written, the process dies at once
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import conftest  # noqa: E402,F401  (offline env, caches)
from pipeline import store as store_mod  # noqa: E402
from pipeline.executor import run_job  # noqa: E402
from pipeline.spec import load_spec  # noqa: E402

CRASH = 17


def main(job: str, point: str) -> None:
    real = store_mod.OutputStore.write_bytes
    state = {"markers": 0}

    def write_bytes(self, rel: str, data: bytes) -> None:
        table = rel.split("/", 1)[0]
        is_part = table in ("results", "sources", "noise")
        second = state["markers"] >= 1  # the first shard is committed
        if second and point == "part-partial" and is_part:
            final = self._p(rel)
            path = self._p(store_mod.STAGING, "crash") if self.renames_atomically else final
            if self.renames_atomically:
                self.fs.create_dir(self._p(store_mod.STAGING), recursive=True)
            fh = self.fs.open_output_stream(path)
            fh.write(data[: len(data) // 2])
            fh.flush()
            os._exit(CRASH)  # never closed: an object store never completes the upload
        if second and point == "between-tables" and table == "sources":
            os._exit(CRASH)
        if second and point == "before-marker" and table == "_done":
            os._exit(CRASH)
        real(self, rel, data)
        if table == "_done":
            state["markers"] += 1
            if point == "after-marker":
                os._exit(CRASH)

    store_mod.OutputStore.write_bytes = write_bytes
    run_job(load_spec(job), progress=False)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
