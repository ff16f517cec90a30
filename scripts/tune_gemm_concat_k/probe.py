"""Times gemm_concat_k configurations (tile, cluster, swizzle, raster) beside torch.mm on random bf16,
checking each result first. Run by run_probe.sh on the GPU machine:

    OUT=/tmp/out scripts/tune_gemm_concat_k/run_probe.sh

Pingpong-schedule variants (128x128, cluster 1x2) were tried and computed wrong results with
ConcatKMainloop (relative error ~0.97 at every shape); the cause was not investigated, so only the
cooperative schedule, which the tests check, is used. Results of the last run:
benchmarks/results/h100_tune_gemm_concat_k.txt.
"""
import ctypes, sys, torch, triton.testing as tt
lib = ctypes.CDLL(sys.argv[1])
C = ctypes
lib.probe_run.argtypes = [C.c_int] * 5 + [C.c_void_p] * 5 + [C.c_long] * 4 + [C.c_int] * 3 + [C.c_void_p, C.c_size_t]
NAMES = ["v0_128x256_c2x1_coop", "v1_128x256_c1x2_coop", "v2_256x128_c1x2_coop", "v4_128x128_c2x1_coop",
         "v5_128x256_c1x1_coop", "v0nn_128x256_c2x1_coop", "v2nn_256x128_c1x2_coop"]
NT, NN = [0, 1, 2, 3, 4], [5, 6]
sms = torch.cuda.get_device_properties(0).multi_processor_count
ws = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
shapes = [(4096, 4096, 4096), (4096, 11008, 4096), (4096, 4096, 11008), (4096, 8192, 8192), (16384, 4096, 4096),
          (8192, 8192, 8192), (512, 11008, 4096), (512, 4096, 11008), (1024, 4096, 4096), (2048, 11008, 4096)]
r = 16
for M, N, K in shapes:
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * K**-0.5
    wt = w.t().contiguous()
    u = torch.randn(M, r, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(N, r, device="cuda", dtype=torch.bfloat16)
    bt = b.t().contiguous()
    ref = (x.float() @ w.float().t() + u.float() @ b.float().t())
    t_nt = tt.do_bench(lambda: torch.mm(x, w.t()), warmup=25, rep=100)
    t_nn = tt.do_bench(lambda: torch.mm(x, wt), warmup=25, rep=100)
    print(f"== M={M} N={N} K={K}: torch nt {t_nt*1e3:.1f} us ({2*M*N*K/t_nt/1e9:.0f} TF/s), nn {t_nn*1e3:.1f} us", flush=True)
    best = {}
    for v in NT + NN:
        nt = v in NT
        for sw in (1, 2, 4, 8):
            for ra in (0, 1, 2):
                d = torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16)
                args = (v, M, N, K, r, ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p((w if nt else wt).data_ptr()),
                        ctypes.c_void_p(u.data_ptr()), ctypes.c_void_p((b if nt else bt).data_ptr()), ctypes.c_void_p(d.data_ptr()),
                        K, K if nt else N, r, r if nt else N, sw, ra, sms, ctypes.c_void_p(ws.data_ptr()), ctypes.c_size_t(ws.numel()))
                rc = lib.probe_run(*args)
                torch.cuda.synchronize()
                if rc != 0:
                    print(f"   {NAMES[v]} sw={sw} ra={ra}: rc {rc}"); continue
                err = ((d.float() - ref).norm() / ref.norm()).item()
                if not err < 1e-2:
                    print(f"   {NAMES[v]} sw={sw} ra={ra}: WRONG {err}"); continue
                t = tt.do_bench(lambda: lib.probe_run(*args), warmup=25, rep=100)
                base = t_nt if nt else t_nn
                best.setdefault(NAMES[v], []).append((t, sw, ra))
    for n, l in best.items():
        l.sort()
        base = t_nt if "nn" not in n else t_nn
        d0 = [e for e in l if e[1] == 1 and e[2] == 0][0][0]
        print(f"   {n:24s} best {l[0][0]*1e3:7.1f} us = {l[0][0]/base:.3f}x torch (sw={l[0][1]} raster={l[0][2]}); default {d0*1e3:7.1f} = {d0/base:.3f}x", flush=True)
