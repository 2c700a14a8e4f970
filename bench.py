"""Ours vs the Hugging Face reference, side by side in one run on this machine, as ratios.

    python bench.py                      # small defaults: a few minutes on a 2-core CPU
    python bench.py --full               # the 124M config
    python bench.py --sections=prepare   # any of: prepare,train,generate

Absolute numbers on shared machines are noise; the ratio between two runs made back to back on
the same machine is the number to read. Results are printed as a table and written as JSON.
"""

import json
import platform
from dataclasses import asdict, dataclass

import torch

import configurator


@dataclass
class BenchConfig:
    sections: str = "prepare,train,generate"
    full: bool = False  # the 124M config (slow on CPU) instead of small defaults
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    json_path: str = "bench.json"


def machine_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


# Each section returns rows: {"what", "unit", "ours", "reference", ...extra}; higher is better.
SECTIONS = {}


def main(argv):
    cfg = configurator.parse_config(BenchConfig, argv)
    names = cfg.sections.split(",")
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown section(s) {unknown}; choose from {','.join(SECTIONS)}")
    rows = []
    print(f"machine: {machine_name(cfg.device)}; torch {torch.__version__}")
    print(f"{'what':<48} {'unit':<10} {'ours':>12} {'reference':>12} {'ratio':>7}")
    for name in names:
        for row in SECTIONS[name](cfg):
            row["ratio"] = row["ours"] / row["reference"]
            rows.append(row)
            print(f"{row['what']:<48} {row['unit']:<10} {row['ours']:>12.1f} {row['reference']:>12.1f} {row['ratio']:>6.2f}x")
    with open(cfg.json_path, "w") as f:
        json.dump({"machine": machine_name(cfg.device), "config": asdict(cfg), "rows": rows}, f, indent=2)
    print(f"wrote {cfg.json_path}")


if __name__ == "__main__":
    configurator.run(main)
