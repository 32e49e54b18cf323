"""The four metrics of models under each evaluation chain, both directions, in one process (one
compile per shape): the official chain; official with LM-EEC's frame list (which reads the
target GT: the leak); official with LM-EEC's area confidence; LM-EEC's own chain.

    python benchmarks/chain_table.py SPLIT GT.json OUT NAME=CHECKPOINT [NAME=CHECKPOINT ...]

e.g. ``init=random:lmeec_hiera_nano trained=work_dirs/synthetic_tiny/model``; prints one JSON
line per (model, direction, chain) and writes OUT/rows.json. Run from the repository root.
"""
import contextlib, io, json, os, sys
from eval.__main__ import main as eval_main

split, gt, out_root = sys.argv[1], sys.argv[2], sys.argv[3]
models = dict(a.split("=", 1) for a in sys.argv[4:])  # name=checkpoint
CONFIGS = {  # name: (predict extra args, score protocol, score the folder?)
    "official": ([], "official", False),
    "official, reference frames": (["--frames", "reference"], "official", False),
    "official, area confidence": (["--confidence", "area"], "official", False),
    "lmeec": (["--protocol", "lmeec"], "lmeec", True),
}
rows = []
for mname, ck in models.items():
    for d in ("ego2exo", "exo2ego"):
        for cname, (extra, proto, folder) in CONFIGS.items():
            out = os.path.join(out_root, mname, cname.replace(", ", "_").replace(" ", "-"), d)
            rc = eval_main(["predict", "--checkpoint", ck, "--data", split, "--direction", d, "--out", out,
                            "--no-progress", "--batch-buckets", "8", *extra])
            assert rc == 0, (mname, d, cname, rc)
            pred = out if folder else os.path.join(out, f"predictions_{d}.json")
            js = os.path.join(out, "score.json")
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                rc = eval_main(["score", "--gt", gt, "--pred", pred, "--direction", d, "--protocol", proto, "--json", js])
            assert rc == 0, (mname, d, cname, rc, buf.getvalue())
            s = json.load(open(js))
            m = s.get("scores", s)
            rows.append((mname, d, cname, m))
            print(mname, d, cname, json.dumps(m)[:400], flush=True)
json.dump([list(r) for r in rows], open(os.path.join(out_root, "rows.json"), "w"), indent=1)
