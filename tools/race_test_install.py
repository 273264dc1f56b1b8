"""Race test for the OTA installer: two real processes install into one fresh root at the same instant.

    python tools/race_test_install.py                 # 100 pairs
    python tools/race_test_install.py --pairs 20 --json

Each pair gets an empty root. Both children import the installer, say "ready", wait for a shared start file and
install, in turn: the same package (v1) twice; v1 and v2 (a higher version of the same adapter); a v1 whose probe
fails (correctly signed, so it is refused only after its installer created the adapter folder) and v1.
Afterwards the root must hold a complete, hash-clean current version; an install that reported success must still
be there (the current version is at least its version), and a refused one must have been refused cleanly (a
replay or an older version, never a traceback). "Lost" counts pairs where one side reported success but the root
does not hold its version, or holds nothing at all. Exit status 0 when no pair lost an install or broke the root.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHILD = r"""
import sys, time, json
from pathlib import Path
from edge_lora.errors import EdgeLoraError
from edge_lora.ota.install import install
from edge_lora.ota.keys import load_public_key
root, pkg, pub, base, go = sys.argv[1:6]
key = load_public_key(pub)
sys.stdout.write("ready\n"); sys.stdout.flush()
while not Path(go).exists():
    time.sleep(0.0005)
try:
    rep = install(pkg, key, root, base=base)
    print(json.dumps({"ok": True, "version": rep["version"]}))
except EdgeLoraError as exc:
    print(json.dumps({"ok": False, "error": type(exc).__name__, "message": str(exc)[:200]}))
"""


def build_fixtures(work: Path) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from package_fixtures import make_adapter

    from edge_lora.base import base_content_hash, tiny_model
    from edge_lora.ota.keys import keygen, load_private_key
    from edge_lora.stages.package import build_package

    priv_path, pub_path = keygen(work / "keys")
    priv = load_private_key(priv_path)
    base = work / "base"
    tiny_model("llama", seed=0).save_pretrained(str(base))
    bhash = base_content_hash(base)
    kw = {"key": priv, "base": base, "base_hash": bhash, "level": 3, "probes": ("factors",)}
    build_package(make_adapter(work / "src1" / "race"), version=1, out=work / "v1.elpkg", **kw)
    build_package(make_adapter(work / "src2" / "race", change_layer=1), version=2, out=work / "v2.elpkg", **kw)
    from package_fixtures import resign

    def wrong_probe(m):
        m["probes"][0]["modules"][0]["norm"] *= 2

    (work / "v1-bad-probe.elpkg").write_bytes(resign((work / "v1.elpkg").read_bytes(), priv, wrong_probe))
    return {"pub": pub_path, "base_hash": bhash, "v1": work / "v1.elpkg", "v2": work / "v2.elpkg",
            "bad": work / "v1-bad-probe.elpkg"}


def one_pair(fx: dict, root: Path, packages: tuple[Path, Path]) -> dict:
    from edge_lora.ota.install import check_installed, read_state

    go = root.parent / f"{root.name}.go"
    children = [subprocess.Popen([sys.executable, "-c", CHILD, str(root), str(p), str(fx["pub"]), fx["base_hash"],
                                  str(go)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for p in packages]
    for c in children:
        line = c.stdout.readline().strip()
        if line != "ready":
            c.kill()
            raise RuntimeError(f"installer child failed to start: {line!r} {c.stderr.read()[-500:]}")
    go.touch()
    results = []
    for c in children:
        out, err = c.communicate(timeout=120)
        line = out.strip().splitlines()[-1] if out.strip() else ""
        results.append(json.loads(line) if line.startswith("{") else {"ok": False, "error": "crash",
                                                                        "message": err[-300:]})
    row = {"results": results, "broken": None, "lost": False}
    try:
        current = check_installed(root, "race")
        state = read_state(root, "race")
    except Exception as exc:   # any failure here is the finding, whatever its type
        row["broken"] = f"{type(exc).__name__}: {exc}"
        return row
    wanted = [r["version"] for r in results if r["ok"]]
    row["current"] = current
    row["lost"] = current is None or any(v > current for v in wanted) or state is None
    row["unclean"] = [r for r in results if not r["ok"] and r["error"] not in ("VersionError", "ProbeError")]
    return row


def run(pairs: int, work: Path) -> dict:
    fx = build_fixtures(work)
    rows = []
    for i in range(pairs):
        root = work / f"root{i}"
        root.mkdir()
        kinds = ((fx["v1"], fx["v1"]), (fx["v1"], fx["v2"]), (fx["bad"], fx["v1"]))
        rows.append(one_pair(fx, root, kinds[i % 3]))
    return {"pairs": pairs, "lost": sum(r["lost"] for r in rows), "broken": sum(r["broken"] is not None for r in rows),
            "unclean_refusals": sum(len(r.get("unclean", [])) for r in rows),
            "both_ok": sum(all(x["ok"] for x in r["results"]) for r in rows),
            "failures": [r for r in rows if r["lost"] or r["broken"] or r.get("unclean")][:5]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=100)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edge_lora-race-") as tmp:
        summary = run(args.pairs, Path(tmp))
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(summary, indent=1) if args.json else
          f"{summary['pairs']} pairs: {summary['lost']} lost installs, {summary['broken']} broken roots, "
          f"{summary['unclean_refusals']} unclean refusals, {summary['both_ok']} pairs where both succeeded "
          f"({summary['seconds']} s)")
    return 0 if not (summary["lost"] or summary["broken"] or summary["unclean_refusals"]) else 1


if __name__ == "__main__":
    sys.exit(main())
