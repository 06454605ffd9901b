"""Benchmark the stop-string cut: the byte matcher (``decoding.cut``) against decoding every prefix.

Responses of ``n`` random byte-level BPE tokens (the tokenizer of ``tests/wild_tokenizers.py``)
end with the stop string ``XYZ``, the worst case for a rule that decodes each prefix until the
string appears (the old rule: O(n²) characters decoded). Both rules must give the same cut; the
script records each one's seconds per response length, in one run.

Run: ``python scripts/bench_stop_strings.py --out bench_stop_strings.json``
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def decode_every_prefix(tok, ids: list[int], strings: list[str]) -> int:
    """The previous rule: the first prefix whose decoded text holds a stop string."""
    for i in range(len(ids)):
        if any(s in tok.decode(ids[: i + 1], skip_special_tokens=False) for s in strings):
            return i + 1
    return len(ids)


def main() -> None:
    from stages.lib import decoding
    from tests.wild_tokenizers import byte_bpe

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_stop_strings.json")
    ap.add_argument("--lengths", type=int, nargs="+", default=[250, 1000, 2000, 4000])
    args = ap.parse_args()
    tok = byte_bpe()
    special = set(tok.all_special_ids)
    plain = [
        i for i in range(len(tok)) if i not in special and "X" not in tok.convert_ids_to_tokens(i)
    ]
    g = random.Random(0)
    stops = decoding.stops_for(tok, None, (), ["XYZ"])
    decoding.cut([plain[0]], stops, 8)  # warm-up
    rows = []
    for n in args.lengths:
        ids = [g.choice(plain) for _ in range(n)] + tok.encode("XYZ", add_special_tokens=False)
        t0 = time.perf_counter()
        old = decode_every_prefix(tok, ids, ["XYZ"])
        t1 = time.perf_counter()
        new, reason = decoding.cut(ids, stops, len(ids))
        t2 = time.perf_counter()
        assert old == new and reason == "stop", (old, new, reason)
        rows.append(
            {"tokens": len(ids), "decode_every_prefix_s": t1 - t0, "byte_matcher_s": t2 - t1}
        )
        print(json.dumps(rows[-1]), flush=True)
    Path(args.out).write_text(json.dumps({"rows": rows}, indent=2))


if __name__ == "__main__":
    main()
