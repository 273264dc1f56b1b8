"""Kill test for the OTA installer: SIGKILL `install` at random moments and check that the install root always
holds either the old or the new version, complete and hash-clean, and that the next install recovers.

    python tools/kill_test_install.py                 # 200 trials
    python tools/kill_test_install.py --trials 100 --seed 1 --json

Each trial copies a prepared root, starts a child process that imports the installer, says "ready", and runs
one of four operations in turn: install v2 over v1 (a full package, then a delta), the first install of v1 into an
empty root with --base (so the base record is written too), and a rollback from v2 to v1. The parent sleeps a
random time in [0, 1.25 x the measured operation time] and sends SIGKILL. Then, in this process: `current` must
name a complete version (after a killed first install it may name none), every file of it and of the kept previous
one must match its manifest's sha256, and an installed version must come with its base record; then running the
same operation again must finish it with no staging or temporary-pointer leftovers. A trial takes ~0.25 s.

A SIGKILL tests process death (the kernel still writes back the page cache), not power loss: power-loss safety
rests on the fsync of every file, the staged folder, the versions folder, and the pointer's folder.
Exit status 0 when no trial left a broken root.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DRIVER = r"""
import sys, time
from edge_lora.ota.install import install, rollback
from edge_lora.ota.keys import load_public_key
mode, root, pkg, pub, base = sys.argv[1:6]
key = load_public_key(pub)
sys.stdout.write("ready\n"); sys.stdout.flush()
t = time.perf_counter()
if mode == "rollback":
    rollback(root, "kill-test", public_key=key)
else:
    install(pkg, key, root, base=base if mode == "first" else None)
sys.stdout.write(f"done {time.perf_counter() - t:.6f}\n"); sys.stdout.flush()
"""
# what each trial does: a full or delta install over v1; the first install into an empty root (with --base, so
# the base record is written too); a rollback from v2 to v1
MODES = ("full", "delta", "first", "rollback")


def build_fixtures(work: Path) -> dict:
    """Keys, a tiny base, adapters v1/v2 (one layer changed), packages v1, v2 (full), v2 (delta), a v1 root."""
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from package_fixtures import make_adapter

    from edge_lora.base import base_content_hash, tiny_model
    from edge_lora.ota.install import install
    from edge_lora.ota.keys import keygen, load_private_key, load_public_key
    from edge_lora.stages.package import build_package

    priv_path, pub_path = keygen(work / "keys")
    priv, pub = load_private_key(priv_path), load_public_key(pub_path)
    base = work / "base"
    tiny_model("llama", seed=0).save_pretrained(str(base))
    bhash = base_content_hash(base)
    # rank 16 so that a trial writes ~80 KB and fsyncs take a measurable share of the install
    a1 = make_adapter(work / "src1" / "kill-test", r=16)
    a2 = make_adapter(work / "src2" / "kill-test", r=16, change_layer=1)
    kw = {"key": priv, "base": base, "base_hash": bhash, "level": 3, "probes": ("factors",)}
    build_package(a1, version=1, out=work / "v1.elpkg", **kw)
    build_package(a2, version=2, out=work / "v2.elpkg", **kw)
    build_package(a2, version=2, out=work / "v2-delta.elpkg", from_package=work / "v1.elpkg", **kw)
    template = work / "template"
    template.mkdir()
    install(work / "v1.elpkg", pub, template, base=bhash)
    with_v2 = work / "template-v2"
    shutil.copytree(template, with_v2)
    install(work / "v2.elpkg", pub, with_v2)
    empty = work / "template-empty"
    empty.mkdir()
    return {"pub_path": pub_path, "pub": pub, "base_hash": bhash,
            "templates": {"full": template, "delta": template, "first": empty, "rollback": with_v2},
            "packages": {"full": work / "v2.elpkg", "delta": work / "v2-delta.elpkg", "first": work / "v1.elpkg",
                         "rollback": work / "v1.elpkg"}}


def run_child(root: Path, pkg: Path, pub: Path, delay: float | None, mode: str = "full",
              base: str = "-") -> tuple[str, float | None]:
    """('killed' | 'killed-after-done' | 'completed', install seconds if it finished)."""
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, mode, str(root), str(pkg), str(pub), base],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise RuntimeError(f"installer child failed to start: {line!r} {proc.stderr.read()}")
    if delay is not None:
        time.sleep(delay)
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    out, err = proc.communicate()
    if proc.returncode == -signal.SIGKILL:
        return ("killed-after-done" if "done" in out else "killed"), None
    if proc.returncode != 0:
        raise RuntimeError(f"installer child failed (exit {proc.returncode}): {err.strip()[-2000:]}")
    return "completed", float(out.split()[-1])


def check_root(root: Path, pub, first: bool = False) -> int | None:
    """The current version, after checking it and the kept previous version file by file (after a killed
    first install: None is allowed, and an installed version must come with its base record)."""
    from edge_lora.ota.install import check_installed, device_base_hash, installed_manifest, installed_reader, \
        read_state

    version = check_installed(root, "kill-test")
    if first and version is None:
        return None
    if version not in (1, 2):
        raise AssertionError(f"current version is {version}, expected 1 or 2")
    device_base_hash(root)   # raises if the base record was lost
    prev = read_state(root, "kill-test")["previous"]
    if prev is not None:
        read = installed_reader(root, "kill-test", prev)
        for f in installed_manifest(root, "kill-test", prev)["payload"]["files"]:
            read(f["name"])
    return version


def trial(fx: dict, root: Path, mode: str, delay: float) -> dict:
    from edge_lora.ota import InstallRootError, VersionError
    from edge_lora.ota.install import install, rollback

    if root.exists():
        shutil.rmtree(root)
    shutil.copytree(fx["templates"][mode], root)
    pkg = fx["packages"][mode]
    how, _ = run_child(root, pkg, fx["pub_path"], delay, mode, fx["base_hash"])
    row = {"delay_ms": round(delay * 1000, 3), "child": how, "mode": mode}
    try:
        row["after_kill"] = check_root(root, fx["pub"], first=mode == "first")
    except Exception as exc:  # noqa: BLE001 - any failure here is the finding
        row["after_kill"] = f"BROKEN: {type(exc).__name__}: {exc}"
        return row
    # recovery: running the same command again finishes the job (or is a replay / has nothing left to do)
    try:
        if mode == "rollback":
            if row["after_kill"] == 2:   # the killed rollback had not switched yet (another one would switch back)
                rollback(root, "kill-test", public_key=fx["pub"])
        else:
            install(pkg, fx["pub"], root, base=fx["base_hash"] if mode == "first" else None)
    except (VersionError, InstallRootError):
        pass
    adir = root / "kill-test"
    leftovers = [p.name for p in adir.iterdir() if p.name.startswith((".staging-", ".current.tmp"))]
    final = check_root(root, fx["pub"])
    row["recovered"] = final == (1 if mode in ("first", "rollback") else 2) and not leftovers
    if not row["recovered"]:
        row.update(final=final, leftovers=leftovers)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=200, help="number of killed installs (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="seed for the kill delays")
    ap.add_argument("--workdir", help="keep the fixtures here (default: a temporary folder)")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="edge-lora-kill-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        fx = build_fixtures(work)
        # calibrate: how long does an install take after the child is ready?
        durations = []
        for i in range(6):
            root = work / "calib"
            if root.exists():
                shutil.rmtree(root)
            mode = MODES[i % len(MODES)]
            shutil.copytree(fx["templates"][mode], root)
            durations.append(run_child(root, fx["packages"][mode], fx["pub_path"], None, mode, fx["base_hash"])[1])
        t_install = statistics.median(durations)
        rows = []
        t0 = time.perf_counter()
        for i in range(args.trials):
            rows.append(trial(fx, work / "root", MODES[i % len(MODES)], rng.uniform(0, 1.25 * t_install)))
        wall = time.perf_counter() - t0
    broken = [r for r in rows if str(r["after_kill"]).startswith("BROKEN")]
    summary = {
        "trials": len(rows), "install_ms_median": round(t_install * 1000, 2),
        "killed_mid_install": sum(r["child"] == "killed" for r in rows),
        "finished_before_kill": sum(r["child"] != "killed" for r in rows),
        "old_version_after_kill": sum(r["after_kill"] == (2 if r["mode"] == "rollback" else 1) and r["mode"] != "first"
                                      or r["mode"] == "first" and r["after_kill"] is None for r in rows),
        "new_version_after_kill": sum(r["after_kill"] == (1 if r["mode"] in ("first", "rollback") else 2)
                                      for r in rows),
        "by_mode": {m: sum(r["mode"] == m for r in rows) for m in MODES},
        "broken": len(broken), "recovered": sum(bool(r.get("recovered")) for r in rows),
        "seconds": round(wall, 1), "seed": args.seed,
    }
    if args.json:
        print(json.dumps({"summary": summary, "broken": broken,
                          "unrecovered": [r for r in rows if not r.get("recovered")][:5]}, indent=2))
    else:
        print(f"kill test: {summary['trials']} trials, install takes {summary['install_ms_median']} ms after "
              f"start-up; {summary['killed_mid_install']} killed mid-install, {summary['finished_before_kill']} "
              f"finished first")
        print(f"after the kill: old version {summary['old_version_after_kill']}, new version "
              f"{summary['new_version_after_kill']}, broken {summary['broken']}; next install recovered in "
              f"{summary['recovered']}/{summary['trials']} ({summary['seconds']} s)")
        for r in broken[:5]:
            print("  ", r)
    return 0 if not broken and summary["recovered"] == summary["trials"] else 1


if __name__ == "__main__":
    sys.exit(main())
