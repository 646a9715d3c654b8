"""The linear-attention shapes (name, B, N, H, D) that benchmarks/bench_linear_attention.py times
and scripts/la_perf_model.py predicts: attn1 layers of SD-1.5 (8 heads, D = 40 / 80 / 160),
SD-2.1 and SD-XL (D = 64), and issue 14's large-N shapes, whose floors are hundreds of us."""

GPU_SHAPES = [
    ("sd15-L0-1024px", 2, 16384, 8, 40),
    ("sd15-L0-2048px", 2, 65536, 8, 40),
    ("sd15-L0-4096px", 2, 262144, 8, 40),
    ("sd15-L1-2048px", 2, 16384, 8, 80),
    ("sd15-L2-4096px", 2, 16384, 8, 160),
    ("sd21-L0-2048px", 2, 65536, 5, 64),
    ("sdxl-L1-2048px", 2, 16384, 10, 64),
    ("sdxl-L2-4096px", 2, 16384, 20, 64),
    ("large-N256K", 1, 262144, 10, 64),
    ("large-N2M", 1, 2097152, 10, 64),
]

# Scaled down for a CPU run, plus the CPU target shape of the foundation issue.
CPU_SHAPES = [
    ("cpu-target", 2, 16384, 5, 64),  # CPU target: >= 3x forward, >= 2x backward vs eager
    ("sd15-L0-512px", 1, 4096, 8, 40),
    ("sd21-L0-512px", 1, 4096, 5, 64),
    ("sdxl-L1-1024px", 1, 4096, 10, 64),
    ("sd15-L2-1024px", 1, 1024, 8, 160),
]
