"""Scoring memory: peak memory of `maskdiet curate --score el2n` over a small and an 8× larger image folder.

Issue 24's first benchmark. Scoring used to gather every decoded image into one array on the driver, put
it in the object store and have each proxy task make its own float copy of all of it: peak PSS grew 3.8×
from 5,000 to 40,000 images (3.7 → 14.1 GiB, K=2, 1 epoch, 64 px, measured before the change). Now the
pixels stay in the object store as chunks (`stages.pixels`) and each proxy streams a window of them, so
only the object store's share should grow with the images (64² × 3 bytes each: 0.5 GB at 40,000).

Workload: demo digits at 64² px (half PNG, half JPEG), decoded at 64² px, `--score el2n` with K=2 proxies
trained for 1 epoch (`score.cache=false`: nothing reused). Measured as `benchmarks/memory.py` measures (the
same child process and sampler: the PSS of the CLI driver, Ray's GCS, raylet and workers, summed). Targets:
large / small peak PSS < 1.3, and peak PSS at the large size < 4 GiB (4,295 MB).
"""

from __future__ import annotations

if __package__ in (None, ""):  # `python benchmarks/score_memory.py`: make the repository importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import Row, main, tiny
from benchmarks.memory import MB, growth_rows

TARGETS = {
    "score_memory_pss_growth_large_vs_small": ("<", 1.3),
    "score_memory_large_peak_pss_mb": ("<", 4 * 1024**3 / MB),
}

SIZE = 64  # px, stored and decoded
SCORE = (
    "--score",
    "el2n",
    "--set",
    "score.num_models=2",
    "--set",
    "score.epochs=1",
    "--set",
    "score.cache=false",
    "--set",
    f"decode.image_size={SIZE}",
)


def workload(quick: bool) -> tuple[int, int]:
    """(small, large) image counts."""
    if tiny():
        return 100, 800
    if quick:
        return 2500, 20000
    return 5000, 40000


def run(quick: bool = False) -> list[Row]:
    return growth_rows("score_memory", workload(quick), SIZE, SCORE)


if __name__ == "__main__":
    main(run, __doc__.splitlines()[0])
