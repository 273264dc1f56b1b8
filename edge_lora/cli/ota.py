"""OTA verbs: ``keygen``, ``package`` (build side) and ``verify``, ``install``, ``list``, ``rollback`` (device
side; they never load torch unless a torch-logits probe runs). Format: docs/ota.md."""

from __future__ import annotations

import json

from edge_lora.ota.codec import ZSTD_LEVEL

ALL_PROBES = ("factors", "torch-logits", "ort")


def _print(obj: dict, as_json: bool) -> None:
    obj = {k: v for k, v in obj.items() if not k.startswith("_")}
    if as_json:
        print(json.dumps(obj, indent=2, default=str))
        return
    for k, v in obj.items():
        if k == "probes" and isinstance(v, list) and v and isinstance(v[0], dict):
            for p in v:
                print(f"probe {p['kind']}: {p['status']} ({p['detail']})")
        else:
            print(f"{k}: {v}")


# ---------------------------------------------------------------------------------------------- keygen
def add_keygen(sub, name: str) -> None:
    p = sub.add_parser(name, help="create an Ed25519 key pair for signing OTA packages",
                       description="Write ota_ed25519.key (private, mode 0600) and ota_ed25519.pub into a folder. "
                                   "Sign packages with the private key; give devices the public key.")
    p.add_argument("--out", required=True, help="folder for the key pair (created if missing)")
    p.add_argument("--force", action="store_true", help="replace an existing key pair in that folder")
    p.set_defaults(func=_keygen)


def _keygen(args) -> int:
    from edge_lora.stages.package import new_key_pair

    priv, pub, kid = new_key_pair(args.out, force=args.force)
    print(f"private key: {priv} (mode 0600; keep it off devices and out of git)")
    print(f"public key:  {pub} (install it on devices; pass it with --pubkey)")
    print(f"key id:      {kid}")
    return 0


# ---------------------------------------------------------------------------------------------- package
def add_package(sub, name: str) -> None:
    p = sub.add_parser(name, help="build a signed OTA package (full, or a delta with --from)",
                       description="Pack a PEFT adapter folder (or an export folder with a .onnx_adapter) into one "
                                   "signed file: manifest (version, base model hash, sizes and sha256 of every "
                                   "file, probe), zstd payload, Ed25519 signature. With --from, carry only what "
                                   "changed since that full package. Format: docs/ota.md.")
    p.add_argument("adapter", help="PEFT adapter folder or export folder")
    p.add_argument("--key", required=True, help="private key file (or the keygen folder)")
    p.add_argument("--version", required=True, type=int, help="integer version, higher than every earlier one")
    p.add_argument("--base", required=True, help="base model the adapter is bound to: HF folder or 'smollm2'")
    p.add_argument("--out", required=True, help="package file to write")
    p.add_argument("--from", dest="from_package", help="previous FULL package: build a delta against it")
    p.add_argument("--id", help="adapter id on devices (default: the adapter folder's name)")
    p.add_argument("--level", type=int, default=ZSTD_LEVEL, help="zstd level (default %(default)s)")
    p.add_argument("--probe", choices=["all", "factors"], default="all",
                   help="probes to embed: 'all' adds a torch-logits probe (loads the base) and, for an "
                        ".onnx_adapter, an ort probe (runs the hot-swap export) to 'factors'")
    p.add_argument("--export", help="hot-swap ONNX export folder (from `export --profile cpu-hotswap`) the adapter "
                                    "runs on: an adapter.onnx_adapter is written from the PEFT folder and travels "
                                    "with an ort probe. Implied when ADAPTER is itself a hot-swap export folder")
    p.add_argument("--max-mb", type=float, help="size limit per entry and per package in MiB (default 1024)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_package)


def _package(args) -> int:
    from edge_lora.stages.package import build_package, size_limits

    rep = build_package(args.adapter, args.key, args.version, args.base, args.out, from_package=args.from_package,
                        adapter_id=args.id, level=args.level,
                        probes=("factors",) if args.probe == "factors" else ALL_PROBES,
                        limits=size_limits(args.max_mb), export=args.export)
    _print(rep, args.json)
    return 0


# ---------------------------------------------------------------------------------------------- verify, install
def _add_device_check(sub, name: str, helptext: str, description: str, func) -> None:
    p = sub.add_parser(name, help=helptext, description=description)
    p.add_argument("package", help="package file")
    p.add_argument("--pubkey", required=True, help="trusted public key (ota_ed25519.pub)")
    p.add_argument("--root", required=(name == "install"), help="install root folder")
    p.add_argument("--base", help="the device's base model (HF folder or 'smollm2'; or its 64-hex content "
                                  "hash). Default: the hash recorded in ROOT/base.json by an earlier install")
    p.add_argument("--export", help="the device's hot-swap ONNX export folder, to run ort probes. install "
                                    "records it in ROOT/base.json; later runs with --root use the recorded one")
    p.add_argument("--max-mb", type=float, help="size limit per entry and per package in MiB (default 1024)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=func)


def add_verify(sub, name: str) -> None:
    _add_device_check(
        sub, name, "check a package's signature, hashes and (with --root) its fit to a device; writes nothing",
        "Verify the signature with the trusted public key, the manifest schema, every size and sha256, the "
        "size limits, and run the probes. With --root also check the base model hash, the version (no "
        "rollback, no replay) and rebuild a delta against the installed version.", _verify)


def add_install(sub, name: str) -> None:
    _add_device_check(
        sub, name, "verify and install a package atomically into an install root",
        "All verify checks, then stage the files, fsync, run the probes, rename into ROOT/<id>/versions/<N> and "
        "switch ROOT/<id>/current atomically. The previous version is kept for `rollback`. A failure leaves "
        "the root as it was.", _install)


def _verify(args) -> int:
    from edge_lora.stages.package import verify_file

    rep = verify_file(args.package, args.pubkey, root=args.root, base=args.base, max_mb=args.max_mb,
                      export=args.export)
    _print(rep, args.json)
    print("OK: the package verifies" + (" against the install root" if args.root else "") + ".")
    return 0


def _install(args) -> int:
    from edge_lora.stages.package import install_file

    rep = install_file(args.package, args.pubkey, args.root, base=args.base, max_mb=args.max_mb,
                       export=args.export)
    _print(rep, args.json)
    print(f"installed {rep['adapter_id']} version {rep['version']} (previous: {rep['previous']}).")
    return 0


# ---------------------------------------------------------------------------------------------- list, rollback
def add_list(sub, name: str) -> None:
    p = sub.add_parser(name, help="show installed adapters, their current/previous versions and health",
                       description="For each adapter under ROOT: current, previous and highest version, kept "
                                   "versions, and whether every file of the current one still matches its hash. "
                                   "Exit 1 if one is damaged.")
    p.add_argument("--root", required=True, help="install root folder")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_list)


def _list(args) -> int:
    from edge_lora.ota.install import list_installed

    rows = list_installed(args.root)
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"nothing installed under {args.root}")
    for r in rows if not args.json else []:
        if "error" in r:
            print(f"{r['adapter_id']}: {r['error']}")
        else:
            print(f"{r['adapter_id']}: current {r['version']}, previous {r['previous']}, highest {r['highest']}, "
                  f"kept {r['kept']}, {r['status']}")
    return 0 if all(r.get("status") == "ok" for r in rows) else 1


def add_rollback(sub, name: str) -> None:
    p = sub.add_parser(name, help="switch an adapter back to its kept previous version (explicit only)",
                       description="Point ROOT/<id>/current at the previous kept version (or --to N) after "
                                   "checking its files and running its probes. The highest version seen stays: "
                                   "the version rolled back from cannot be reinstalled; publish a higher one.")
    p.add_argument("--root", required=True, help="install root folder")
    p.add_argument("--id", required=True, help="adapter id")
    p.add_argument("--to", type=int, help="version to switch to (default: the previous one)")
    p.add_argument("--pubkey", help="also re-verify the kept version's signature with this public key")
    p.add_argument("--base", help="base model, to also run the torch-logits probe")
    p.add_argument("--export", help="hot-swap export folder for ort probes (default: recorded in ROOT/base.json)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_rollback)


def _rollback(args) -> int:
    from edge_lora.stages.package import rollback_version

    rep = rollback_version(args.root, args.id, to=args.to, pubkey=args.pubkey, base=args.base, export=args.export)
    _print(rep, args.json)
    return 0
