"""Many adapters of one base, compressed together: per module, an output basis U and an input basis V shared by
all the adapters, and a small core per adapter, ``ΔW_i ≈ U · C_i · Vᵀ``.

    shared, report = compress_many({"add": a1, "roman": a2, ...}, ManyConfig(budget=0.2))
    shared.save("out/")              # basis.safetensors, cores/<name>.safetensors, many.json
    shared.adapter("roman")          # plain LoRA (B = U·C, A = Vᵀ) for export, merge or PEFT
    projected = shared.project("new", adapter)   # a later adapter onto the existing bases (compress-many --onto)

Why the canonical form: the raw factors of independently trained adapters share no coordinates
(``B·A = (B·G)(G⁻¹·A)``), so PCA over raw A and B (the vlora / lorashare approach, :func:`raw_factor_pca`, kept
for comparison) fits the gauge, not the update. Here everything is computed from each adapter's canonical SVD
``ΔW_i = U_i S_i V_iᵀ`` (edge_lora.stages.canonicalize), never from ΔW:

1. every adapter's update lies in ``Q_U = orth[U_1 S_1 … U_N S_N]`` (d_out × K) and ``Q_V`` likewise, K ≤ Σ r_i,
   so ``ΔW_i = Q_U M_i Q_Vᵀ`` exactly with a small ``M_i = (Q_Uᵀ U_i) S_i (V_iᵀ Q_V)``;
2. Tucker-2 of the N × K × K stack (higher-order orthogonal iteration, each ``M_i`` scaled to unit norm so that
   every adapter counts alike): ``P``, ``Q`` (K × R), ``U = Q_U P``, ``V = Q_V Q``, ``C_i = Pᵀ M_i Q``;
3. the error of each adapter follows from the orthogonal projection: ``‖ΔW_i − U C_i Vᵀ‖² = ‖M_i‖² − ‖C_i‖²``.

The budget holds for each adapter and each module separately (``max_i err_i ≤ budget``, the rank R of a module the
smallest that meets it), not on average. Nothing assumes that sharing helps: the report sets the total beside N
adapters truncated one at a time at the same budget; on adapters of unrelated tasks the shared bases can cost
more (BENCHMARKS "Many adapters").
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from edge_lora.adapter import Adapter, LoraModule
from edge_lora.errors import AdapterError, BudgetError, CompatibilityError, ConfigError
from edge_lora.files import atomic_folder
from edge_lora.report import StageReport
from edge_lora.stages.canonicalize import svd_factors
from edge_lora.stages.tensorize import min_rank_for

FORMAT = "edge_lora.many"
VERSION = 1
BASIS_FILE = "basis.safetensors"
MANIFEST = "many.json"
CORES_DIR = "cores"
HOOI_ITERS = 4   # from the HOSVD; 12 gave the same bytes (±0.3%) at 3× the time on a layer of the demo suite


@dataclass(frozen=True)
class ManyConfig:
    """``budget``: relative Frobenius error ‖ΔW − U·C·Vᵀ‖ / ‖ΔW‖ allowed for every module of every adapter;
    ``core_rank``: upper bound on any module's shared rank R (None: as large as the budget needs);
    ``dtype``: storage of bases and cores."""

    budget: float = 0.2
    core_rank: int | None = None
    dtype: str = "float16"

    def __post_init__(self):
        if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)) or not (
                0 < self.budget < 1):
            raise ConfigError(f"compress-many: --budget must be a relative error in (0, 1), not {self.budget!r}.")
        if self.core_rank is not None and (type(self.core_rank) is not int or self.core_rank < 1):
            raise ConfigError(f"compress-many: --core-rank must be a positive integer, not {self.core_rank!r}.")
        if self.dtype not in ("float16", "float32"):
            raise ConfigError(f"compress-many: dtype must be float16 or float32, not {self.dtype!r}.")


@dataclass
class SharedModule:
    """One module's shared bases (U: d_out × R, V: d_in × R, orthonormal columns) and each adapter's core
    (R × R) with its relative error."""

    name: str
    U: torch.Tensor
    V: torch.Tensor
    cores: dict[str, torch.Tensor]
    errors: dict[str, float]
    energy: dict[str, float]   # ‖ΔW_i‖², to weigh errors over modules

    @property
    def rank(self) -> int:
        return self.U.shape[1]


@dataclass
class SharedAdapters:
    """The result of :func:`compress_many`: adapters (name → their PEFT config) over shared modules."""

    modules: dict[str, SharedModule]
    configs: dict[str, dict]
    sources: dict[str, str | None] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.configs)

    def error(self, name: str) -> float:
        """The adapter's energy-weighted error over its modules: sqrt(Σ_m err²·‖ΔW‖² / Σ_m ‖ΔW‖²)."""
        num = sum(m.errors[name] ** 2 * m.energy[name] for m in self.modules.values() if name in m.cores)
        den = sum(m.energy[name] for m in self.modules.values() if name in m.cores)
        return math.sqrt(num / den) if den else 0.0

    def worst_module_error(self, name: str) -> float:
        return max((m.errors[name] for m in self.modules.values() if name in m.cores), default=0.0)

    def adapter(self, name: str) -> Adapter:
        """Adapter ``name`` as plain LoRA of rank R per module: B = U·C, A = Vᵀ, scale 1."""
        if name not in self.configs:
            raise AdapterError(f"no adapter {name!r} here; the adapters are {', '.join(self.names)}.")
        modules = {}
        for m in self.modules.values():
            if name in m.cores:
                B, A = (m.U.double() @ m.cores[name].double()).float(), m.V.T.contiguous().float()
                modules[m.name] = LoraModule(name=m.name, kind="linear", A=A, B=B, scale=1.0, alpha=float(m.rank))
        config = dict(self.configs[name], r=max(x.rank for x in modules.values()), lora_alpha=1, use_rslora=False,
                      rank_pattern={}, alpha_pattern={})
        return Adapter(modules=modules, config=config, source=self.sources.get(name), form="compressed")

    def project(self, name: str, adapter: Adapter) -> "SharedAdapters":
        """A copy with ``adapter`` added as ``name``, its cores projected onto the existing bases (the bases do not
        change, so the adapters already on a device keep their cores)."""
        if name in self.configs:
            raise AdapterError(f"an adapter named {name!r} is already in this set; pick another name.")
        svds = _svds({name: adapter})
        missing = sorted(set(svds[name]) - set(self.modules))
        if missing:
            raise CompatibilityError(f"adapter {name!r} adapts {missing[0]}, which no adapter of the set adapts; "
                                     "the shared bases cannot hold it. Compress the set again with it.")
        modules = {}
        for mname, m in self.modules.items():
            cores, errors, energy = dict(m.cores), dict(m.errors), dict(m.energy)
            if mname in svds[name]:
                U_i, S_i, V_i = svds[name][mname]
                _check_shape(mname, (m.U.shape[0], m.V.shape[0]), (U_i.shape[0], V_i.shape[0]), name)
                C = (m.U.double().T @ U_i) * S_i @ (V_i.T @ m.V.double())
                total = float((S_i ** 2).sum())
                cores[name] = C
                errors[name] = math.sqrt(max(total - float((C ** 2).sum()), 0.0) / total) if total else 0.0
                energy[name] = total
            modules[mname] = SharedModule(mname, m.U, m.V, cores, errors, energy)
        return SharedAdapters(modules, {**self.configs, name: dict(adapter.config)},
                              {**self.sources, name: adapter.source})

    # ------------------------------------------------------------------------------------------ bytes
    def basis_params(self) -> int:
        return sum(m.U.numel() + m.V.numel() for m in self.modules.values())

    def core_params(self, name: str) -> int:
        return sum(m.cores[name].numel() for m in self.modules.values() if name in m.cores)

    # ------------------------------------------------------------------------------------------ files
    def save(self, folder: str | os.PathLike, config: ManyConfig, report: dict | None = None,
             force: bool = False) -> Path:
        """Write ``folder`` atomically: basis.safetensors, cores/<name>.safetensors (each bound to the basis by
        its sha256), many.json."""
        from safetensors.torch import save

        out = Path(folder)
        if out.exists() and not force:
            raise ConfigError(f"output folder {out} already exists; choose another --out or pass --force.")
        dtype = getattr(torch, config.dtype)
        basis = {}
        for m in self.modules.values():
            basis[f"{m.name}.U"] = m.U.to(dtype).contiguous()
            basis[f"{m.name}.V"] = m.V.to(dtype).contiguous()
        basis_bytes = save(basis, metadata={"format": FORMAT, "version": str(VERSION)})
        basis_sha = hashlib.sha256(basis_bytes).hexdigest()
        manifest = {"format": FORMAT, "version": VERSION, "budget": config.budget, "core_rank": config.core_rank,
                    "dtype": config.dtype, "basis": {"file": BASIS_FILE, "sha256": basis_sha,
                                                     "bytes": len(basis_bytes)},
                    "modules": {m.name: {"rank": m.rank, "d_out": m.U.shape[0], "d_in": m.V.shape[0]}
                                for m in self.modules.values()},
                    "adapters": {}, "report": report or {}}
        with atomic_folder(out) as tmp:
            (tmp / BASIS_FILE).write_bytes(basis_bytes)
            (tmp / CORES_DIR).mkdir()
            for name in self.names:
                cores = {f"{m.name}.C": m.cores[name].to(dtype).contiguous() for m in self.modules.values()
                         if name in m.cores}
                fit = {m.name: [m.errors[name], m.energy[name]] for m in self.modules.values() if name in m.cores}
                data = save(cores, metadata={"format": FORMAT, "basis_sha256": basis_sha,
                                             "peft_config": json.dumps(self.configs[name], sort_keys=True),
                                             "fit": json.dumps(fit)})
                (tmp / CORES_DIR / f"{name}.safetensors").write_bytes(data)
                manifest["adapters"][name] = {
                    "core_file": f"{CORES_DIR}/{name}.safetensors", "sha256": hashlib.sha256(data).hexdigest(),
                    "bytes": len(data), "error": self.error(name), "worst_module_error": self.worst_module_error(name),
                    "source": self.sources.get(name)}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        return out

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "SharedAdapters":
        """Read a folder written by :meth:`save`; a core whose basis hash is not this basis is refused."""
        from safetensors import SafetensorError

        try:
            return cls._load(Path(folder))
        except (KeyError, TypeError, ValueError, AttributeError, SafetensorError, OSError) as exc:
            raise AdapterError(f"{folder} is a damaged compress-many folder ({type(exc).__name__}: {exc}); write it "
                               "again with python -m edge_lora compress-many.") from None

    @classmethod
    def _load(cls, folder: Path) -> "SharedAdapters":
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load

        try:
            manifest = json.loads((folder / MANIFEST).read_text())
            basis_bytes = (folder / BASIS_FILE).read_bytes()
        except (OSError, ValueError) as exc:
            raise AdapterError(f"{folder} is not a compress-many folder ({exc}); write one with python -m "
                               "edge_lora compress-many.") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise AdapterError(f"{folder / MANIFEST}: not a {FORMAT} v{VERSION} manifest.")
        sha = hashlib.sha256(basis_bytes).hexdigest()
        if sha != manifest["basis"]["sha256"]:
            raise AdapterError(f"{folder / BASIS_FILE} does not match the sha256 in {MANIFEST}; the folder was "
                               "changed after it was written.")
        try:
            basis = load(basis_bytes)
        except SafetensorError as exc:
            raise AdapterError(f"{folder / BASIS_FILE} is not readable safetensors ({exc}).") from None
        modules = {n: SharedModule(n, basis[f"{n}.U"].double(), basis[f"{n}.V"].double(), {}, {}, {})
                   for n in manifest["modules"]}
        configs, sources = {}, {}
        for name, info in manifest["adapters"].items():
            path = folder / info["core_file"]
            if hashlib.sha256(path.read_bytes()).hexdigest() != info["sha256"]:
                raise AdapterError(f"{path} does not match its sha256 in {MANIFEST}; the core was changed or "
                                   "replaced after it was written.")
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                if meta.get("basis_sha256") != sha:
                    raise CompatibilityError(f"{path}: its core was fitted to another basis "
                                             f"({str(meta.get('basis_sha256'))[:12]}…, this folder's is {sha[:12]}…); "
                                             "a new basis invalidates old cores. Project the adapter again with "
                                             "compress-many --onto.")
                configs[name] = json.loads(meta["peft_config"])
                fit = json.loads(meta["fit"])
                for key in f.keys():
                    mname = key.removesuffix(".C")
                    core = f.get_tensor(key).double()
                    if tuple(core.shape) != (modules[mname].U.shape[1], modules[mname].V.shape[1]):
                        raise AdapterError(f"{path}: core {key} has shape {list(core.shape)}, the basis of {mname} "
                                           f"needs {[modules[mname].U.shape[1], modules[mname].V.shape[1]]}.")
                    modules[mname].cores[name] = core
                    modules[mname].errors[name], modules[mname].energy[name] = fit[mname]
            sources[name] = info.get("source")
        return cls(modules, configs, sources)


# ------------------------------------------------------------------------------------------------ the fit
def _check_shape(module: str, want, got, name: str) -> None:
    if tuple(want) != tuple(got):
        raise CompatibilityError(f"module {module}: adapter {name!r} updates a {got[0]}x{got[1]} weight, the others "
                                 f"a {want[0]}x{want[1]} one; the adapters are not for one base.")


def _svds(adapters: dict[str, Adapter]) -> dict[str, dict[str, tuple]]:
    """name → module → (U, S, V) of the canonical SVD, float64."""
    out = {}
    for name, adapter in adapters.items():
        if adapter.extra_tensors:
            raise AdapterError(f"adapter {name!r} carries full tensors besides its LoRA factors (modules_to_save or "
                               f"bias = 'all', e.g. {next(iter(adapter.extra_tensors))}); compress-many shares LoRA "
                               "factors only and would drop them. Use a merged export for it.")
        out[name] = {}
        for mname, m in adapter.modules.items():
            if m.kind != "linear" or m.magnitude is not None or m.bias is not None:
                raise AdapterError(f"adapter {name!r}, module {mname}: compress-many takes plain LoRA on Linear "
                                   "layers (no embeddings, no DoRA, no lora_bias).")
            out[name][mname] = svd_factors(m.B.double(), m.A.double(), m.scale)
    return out


def _orth(X: torch.Tensor) -> torch.Tensor:
    U, S, _ = torch.linalg.svd(X, full_matrices=False)
    return U[:, S > (S[0] * 1e-10 if S.numel() else 0)]


def _top(G: torch.Tensor, R: int) -> torch.Tensor:
    """The R leading eigenvectors of a symmetric PSD matrix."""
    _, vecs = torch.linalg.eigh(G)
    return vecs[:, -R:].flip(1)


def hooi(Ms: list[torch.Tensor], R: int, iters: int = HOOI_ITERS) -> tuple[torch.Tensor, torch.Tensor]:
    """Tucker-2 of the stack of K_u × K_v matrices: P (K_u × R), Q (K_v × R) with orthonormal columns that
    maximise Σ‖Pᵀ M_i Q‖² (higher-order orthogonal iteration, from the HOSVD)."""
    R_u, R_v = min(R, Ms[0].shape[0]), min(R, Ms[0].shape[1])   # a core R_u × R_v
    P = _top(sum(M @ M.T for M in Ms), R_u)
    Q = _top(sum(M.T @ M for M in Ms), R_v)
    for _ in range(iters):
        P = _top(sum((M @ Q) @ (M @ Q).T for M in Ms), R_u)
        Q = _top(sum((M.T @ P) @ (M.T @ P).T for M in Ms), R_v)
    return P, Q


def _fit_module(mname: str, svds: dict[str, tuple], config: ManyConfig) -> tuple[SharedModule, dict]:
    names = list(svds)
    QU = _orth(torch.cat([U * S for U, S, _ in svds.values()], 1))
    QV = _orth(torch.cat([V * S for _, S, V in svds.values()], 1))
    Ms = {n: (QU.T @ U) * S @ (V.T @ QV) for n, (U, S, V) in svds.items()}
    energy = {n: float((S ** 2).sum()) for n, (_, S, _) in svds.items()}
    unit = [Ms[n] / math.sqrt(energy[n]) if energy[n] > 0 else Ms[n] for n in names]
    K = max(QU.shape[1], QV.shape[1])   # at R = K both bases span everything: the fit is exact
    cap = min(K, config.core_rank) if config.core_rank else K
    fits: dict[int, tuple] = {}

    def fit(R: int):
        if R not in fits:
            P, Q = hooi(unit, R)
            cores = {n: P.T @ Ms[n] @ Q for n in names}
            errors = {n: math.sqrt(max(energy[n] - float((cores[n] ** 2).sum()), 0.0) / energy[n])
                      if energy[n] > 0 else 0.0 for n in names}
            fits[R] = (P, Q, cores, errors)
        return fits[R]

    lo, hi = 1, cap
    while lo < hi:   # the smallest R whose worst adapter meets the budget (HOOI's error falls with R)
        mid = (lo + hi) // 2
        if max(fit(mid)[3].values()) <= config.budget:
            hi = mid
        else:
            lo = mid + 1
    while lo < cap and max(fit(lo)[3].values()) > config.budget:   # HOOI is not exactly monotone in R
        lo += 1
    P, Q, cores, errors = fit(lo)
    module = SharedModule(mname, QU @ P, QV @ Q, cores, errors, energy)
    return module, {"rank": lo, "span": K, "fits": len(fits)}


def compress_many(adapters: dict[str, Adapter], config: ManyConfig = ManyConfig()
                  ) -> tuple[SharedAdapters, StageReport]:
    """Fit shared bases per module over ``adapters`` (name → Adapter, ranks and target modules may differ).
    Raises CompatibilityError for adapters that do not share a base (a module of two shapes) or share no module,
    BudgetError when ``core_rank`` keeps an adapter above the budget (naming it, with the best it reaches)."""
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # small eigh / SVD: one thread is faster, and far faster when the cores are busy
    try:
        return _compress_many(adapters, config, start)
    finally:
        torch.set_num_threads(threads)


def _compress_many(adapters, config, start):
    if len(adapters) < 2:
        raise ConfigError("compress-many needs two adapters or more; for one, use python -m edge_lora compress.")
    svds = _svds(adapters)
    by_module: dict[str, dict[str, tuple]] = {}
    for name, mods in svds.items():
        for mname, usv in mods.items():
            by_module.setdefault(mname, {})[name] = usv
    shared = [m for m, d in by_module.items() if len(d) > 1]
    if not shared:
        raise CompatibilityError(f"the adapters {', '.join(adapters)} have no target module in common; there is "
                                 "nothing to share. Compress them one at a time (python -m edge_lora compress).")
    modules, ranks = {}, {}
    for mname in sorted(by_module):
        usvs = by_module[mname]
        first = next(iter(usvs.values()))
        for n, (U, _, V) in usvs.items():
            _check_shape(mname, (first[0].shape[0], first[2].shape[0]), (U.shape[0], V.shape[0]), n)
        modules[mname], ranks[mname] = _fit_module(mname, usvs, config)
    result = SharedAdapters(modules, {n: dict(a.config) for n, a in adapters.items()},
                            {n: a.source for n, a in adapters.items()})
    over = {n: result.worst_module_error(n) for n in adapters if result.worst_module_error(n) > config.budget}
    if over:
        worst = max(over, key=over.get)
        raise BudgetError(f"with --core-rank {config.core_rank}, adapter {worst!r} reaches at best a module error of "
                          f"{over[worst]:.3f} against the budget {config.budget:g}"
                          + (f" ({len(over) - 1} more adapters miss it too)" if len(over) > 1 else "")
                          + ". Raise --core-rank, loosen --budget, or compress that adapter on its own.")
    report = StageReport("compress-many", {"budget": config.budget, "core_rank": config.core_rank},
                         seconds=time.perf_counter() - start)
    report.metrics.update(_metrics(result, adapters, config, ranks))
    return result, report


def run(adapters: dict[str, Adapter], config: ManyConfig) -> tuple[SharedAdapters, StageReport]:
    """The stage's one shape (edge_lora.stages.*.run): :func:`compress_many`."""
    return compress_many(adapters, config)


# -------------------------------------------------------------------------------------------- comparisons
def separate_truncation(adapters: dict[str, Adapter], budget: float) -> dict[str, Adapter]:
    """Each adapter truncated on its own, per module, to the smallest rank within ``budget`` (the baseline the
    shared bases must beat)."""
    out = {}
    for name, svd in _svds(adapters).items():
        modules = {}
        for mname, (U, S, V) in svd.items():
            k = max(min_rank_for(S, budget ** 2 * float((S ** 2).sum())), 1)
            root = S[:k].sqrt()
            modules[mname] = LoraModule(name=mname, kind="linear", A=(root[:, None] * V[:, :k].T).float(),
                                        B=(U[:, :k] * root).float(), scale=1.0, alpha=float(max(k, 1)))
        out[name] = adapters[name].replace_modules(modules, form="compressed")
    return out


def raw_factor_pca(adapters: dict[str, Adapter], rank: int) -> tuple[dict[str, Adapter], int]:
    """The vlora / lorashare approach, for comparison: per module, PCA bases (rank ``rank``) of the raw B columns
    and of the raw A rows across the adapters, each adapter's factors projected onto them. Returns the adapters
    and the parameters stored (the bases once, each adapter's coefficients of B and A)."""
    projected: dict[str, dict[str, LoraModule]] = {n: {} for n in adapters}
    params = 0
    for mname in sorted({m for a in adapters.values() for m in a.modules}):
        have = [n for n in adapters if mname in adapters[n].modules]
        mods = [adapters[n].modules[mname] for n in have]
        Bs = [m.B.double() * m.scale for m in mods]
        As = [m.A.double() for m in mods]
        PB = torch.linalg.svd(torch.cat(Bs, 1), full_matrices=False)[0][:, :rank]
        PA = torch.linalg.svd(torch.cat([A.T for A in As], 1), full_matrices=False)[0][:, :rank]
        params += PB.numel() + PA.numel() + sum(PB.shape[1] * B.shape[1] + PA.shape[1] * A.shape[0]
                                                for B, A in zip(Bs, As))
        for n, m, B, A in zip(have, mods, Bs, As):
            projected[n][mname] = LoraModule(name=mname, kind="linear", A=((A @ PA) @ PA.T).float(),
                                             B=(PB @ (PB.T @ B)).float(), scale=1.0, alpha=float(m.rank))
    return {n: adapters[n].replace_modules(projected[n], form="compressed") for n in adapters}, params


def relative_error(original: Adapter, approx: Adapter) -> float:
    """Energy-weighted relative error of ``approx`` against ``original`` over the original's modules (Gram traces,
    no ΔW)."""
    from edge_lora.stages.canonicalize import difference_frobenius_sq, frobenius_sq

    num = den = 0.0
    for name, m in original.modules.items():
        B, A = m.B.double() * m.scale, m.A.double()
        den += frobenius_sq(B, A)
        a = approx.modules.get(name)
        num += frobenius_sq(B, A) if a is None else difference_frobenius_sq(B, A, a.B.double() * a.scale,
                                                                              a.A.double())
    return math.sqrt(num / den) if den else 0.0


def peft_fp16_bytes(adapter: Adapter) -> int:
    return 2 * adapter.params


def _metrics(result: SharedAdapters, adapters: dict[str, Adapter], config: ManyConfig, ranks: dict) -> dict:
    width = 2 if config.dtype == "float16" else 4
    separate = {n: a.params for n, a in separate_truncation(adapters, config.budget).items()}
    per = {n: {"error": round(result.error(n), 5), "worst_module_error": round(result.worst_module_error(n), 5),
               "core_bytes": width * result.core_params(n), "peft_fp16_bytes": peft_fp16_bytes(a),
               "separate_truncation_bytes": width * separate[n]} for n, a in adapters.items()}
    basis = width * result.basis_params()
    total = basis + sum(width * result.core_params(n) for n in result.names)   # every core, originals at hand or not
    originals = sum(p["peft_fp16_bytes"] for p in per.values())
    rs = sorted(r["rank"] for r in ranks.values())
    return {"adapters": per, "basis_bytes": basis, "total_bytes": total, "peft_fp16_total_bytes": originals,
            # against the originals only when every one is at hand (after --onto their folders may have moved)
            "ratio_vs_peft_fp16": originals / total if total and len(per) == len(result.names) else None,
            "separate_truncation_total_bytes": sum(p["separate_truncation_bytes"] for p in per.values()),
            "modules": len(ranks), "rank_median": rs[len(rs) // 2], "rank_max": rs[-1],
            "span_median": sorted(r["span"] for r in ranks.values())[len(rs) // 2]}


# ------------------------------------------------------------------------------------------------ folders
def _named(paths) -> dict[str, Adapter]:
    from edge_lora.adapter import load_peft

    adapters, trained_on = {}, {}
    for path in paths:
        folder = Path(path)
        name = folder.resolve().name
        if name in adapters:
            raise ConfigError(f"two adapters are named {name!r} (adapters are named by their folder); rename one.")
        adapters[name] = load_peft(folder)
        metrics = folder / "metrics.json"
        if metrics.is_file():
            try:
                info = json.loads(metrics.read_text())
            except (OSError, ValueError) as exc:
                raise AdapterError(f"{metrics} cannot be read as JSON ({exc}); fix or remove it.") from None
            if not isinstance(info, dict):
                raise AdapterError(f"{metrics} must hold a JSON object; fix or remove it.")
            trained_on[name] = info.get("base_sha256")
    bases = {v for v in trained_on.values() if v}
    if len(bases) > 1:
        by = {b: [n for n, v in trained_on.items() if v == b] for b in bases}
        raise CompatibilityError("the adapters were trained on different bases: " + "; ".join(
            f"{', '.join(ns)} on {b[:12]}…" for b, ns in by.items()) + ". Compress the adapters of each base apart.")
    return adapters


def _markdown(shared: SharedAdapters, metrics: dict, extra: list[str]) -> str:
    lines = ["| adapter | error | worst module error | core KB | fp16 PEFT KB | alone at the budget KB |",
             "|---|---:|---:|---:|---:|---:|"]
    for n, p in metrics["adapters"].items():
        lines.append(f"| {n} | {p['error']:.3f} | {p['worst_module_error']:.3f} | {p['core_bytes'] / 1e3:.0f} | "
                     f"{p['peft_fp16_bytes'] / 1e3:.0f} | {p['separate_truncation_bytes'] / 1e3:.0f} |")
    ratio = metrics["ratio_vs_peft_fp16"]
    against = (f"{ratio:.1f}× smaller than the {len(metrics['adapters'])} fp16 PEFT adapters "
               f"({metrics['peft_fp16_total_bytes'] / 1e6:.2f} MB)" if ratio is not None else
               "(some adapters' original folders are not at hand: no ratio to the PEFT files)")
    lines += ["", f"Total {metrics['total_bytes'] / 1e6:.2f} MB (bases {metrics['basis_bytes'] / 1e6:.2f} MB), "
              f"{against}; the adapters at hand truncated alone to the same budget: "
              f"{metrics['separate_truncation_total_bytes'] / 1e6:.2f} MB. Module ranks: median "
              f"{metrics['rank_median']}, max {metrics['rank_max']}.", *extra]
    return "\n".join(lines)


def compress_many_folders(paths, out, budget: float = 0.2, core_rank: int | None = None, onto=None,
                          dtype: str = "float16", force: bool = False) -> dict:
    """``python -m edge_lora compress-many``: fit (or, with ``onto``, project onto that folder's bases) and write
    ``out``; returns the report (with a ``markdown`` summary)."""
    if onto is not None:   # saving the basis in another dtype would change its hash: every shipped core invalid
        try:
            dtype = json.loads((Path(onto) / MANIFEST).read_text())["dtype"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise AdapterError(f"{onto} is not a compress-many folder ({exc}).") from None
    config = ManyConfig(budget=budget, core_rank=core_rank, dtype=dtype)
    out = Path(out)
    if out.exists() and not force:
        raise ConfigError(f"output folder {out} already exists; choose another --out or pass --force.")
    new = _named(paths)
    extra = []
    if onto is None:
        shared, report = compress_many(new, config)
        metrics = report.metrics
    else:
        shared = SharedAdapters.load(onto)
        originals = {}
        for name, source in shared.sources.items():
            if source and Path(source).is_dir():
                from edge_lora.adapter import load_peft

                originals[name] = load_peft(source)
        for name, adapter in new.items():
            shared = shared.project(name, adapter)
        everything = {**originals, **new}
        metrics = _metrics(shared, {n: everything[n] for n in shared.names if n in everything}, config,
                           {m.name: {"rank": m.rank, "span": m.rank} for m in shared.modules.values()})
        if len(originals) == len(shared.names) - len(new):   # every original at hand: fit again, to compare
            refit, _ = compress_many(everything, replace(config, core_rank=None))
            metrics["projected_vs_refit"] = {n: {"projected": shared.error(n), "refit": refit.error(n)} for n in new}
            extra.append("Projected onto the existing bases against fitting all again: " + "; ".join(
                f"{n}: error {v['projected']:.3f} against {v['refit']:.3f}"
                for n, v in metrics["projected_vs_refit"].items()) + ".")
        else:
            extra.append("The set's original adapters are not at hand (their folders moved), so the loss against "
                         "fitting again is not measured.")
        over = [n for n in new if shared.worst_module_error(n) > budget]
        if over:
            extra.append(f"Over the budget {budget:g} on the existing bases: {', '.join(over)}; fit the set again "
                         "to hold it.")
    shared.save(out, config, report={k: v for k, v in metrics.items()}, force=force)
    return {**metrics, "markdown": _markdown(shared, metrics, extra)}
