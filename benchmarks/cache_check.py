"""What checking a cached artifact against its manifest costs (qubench.manifest.check).

Builds one folder artifact of --mib MiB in --files files through `qubench.store.cached_dir` in a
scratch QUBENCH_HOME, then times: the build's own hashing (recording the manifest), the first check
after the build (served by the digest memo the build seeded), a check after the memo is dropped
(every byte read and hashed again), and a check after one file was rewritten in place (only that
file is re-read).

    python benchmarks/cache_check.py --mib 512 --files 4
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=256, help="total size of the artifact")
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="qubench-cache-check-"))
    os.environ["QUBENCH_HOME"] = str(scratch / "home")
    from qubench import fingerprint, manifest, store

    chunk = os.urandom(1 << 20)
    per_file = max(1, args.mib // args.files)

    def build(tmp: Path) -> None:
        for i in range(args.files):
            with open(tmp / f"shard-{i}.safetensors.bin", "wb") as fh:
                for _ in range(per_file):
                    fh.write(chunk)

    def timed(fn) -> float:
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            assert fn() is None
            best = min(best, time.perf_counter() - t0)
        return best

    try:
        path = scratch / "home" / "kind" / "artifact"
        t0 = time.perf_counter()
        store.cached_dir(path, build)
        built = time.perf_counter() - t0
        memo = timed(lambda: manifest.check(path))
        t0 = time.perf_counter()
        shutil.rmtree(scratch / "home" / fingerprint.MEMO_KIND)
        assert manifest.check(path) is None
        cold = time.perf_counter() - t0
        shard = path / "shard-0.safetensors.bin"
        shard.write_bytes(shard.read_bytes())  # same bytes, new mtime/ctime: re-read, same digest
        t0 = time.perf_counter()
        assert manifest.check(path) is None
        one = time.perf_counter() - t0
        total = per_file * args.files
        print(f"artifact: {total} MiB in {args.files} files; torch threads not involved (hashlib, one thread)")
        print(f"build incl. recording the manifest: {built:.2f} s")
        print(f"check, digests memoised (best of {args.repeats}): {memo * 1e3:.2f} ms")
        print(f"check, memo dropped (every byte hashed): {cold:.2f} s ({total / cold:.0f} MiB/s)")
        print(f"check after one {per_file} MiB file was rewritten: {one:.2f} s")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
