"""fp32 GEMM rate at a base encoder's linear shapes: MKL (``F.linear``) against oneDNN's prepacked linear.

The FLOP bound of ``scripts/bench.py`` takes the rate of a 2048^3 GEMM; this shows what the two
libraries reach at the shapes an encoder runs (rows = tokens of a batch, 768 -> 2304 q/k/v, 768 -> 768
attention output, 768 -> 3072 and 3072 -> 768 FFN), best of 7 interleaved repetitions each.

    python scripts/gemm_shapes.py
"""

import argparse
import time

import torch
import torch.nn.functional as F

SHAPES = [(1024, 768, 2304), (1024, 768, 768), (1024, 768, 3072), (1024, 3072, 768), (256, 768, 3072),
          (4096, 768, 3072), (2048, 2048, 2048)]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=7, help="interleaved repetitions; the best of them is shown")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}")
    for m, k, n in SHAPES:
        x, w, b = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
        packed = torch.ops.mkldnn._reorder_linear_weight(w)
        fns = {"mkl": lambda x=x, w=w, b=b: F.linear(x, w, b),
               "onednn": lambda x=x, p=packed, b=b: torch.ops.mkldnn._linear_pointwise(x, p, b, "none", [], "")}
        best = dict.fromkeys(fns, float("inf"))
        for f in fns.values():
            f()
        for _ in range(args.repeats):
            for name, f in fns.items():
                start = time.perf_counter()
                for _ in range(5):
                    f()
                best[name] = min(best[name], (time.perf_counter() - start) / 5)
        rates = {name: 2 * m * k * n / s / 1e9 for name, s in best.items()}
        print(f"{m} x {k} -> {n}: MKL {rates['mkl']:.0f} GFLOP/s, oneDNN {rates['onednn']:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
