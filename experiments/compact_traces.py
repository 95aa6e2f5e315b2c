"""Merge profiling folders (one part file per episode) into one Parquet file per
(compression, mode), plus the cost models: the form the data set is shipped in.

    python experiments/compact_traces.py OUT IN_FOLDER [IN_FOLDER ...]
"""

from __future__ import annotations

import shutil
import sys
from collections import defaultdict
from pathlib import Path

from replay.trace import read_traces, write_traces


def main(out: str, ins: list[str]) -> None:
    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    groups = defaultdict(list)
    seen = set()
    for folder in ins:
        for tr in read_traces(folder):
            if tr.trace_id in seen:
                raise SystemExit(f"duplicate trace {tr.trace_id} in {folder}")
            seen.add(tr.trace_id)
            groups[(tr.compression, tr.mode)].append(tr)
        for cm in Path(folder).glob("cost-*.json"):
            if not (outp / cm.name).exists():
                shutil.copy(cm, outp / cm.name)
    for (comp, mode), trs in sorted(groups.items()):
        trs.sort(key=lambda t: (t.task, t.split, t.prompt_id))
        write_traces(outp / f"traces-{comp}-{mode}.parquet", trs)
        print(f"{comp} {mode}: {len(trs)} traces, {sum(t.n for t in trs)} tokens")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2:])
