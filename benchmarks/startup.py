"""Start-up cost: one photo through the whole command against `python -c "import torch"`.

    python benchmarks/startup.py              # prints the table
    python benchmarks/startup.py --rounds 7   # more rounds (the fastest of each is kept)

Both commands run as fresh processes, interleaved round by round, so slow spells of a shared machine
hit both alike; the fastest round of each is the least disturbed one. The breakdown runs the same
steps in one process with a timer between them. bench.py calls :func:`startup_table`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT / "sample_images" / "chelsea.jpg"

BREAKDOWN = r"""
import sys, time, json
t0 = time.perf_counter(); marks = []
def mark(name): marks.append((name, time.perf_counter()))
import torch; mark("import torch")
import camcli.cli, camcli.pipeline; mark("import camcli (cli, pipeline and what they load)")
from camcli.models import load_model
lm = load_model(device=sys.argv[2]); mark("load the bundled model (weights, probe forward)")
from camcli.options import ExplainOptions
from camcli.session import Session
s = Session.open(ExplainOptions(quiet=True, device=sys.argv[2]), model=lm); mark("open the session (layers, engine checks)")
from camcli.pipeline import run_explain as explain
explain([sys.argv[1]], ExplainOptions(out=sys.argv[3], quiet=True, device=sys.argv[2]), model=lm); mark("explain one photo (decode, maps, PNG, summary)")
mods = sorted(m for m in ("timm", "torchvision", "torch._dynamo") if m in sys.modules)
prev = t0; out = []
for name, t in marks:
    out.append([name, t - prev]); prev = t
print(json.dumps({"steps": out, "loaded": mods}))
"""


def _run(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def measure(rounds: int, device: str = "cpu") -> dict[str, object]:
    """Fastest wall seconds of each command over ``rounds`` interleaved rounds, and the breakdown."""
    import json

    with tempfile.TemporaryDirectory(prefix="camcli-startup-") as tmp:
        torch_cmd = [sys.executable, "-c", "import torch"]
        cli_cmd = [sys.executable, "-m", "camcli", "explain", str(PHOTO), "--out", f"{tmp}/cli", "-q", "--device", device]
        _run(torch_cmd)  # warm the file cache once for both
        _run(cli_cmd)
        best_torch, best_cli = float("inf"), float("inf")
        for _ in range(rounds):
            best_torch = min(best_torch, _run(torch_cmd))
            best_cli = min(best_cli, _run(cli_cmd))
        steps: list[list[object]] = []
        loaded: list[str] = []
        for _ in range(max(1, rounds // 2)):
            out = subprocess.run([sys.executable, "-c", BREAKDOWN, str(PHOTO), device, f"{tmp}/api"], check=True,
                                 capture_output=True, text=True).stdout
            doc = json.loads(out.strip().splitlines()[-1])
            if not steps:
                steps, loaded = doc["steps"], doc["loaded"]
            else:  # keep each step's fastest time
                steps = [[a[0], min(a[1], b[1])] for a, b in zip(steps, doc["steps"])]
    return {"torch": best_torch, "cli": best_cli, "ratio": best_cli / best_torch, "steps": steps, "loaded": loaded}


def startup_table(rounds: int, device: str = "cpu") -> tuple[list[str], dict[str, float]]:
    m = measure(rounds, device)
    lines = [
        f"Fresh processes, {rounds} interleaved rounds, the fastest of each; device {device}.",
        "",
        "| | seconds | x `import torch` |",
        "|---|---|---|",
        f"| `python -c \"import torch\"` | {m['torch']:.2f} | 1.00 |",
        f"| `camcli explain chelsea.jpg` (whole command) | {m['cli']:.2f} | {m['ratio']:.2f} |",
        "",
        "Where the command's time goes (the same steps in one process, fastest of "
        f"{max(1, rounds // 2)}):",
        "",
        "| step | seconds |",
        "|---|---|",
        *[f"| {name} | {sec:.2f} |" for name, sec in m["steps"]],  # type: ignore[union-attr]
        "",
        "Heavy modules loaded by then: " + (", ".join(f"`{x}`" for x in m["loaded"]) or "none of timm, torchvision, "  # type: ignore[union-attr]
                                            "torch._dynamo") + ".",
    ]
    return lines, {"startup_ratio": float(m["ratio"])}  # type: ignore[arg-type]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    lines, _ = startup_table(args.rounds, args.device)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
