"""The readable table of a benchmark result (see runner.run_bench)."""

from __future__ import annotations

import statistics

_GB = 1e9
_PIECES = ("encoder_matmul", "selection", "decode", "backward", "optimizer")


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def _gb(n: int) -> str:
    return f"{n / _GB:.2f} GB"


def header(result: dict) -> list[str]:
    c, m = result["config"], result["machine"]
    v = m["versions"]
    shape = f"d_in {c['d_in']}, d_sae {c['d_sae']} ({c['expansion']}x), k {c['k']}, batch {c['batch']}"
    run = f"{c['dtype']}, mesh {c['mesh']} ({m.get('jax_devices')} device(s)), {c['seeds']} SAE(s)"
    where = f"{m['cpu']}, {m['cores']} cores, {m['ram_bytes'] / _GB:.0f} GB, load {m['load_average'][0]:.1f}"
    return [
        f"jaxsae bench: {shape}, {run}, {c['steps']} steps",
        f"machine: {where}; jax {v['jax']}, torch {v['torch']}; {m['date']}",
    ]


def ours_lines(r: dict) -> list[str]:
    if "skipped" in r:
        return [f"  ours: skipped: {r['skipped']}"]
    step, floor = r["step_s"], r["floor_s"]
    screen = ", bf16 screen" if r.get("screen") else ""
    lines = [
        f"  ours ({r.get('kernels')} kernels{screen})  {r['tokens_per_s']:>10,.0f} tokens/s   "
        f"step {_ms(step['median'])} ms (mean {_ms(step['mean'])})   floor {_ms(floor['median'])} ms   "
        f"floor ratio {r['floor_ratio']:.2f}",
    ]
    if "xla" in floor:
        lines.append(
            f"    floor = the faster matmul: XLA dot {_ms(floor['xla']['median'])} ms, "
            f"kernel (OpenBLAS on the CPU) {_ms(floor['kernel']['median'])} ms"
            + (f"; ratio from rounds of step ({_ms(floor['step_interleaved']['median'])} ms) and both matmuls"
               if "step_interleaved" in floor else "")
        )
    if b := r.get("breakdown_s"):
        parts = " | ".join(f"{p} {_ms(b.get(p))}" for p in _PIECES)
        lines.append(f"    breakdown ms: {parts}  (forward {_ms(b.get('forward'))})")
    mem = r["memory"]
    lines.append(
        f"    memory: training peak {_gb(mem['training_peak_bytes'])} vs bound {_gb(mem['bound_bytes'])} "
        f"(params + Adam + batch) = {mem['ratio']:.2f}x; process peak {_gb(mem['process_peak_bytes'])}"
    )
    if r["architecture"] in ("topk", "batchtopk"):
        lines.append(
            f"    aux-k: {r['dead_latents']} dead latents, dead fraction {r['dead_fraction']:.4f}, "
            f"aux loss {r['aux_loss']:.4g}"
        )
    return lines


def peer_lines(r: dict) -> list[str]:
    lines = []
    for name, p in r.get("peer_details", {}).items():
        if "skipped" in p:
            lines.append(f"  {name:<31} skipped: {p['skipped']}")
            continue
        speed = r["speedup"].get(name)
        vs = f"ours {speed:.2f}x" if speed else ""
        if rounds := p.get("rounds"):  # the speed-up is taken in the rounds, where ours ran alongside
            vs += f" (ours {_ms(statistics.median(rounds['ours_s']))} ms in these rounds)"
        aux = "aux-k on" if p.get("aux_active") else "aux-k off"
        note = r.get("peer_notes", {}).get(name, "")
        lines.append(
            f"  {name:<31} {p['tokens_per_s']:>10,.0f} tokens/s   step {_ms(p['step_s']['median'])} ms   "
            f"{vs}   ({aux}{'; ' + note if note else ''})"
        )
    return lines


def table(result: dict) -> str:
    lines = header(result)
    for arch, r in result["runs"].items():
        lines += ["", arch, *ours_lines(r), *peer_lines(r)]
    return "\n".join(lines)


def markdown_rows(result: dict) -> list[str]:
    """README table rows (see README "Throughput"): one per architecture of `result`."""
    c = result["config"]
    rows = []
    for arch, r in result["runs"].items():
        if "skipped" in r:
            continue
        peers = ", ".join(
            f"{n} {v:,.0f} ({r['speedup'][n]:.2f}x)" if v else f"{n} skipped" for n, v in r["peers"].items()
        )
        mem = r["memory"]
        rows.append(
            f"| {arch} | {c['expansion']}x ({c['d_sae']}) | {r['tokens_per_s']:,.0f} | "
            f"{r['floor_ratio']:.2f} | {mem['ratio']:.2f} | {peers} |"
        )
    return rows
