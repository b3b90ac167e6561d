"""Print results.jsonl as a Markdown table (one row per measurement, newest last).

    python benchmarks/table.py [--results FILE] [--name SUBSTRING] [--mode cpu]
"""

from __future__ import annotations

import argparse
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def _num(x, digits: int = 0) -> str:
    if x is None:
        return "-"
    return f"{x:,.{digits}f}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=os.path.join(HERE, "results.jsonl"))
    p.add_argument("--name", default="")
    p.add_argument("--mode", default=None)
    args = p.parse_args(argv)
    print("| measurement | n | ours img/s | baseline img/s | ratio | peak RSS ours / baseline (MB) | machine | date (UTC) | command |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |")
    with open(args.results) as f:
        for line in f:
            r = json.loads(line)
            if "ours_images_per_second" not in r or args.name not in r["name"] or (args.mode and r.get("mode") != args.mode):
                continue
            rss = _num(r.get("peak_rss_mb"))
            if r.get("baseline_peak_rss_mb"):
                rss += f" / {_num(r['baseline_peak_rss_mb'])}"
            print(f"| {r['name']} | {_num(r.get('n'))} | {_num(r['ours_images_per_second'], 1)} | "
                  f"{_num(r['baseline_images_per_second'], 1)} | {_num(r['ratio'], 2)} | {rss} | "
                  f"{r.get('machine_description', '')} | {r['date'][:16].replace('T', ' ')} | `{r.get('command', '')}` |")


if __name__ == "__main__":
    main()
