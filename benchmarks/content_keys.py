"""What keying the precomputed reference by content costs: hashing every record's text and image bytes.

    python benchmarks/content_keys.py                      # the demo (1024 pairs) and 20k pairs of 100 KB images
    python benchmarks/content_keys.py --records 20000 --image-kb 100

`reference: precomputed` looks a pair's reference log-probs up by `record_key` (its text and the SHA-256 of its
image files, each file read once). This times that pass, once per fit, on the demo data and on N records whose
images are N distinct files of the given size (random bytes: the hash reads bytes, it decodes nothing). The
first pass reads from disk or page cache as it is; run twice to see both.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from lightning_meddpo.data.fingerprint import record_key
from lightning_meddpo.data.records import PreferenceRecord, Turn


def time_keys(records: list[PreferenceRecord]) -> tuple[float, int]:
    start = time.perf_counter()
    digests: dict[str, str] = {}
    for r in records:
        record_key(r, digests)
    return time.perf_counter() - start, len(digests)


def demo_records(root: Path) -> list[PreferenceRecord]:
    from lightning_meddpo.data.formats import read_records
    from lightning_meddpo.demo.synthetic import generate_demo_dataset

    paths = generate_demo_dataset(root / "demo", n_train=1024, n_val=0, n_test=0)
    records, _ = read_records(str(paths["train"]), None)
    return records


def synthetic_records(root: Path, n: int, image_kb: int) -> list[PreferenceRecord]:
    images = root / "images"
    images.mkdir()
    records = []
    for i in range(n):
        path = images / f"{i:06d}.jpg"
        path.write_bytes(os.urandom(image_kb * 1024))
        records.append(PreferenceRecord(id=str(i), image=path, prompt=(Turn("human", f"<image>\nQuestion {i}?"),),
                                        chosen=f"Answer {i}.", rejected=f"Other answer {i}."))
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--image-kb", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="content_keys_") as tmp:
        root = Path(tmp)
        demo = demo_records(root)
        seconds, files = time_keys(demo)
        size = sum(Path(r.image).stat().st_size + Path(r.rejected_image).stat().st_size for r in demo) / len(demo) / 2
        print(f"demo: {len(demo)} pairs, {files} image files of ~{size / 1024:.1f} KB: {seconds:.3f} s")
        many = synthetic_records(root, args.records, args.image_kb)
        for attempt in ("first pass", "second pass"):
            seconds, files = time_keys(many)
            print(f"{args.records} pairs, {files} image files of {args.image_kb} KB ({files * args.image_kb / 1024:.0f} MB), "
                  f"{attempt}: {seconds:.2f} s ({files * args.image_kb / 1024 / seconds:.0f} MB/s)")


if __name__ == "__main__":
    main()
