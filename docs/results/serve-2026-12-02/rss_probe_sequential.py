import sys, time, tempfile
from pathlib import Path
sys.path.insert(0, "benchmarks")
import fuzz_serve as f
tmp = Path(tempfile.mkdtemp())
ck = f.write_checkpoint(tmp / "fuzz")
g = f.Generator(0); cases = [g.next() for _ in range(2000)]
with f.ServerProcess(ck, tmp / "s", tmp / "log", env={"MMREC_MALLOC_TUNING": "0"}) as s:
    f.greedy(s.port, "The quick brown fox ")
    prev = s.rss_bytes()
    for i in range(0, 1600):
        r = f.send(s.port, cases[i].raw)
        now = s.rss_bytes()
        if now - prev > 5 * 2**20:
            print(i, cases[i].kind, cases[i].note, r.status, f"{prev/2**20:.0f} -> {now/2**20:.0f} MiB", flush=True)
        prev = now
    print("final", s.rss_bytes() / 2**20)
