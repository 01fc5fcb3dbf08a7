import sys, time, tempfile, json
from pathlib import Path
sys.path.insert(0, "benchmarks")
import fuzz_serve as f
tmp = Path(tempfile.mkdtemp())
ck = f.write_checkpoint(tmp / "fuzz")
g = f.Generator(0); cases = [g.next() for _ in range(2000)]
for tuning in ("1", "0"):
    with f.ServerProcess(ck, tmp / f"s{tuning}", tmp / "log", env={"MMREC_MALLOC_TUNING": tuning}) as s:
        f.greedy(s.port, "The quick brown fox ")
        rss = [s.rss_bytes()]
        for _ in range(8):
            f.send(s.port, cases[1391].raw); rss.append(s.rss_bytes())
        for n in (20000, 40000):
            body = {"model": f.MODEL, "prompt": "x" * n, "max_tokens": 2}
            r = f.request(s.port, "POST", "/v1/completions", body); rss.append(s.rss_bytes())
        for _ in range(4):
            f.send(s.port, cases[1391].raw); rss.append(s.rss_bytes())
        print("tuning", tuning, [round(x / 2**20) for x in rss], flush=True)
