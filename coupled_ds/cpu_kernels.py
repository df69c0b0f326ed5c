"""The CPU fast path: the two phases of the coupled step as one pass each, in a tiny C library.

Why C: the step is memory-bound. torch ops on whole tensors read and write each tensor once per
op (lerp, mul, addcmul, sum, mul, addcdiv: v crosses memory four times); row-chunked torch ops
keep the chunk in cache but pay Python overhead per chunk, and torch.compile's CPU code for the
column sum walks memory with a stride (measured 3.6x slower than fused AdamW). A short C loop
per phase moves each tensor across memory exactly once per phase:

* phase 1 reads g, m, v and writes m, v, adding each new v (or g^2 in compact mode) to the
  column sums in the same loop, so v is summed while it is still in a register (float32 over
  blocks of 32 rows, then float64);
* phase 2 reads p, m and writes p, with the shared [H] denominator in cache.

That is 8 tensor passes per element against fused AdamW's 7 (compact state: 6).

What keeps the loops at the memory-bandwidth limit (measured with ``make bench``'s roofline
columns, bytes moved over time against a copy's bandwidth):

* both phases walk the two halves of a chunk's rows side by side: twice the memory streams
  (6 in phase 1, 4 in phase 2) keep more of the memory system busy than one row at a time; in
  phase 1 it also halves the traffic to the float32 column scratch;
* the row loop of phase 1 is specialised by constant flags (v kept or not, rows summed or not,
  one row or two) instead of testing them per element;
* one C call per phase per piece and no torch op around it: the per-chunk float64 sums are
  allocated, zeroed and added in order inside the call (each extra torch op on 2 threads is one
  more OpenMP region to wake and join);
* instruction-set variants of every kernel (AVX-512, AVX2+FMA, baseline x86-64), picked at run
  time by the CPU's features (:func:`simd_level`; ``COUPLED_DS_SIMD`` or :func:`set_simd_level`
  pick another). The library is built without ``-march``, so the cached build is the same on
  every x86-64 machine and moves between them safely. All variants do the same float32
  operations in the same order (ISO C: no FMA contraction), so they give bit-identical results;
* bf16 is loaded by a shift and stored with a branch-free round-to-nearest-even (torch's
  rounding; NaN stays NaN), which vectorizes.

The library is plain C99 (no torch headers), generated from the templates below, compiled
once with the system C compiler (a few seconds) and cached under ``$XDG_CACHE_HOME/coupled_ds``
(default ``~/.cache/coupled_ds``) keyed by a hash of the source, and called through ctypes (the
GIL is released for the call). Inside a call, chunks of rows are handed out dynamically to
``torch.get_num_threads()`` threads: OpenMP when the compiler has it (linked as
``libgomp.so.1``, the soname torch's own runtime is loaded under, so the regions run on torch's
thread pool), else pthreads. Per-chunk column sums are added in chunk order, so results do not
depend on the thread schedule. Where no compiler works, :func:`library` returns None and
:mod:`coupled_ds.kernels` uses its row-chunked torch form instead (same math, slower); the reason
is kept in :func:`unavailable_reason` and logged once. Set ``COUPLED_DS_NATIVE=0`` to disable
the library (read once, at first use).

Supported: float32 and bfloat16 contiguous CPU tensors (bf16 is computed in float32 and rounded
once per stored value, so it is slightly more accurate than torch's per-op rounding).
Everything else goes to the torch form.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

__all__ = ["SIMD_LEVELS", "library", "phase1_rows_", "phase2_rows_", "set_simd_level",
           "simd_level", "simd_levels", "supports", "unavailable_reason"]

_PRELUDE = r"""
#define _POSIX_C_SOURCE 200112L /* posix_memalign under -std=c99 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Instruction-set variants of every kernel, picked at run time (coupled_simd_select): the
   library is built without -march, so a cached build moves between machines safely. All
   variants do the same float32 operations in the same order (ISO C mode: no FMA contraction),
   so they give bit-identical results; only the vector width differs. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(COUPLED_NO_VARIANTS)
#define COUPLED_VARIANTS 3
#if defined(__clang__)
#define ATTR_avx512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))
#else
#define ATTR_avx512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,prefer-vector-width=512")))
#endif
#define ATTR_avx2 __attribute__((target("avx2,fma")))
#else
#define COUPLED_VARIANTS 1
#endif
#define ATTR_base

static inline float bf16_load(uint16_t x) {
  uint32_t u = (uint32_t)x << 16; float f; memcpy(&f, &u, 4); return f;
}
/* Round to nearest even (torch's rounding); NaN stays NaN (quiet). Branch-free: it vectorizes. */
static inline uint16_t bf16_store(float f) {
  uint32_t u; memcpy(&u, &f, 4);
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16, quiet = (u >> 16) | 0x40u;
  return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? quiet : rounded);
}
#define f32_load(x) (x)
#define f32_store(x) (x)

typedef void (*phase1_fn)(void *, void *, const void *, long, long, long, float, float, int,
                          double *, float *);
typedef void (*phase2_fn)(void *, const void *, const float *, long, long, float, float);
"""

# One variant per dtype and instruction set: @T@ (C type), @SFX@ (f32/bf16), @ISA@ (base/avx2/
# avx512). The row loop is written once and specialised by constant flags through a switch.
_VARIANT = r"""
/* ---------------------------------------------------------------- @SFX@, @ISA@ */
/* Phase 1 on one row (two = 0) or two rows a and b (two = 1) of width H: m <- lerp(m, sign g,
   1-beta1) (sign -1 when maximizing, as torch's AdamW negates the gradient), v <- beta2 v +
   (1-beta2) g^2 (has_v), and with sum the new v (or g^2 without v) added into s[H]. */
ATTR_@ISA@ static inline __attribute__((always_inline)) void
p1_rows_@SFX@_@ISA@(@T@ *restrict ma, @T@ *restrict va, const @T@ *restrict ga,
                    @T@ *restrict mb, @T@ *restrict vb, const @T@ *restrict gb, long H,
                    float *restrict s, float beta1, float beta2, float sign, const int has_v,
                    const int sum, const int two) {
  const float w1 = 1.0f - beta1, w2 = 1.0f - beta2;
  for (long j = 0; j < H; ++j) {
    float g0 = @T@_load(ga[j]), m0 = @T@_load(ma[j]), t;
    ma[j] = @T@_store(m0 + w1 * (sign * g0 - m0));
    if (has_v) { @T@ q = @T@_store(beta2 * @T@_load(va[j]) + w2 * (g0 * g0)); va[j] = q;
                 t = @T@_load(q); }
    else t = g0 * g0;
    if (two) {
      float g1 = @T@_load(gb[j]), m1 = @T@_load(mb[j]);
      mb[j] = @T@_store(m1 + w1 * (sign * g1 - m1));
      if (has_v) { @T@ q = @T@_store(beta2 * @T@_load(vb[j]) + w2 * (g1 * g1)); vb[j] = q;
                   t += @T@_load(q); }
      else t += g1 * g1;
    }
    if (sum) s[j] += t;
  }
}

/* Phase 1 on n rows, all summed (sum) or none: the two halves of the rows are walked side by
   side (six memory streams instead of three keep more of the memory system busy), and the
   float32 sums in s[H] go into acc[H] (float64) every 16 row pairs, so each float32 sum has at
   most 32 terms. */
ATTR_@ISA@ static void p1_span_@SFX@_@ISA@(@T@ *m, @T@ *v, const @T@ *g, long n, long H,
                                         int sum, float beta1, float beta2, int maximize,
                                         double *restrict acc, float *restrict s) {
  const long half = n / 2, steps = half + (n & 1);
  const int mode = (v != 0) * 2 + (sum != 0);
  const float sign = maximize ? -1.0f : 1.0f;
  for (long k0 = 0; k0 < steps; k0 += 16) {
    const long k1 = k0 + 16 < steps ? k0 + 16 : steps;
    if (sum) for (long j = 0; j < H; ++j) s[j] = 0.0f;
    for (long k = k0; k < k1; ++k) {
      const int two = k < half;
      const long a = two ? k : n - 1, b = two ? k + half : a;
      @T@ *ma = m + a * H, *mb = m + b * H, *va = v ? v + a * H : 0, *vb = v ? v + b * H : 0;
      const @T@ *ga = g + a * H, *gb = g + b * H;
      switch (mode * 2 + two) {
@CASES@
      }
    }
    if (sum) for (long j = 0; j < H; ++j) acc[j] += s[j];
  }
}

/* Phase 1 on `rows` rows: acc[H] gets the sums of the first `counted` rows (it is overwritten). */
ATTR_@ISA@ static void phase1_@SFX@_@ISA@(void *m_, void *v_, const void *g_, long rows, long H,
                                        long counted, float beta1, float beta2, int maximize,
                                        double *acc, float *s) {
  @T@ *m = m_, *v = v_; const @T@ *g = g_;
  for (long j = 0; j < H; ++j) acc[j] = 0.0;
  p1_span_@SFX@_@ISA@(m, v, g, counted, H, 1, beta1, beta2, maximize, acc, s);
  p1_span_@SFX@_@ISA@(m + counted * H, v ? v + counted * H : 0, g + counted * H,
                      rows - counted, H, 0, beta1, beta2, maximize, acc, s);
}

/* Phase 2 on `rows` rows: p <- p * decay + (-step_size) * (m / denom[col]), the operation
   order of torch's p.mul_(decay).addcdiv_(m, denom, value=-step_size); the two halves of the
   rows side by side (four memory streams). */
ATTR_@ISA@ static void phase2_@SFX@_@ISA@(void *p_, const void *m_, const float *denom,
                                        long rows, long H, float step_size, float decay) {
  @T@ *p = p_; const @T@ *m = m_;
  const float *restrict d = denom;
  const long half = rows / 2;
  for (long i = 0; i < half; ++i) {
    @T@ *restrict pa = p + i * H, *restrict pb = p + (i + half) * H;
    const @T@ *restrict ma = m + i * H, *restrict mb = m + (i + half) * H;
    for (long j = 0; j < H; ++j) {
      pa[j] = @T@_store(@T@_load(pa[j]) * decay + (-step_size) * (@T@_load(ma[j]) / d[j]));
      pb[j] = @T@_store(@T@_load(pb[j]) * decay + (-step_size) * (@T@_load(mb[j]) / d[j]));
    }
  }
  for (long i = 2 * half; i < rows; ++i) {
    @T@ *restrict pi = p + i * H; const @T@ *restrict mi = m + i * H;
    for (long j = 0; j < H; ++j)
      pi[j] = @T@_store(@T@_load(pi[j]) * decay + (-step_size) * (@T@_load(mi[j]) / d[j]));
  }
}
"""

_DRIVERS = r"""
/* ---------------------------------------------------------------- dispatch */
#if COUPLED_VARIANTS == 3
static const phase1_fn PHASE1[3][2] = {{phase1_f32_base, phase1_bf16_base},
                                       {phase1_f32_avx2, phase1_bf16_avx2},
                                       {phase1_f32_avx512, phase1_bf16_avx512}};
static const phase2_fn PHASE2[3][2] = {{phase2_f32_base, phase2_bf16_base},
                                       {phase2_f32_avx2, phase2_bf16_avx2},
                                       {phase2_f32_avx512, phase2_bf16_avx512}};
static const char *const LEVEL_NAMES[3] = {"baseline (x86-64)", "avx2", "avx512"};
static int best_level(void) {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
      && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
  return 0;
}
#else
static const phase1_fn PHASE1[1][2] = {{phase1_f32_base, phase1_bf16_base}};
static const phase2_fn PHASE2[1][2] = {{phase2_f32_base, phase2_bf16_base}};
static const char *const LEVEL_NAMES[1] = {"baseline (the compiler's default target)"};
static int best_level(void) { return 0; }
#endif
static int level = -1;

/* Use variant `want` (-1: the best this CPU supports). Returns the level now in use, or -1 if
   this CPU or build lacks it (the level in use does not change then). */
int coupled_simd_select(int want) {
  int best = best_level();
  if (want < 0) want = best;
  if (want > best) return -1;
  __atomic_store_n(&level, want, __ATOMIC_RELAXED);
  return want;
}
static int current_level(void) {
  int l = __atomic_load_n(&level, __ATOMIC_RELAXED);
  return l >= 0 ? l : coupled_simd_select(-1);
}
int coupled_simd_best(void) { return best_level(); }
const char *coupled_simd_name(int l) {
  return l >= 0 && l < COUPLED_VARIANTS ? LEVEL_NAMES[l] : "?";
}
int coupled_simd_current(void) { return current_level(); }

/* ---------------------------------------------------------------- threads */
/* Chunks of `chunk_rows` rows are handed out dynamically, so a thread the OS schedules late just
   does fewer chunks. Phase 1 writes each chunk's column sums to its own row of part[n_chunks, H];
   the caller adds them in chunk order, so results do not depend on the schedule. The rows of
   part and of the float32 scratch start on cache lines of their own (stride padded to 64 bytes):
   neighbouring chunks run on different threads at the same time, and a line shared by two rows
   would bounce between their cores at every row pair. */
typedef struct job {
  int phase; phase1_fn p1; phase2_fn p2; size_t elem;
  long n_chunks, chunk_rows, rows, H, rows_acc, next, part_stride, scratch_stride;
  void *p, *m, *v; const void *g; const float *denom;
  float beta1, beta2, step_size, decay; int maximize;
  double *part; float *scratch;
} job_t;

static void run_chunk(job_t *j, long i) {
  const long r0 = i * j->chunk_rows;
  const long n = j->rows - r0 < j->chunk_rows ? j->rows - r0 : j->chunk_rows;
  const size_t off = (size_t)r0 * (size_t)j->H * j->elem;
  if (j->phase == 1) {
    long counted = j->rows_acc - r0;
    counted = counted < 0 ? 0 : (counted > n ? n : counted);
    j->p1((char *)j->m + off, j->v ? (char *)j->v + off : 0, (const char *)j->g + off, n, j->H,
          counted, j->beta1, j->beta2, j->maximize, j->part + i * j->part_stride,
          j->scratch + i * j->scratch_stride);
  } else {
    j->p2((char *)j->p + off, (const char *)j->m + off, j->denom, n, j->H, j->step_size,
          j->decay);
  }
}

/* Phase 2 takes the chunks last to first: the rows phase 1 touched last may still be in the last
   level cache, so some of m can be read from there instead of memory (at most a few percent of
   the matrix on a 32 MiB L3; no measurable effect on a 2-vCPU VM whose L3 the host shares). */
static void *job_worker(void *arg) {
  job_t *job = (job_t *)arg;
  for (;;) {
    long i = __atomic_fetch_add(&job->next, 1, __ATOMIC_RELAXED);
    if (i >= job->n_chunks) return 0;
    run_chunk(job, job->phase == 2 ? job->n_chunks - 1 - i : i);
  }
}

#ifdef _OPENMP
/* Built with -fopenmp: libgomp.so.1 is the soname torch's own OpenMP runtime is loaded under,
   so these regions run on torch's thread pool. Its workers spin for a few ms after every torch
   op; separate pthreads would have to fight them for the cores (measured 1.9x slower than one
   thread when stepped right after torch's fused AdamW on 2 cores). */
int coupled_uses_openmp(void) { return 1; }
static void run_job(job_t *job, int threads) {
  if (threads > job->n_chunks) threads = (int)job->n_chunks;
  if (threads > 1) {
    #pragma omp parallel num_threads(threads)
    job_worker(job);
  } else {
    job_worker(job);
  }
}
#else
int coupled_uses_openmp(void) { return 0; }
static void run_job(job_t *job, int threads) {
  pthread_t tid[64]; int started = 0;
  if (threads > 64) threads = 64;
  if (threads > job->n_chunks) threads = (int)job->n_chunks;
  for (int t = 1; t < threads; ++t)
    if (pthread_create(&tid[started], 0, job_worker, job) == 0) ++started;
  job_worker(job);
  for (int t = 0; t < started; ++t) pthread_join(tid[t], 0);
}
#endif

/* dtype: 0 float32, 1 bfloat16. Phase 1 adds the column sums of its first `rows_acc` rows to
   acc[H]. Returns 0, or -1 if the per-chunk sums could not be allocated. */
int coupled_phase1(int dtype, void *m, void *v, const void *g, long rows, long H, long rows_acc,
                   float beta1, float beta2, int maximize, double *acc, long chunk_rows,
                   int threads) {
  job_t job; memset(&job, 0, sizeof job);
  if (rows <= 0) return 0;
  job.phase = 1; job.p1 = PHASE1[current_level()][dtype]; job.elem = dtype ? 2 : 4;
  job.m = m; job.v = v; job.g = g; job.rows = rows; job.H = H; job.rows_acc = rows_acc;
  job.beta1 = beta1; job.beta2 = beta2; job.maximize = maximize; job.chunk_rows = chunk_rows;
  job.n_chunks = (rows + chunk_rows - 1) / chunk_rows;
  job.part_stride = (H + 7) & ~7L;       /* 8 doubles = 64 bytes */
  job.scratch_stride = (H + 15) & ~15L;  /* 16 floats = 64 bytes */
  void *part = 0, *scratch = 0;
  if (posix_memalign(&part, 64, (size_t)job.n_chunks * (size_t)job.part_stride * sizeof(double))
      || posix_memalign(&scratch, 64,
                        (size_t)job.n_chunks * (size_t)job.scratch_stride * sizeof(float))) {
    free(part); free(scratch); return -1;
  }
  job.part = part; job.scratch = scratch;
  run_job(&job, threads);
  for (long i = 0; i < job.n_chunks && i * chunk_rows < rows_acc; ++i)
    for (long j = 0; j < H; ++j) acc[j] += job.part[i * job.part_stride + j];
  free(job.part); free(job.scratch);
  return 0;
}

void coupled_phase2(int dtype, void *p, const void *m, const float *denom, long rows, long H,
                    float step_size, float decay, long chunk_rows, int threads) {
  job_t job; memset(&job, 0, sizeof job);
  job.phase = 2; job.p2 = PHASE2[current_level()][dtype]; job.elem = dtype ? 2 : 4;
  job.p = p; job.m = (void *)m; job.denom = denom; job.rows = rows; job.H = H;
  job.step_size = step_size; job.decay = decay; job.chunk_rows = chunk_rows;
  job.n_chunks = (rows + chunk_rows - 1) / chunk_rows;
  run_job(&job, threads);
}
"""


def _phase1_cases() -> str:
    """The switch in p1_span that calls the row loop with constant flags (8 specialisations)."""
    out = []
    for mode in range(4):
        has_v, summed = mode >> 1 & 1, mode & 1
        for two in (0, 1):
            out.append(f"        case {mode * 2 + two}: p1_rows_@SFX@_@ISA@(ma, va, ga, mb, vb, "
                       f"gb, H, s, beta1, beta2, sign, {has_v}, {summed}, {two}); break;")
    return "\n".join(out)


def _generate_source() -> str:
    """The C source: every kernel for each dtype and instruction set, then dispatch and threads."""
    parts = [_PRELUDE]
    for isa in ("base", "avx2", "avx512"):
        if isa != "base":
            parts.append("#if COUPLED_VARIANTS == 3")
        for T, sfx in (("float", "f32"), ("uint16_t", "bf16")):
            text = _VARIANT.replace("@CASES@", _phase1_cases())
            text = text.replace("@T@_load", f"{sfx}_load").replace("@T@_store", f"{sfx}_store")
            parts.append(text.replace("@T@", T).replace("@SFX@", sfx).replace("@ISA@", isa))
        if isa != "base":
            parts.append("#endif")
    parts.append(_DRIVERS)
    return "\n".join(parts)


_SOURCE = _generate_source()
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1}  # the C side's dtype argument
# Instruction-set variants in the C source, by the index coupled_simd_select takes.
SIMD_LEVELS = ("baseline", "avx2", "avx512")
# Rows per unit of work handed to a thread: about 1 MiB of fp32 per tensor. Small enough that a
# thread scheduled late costs at most one chunk, large enough that a chunk's counter increment
# and call are noise (a 38M-element embedding is ~150 chunks).
_CHUNK_ELEMENTS = 1 << 18

# -O2 with the vectorizer and its full cost model: the loops vectorize as at -O3, and the build
# takes a quarter of -O3's time (which unswitches and versions the 8 specialised row loops of
# each variant once more). No -march: the instruction sets come from the variants' attributes.
_OPT_FLAGS = ("-O2", "-ftree-vectorize", "-fvect-cost-model=dynamic")

_lock = threading.Lock()
_state: dict[str, object] = {}


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "coupled_ds"


def _compile(target: Path, *, openmp: bool = True, variants: bool = True) -> None:
    """Compile the source to ``target`` atomically (ranks may build at the same time).

    ``openmp=False`` / ``variants=False`` build what a compiler without OpenMP / without x86
    target attributes gets (pthreads / only the baseline kernels), for the tests.
    """
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "coupled_kernels.c"
        src.write_text(_SOURCE)
        out = Path(tmp) / target.name
        errors = []
        # -fopenmp shares torch's OpenMP thread pool (else pthreads); the instruction-set
        # variants need GCC/clang target attributes on x86-64; -z defs (GNU ld) turns an
        # undefined symbol into a build error instead of a load error. Retry without each.
        attempts = [["-Wl,-z,defs"], ["-DCOUPLED_NO_VARIANTS", "-Wl,-z,defs"],
                    ["-DCOUPLED_NO_VARIANTS"]]
        if openmp:
            attempts.insert(0, ["-fopenmp", "-Wl,-z,defs"])
        if not variants:
            attempts = [a for a in attempts if "-DCOUPLED_NO_VARIANTS" in a]
        for extra in attempts:
            cmd = [cc, *_OPT_FLAGS, "-std=c99", "-pthread", "-shared", "-fPIC", *extra, str(src),
                   "-o", str(out)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if proc.returncode == 0:
                os.replace(out, target)
                return
            errors.append(proc.stderr.strip()[-400:])
        raise RuntimeError(f"{cc} failed: {' | '.join(errors)}")


def _load() -> ctypes.CDLL:
    # The key covers the source and the flags; neither depends on this CPU (no -march), so one
    # cached build serves every x86-64 machine that shares the cache directory.
    digest = hashlib.sha256((" ".join(_OPT_FLAGS) + _SOURCE).encode()).hexdigest()[:16]
    target = _cache_dir() / f"coupled_kernels-{digest}.so"
    if not target.exists():
        _compile(target)
    return _open(target)


def _open(path: Path) -> ctypes.CDLL:
    """Load a built library and declare its C signatures."""
    lib = ctypes.CDLL(str(path))
    ptr, long_, f32, int_ = ctypes.c_void_p, ctypes.c_long, ctypes.c_float, ctypes.c_int
    for name, restype, argtypes in [
        ("coupled_uses_openmp", int_, []),
        ("coupled_simd_select", int_, [int_]),
        ("coupled_simd_best", int_, []),
        ("coupled_simd_current", int_, []),
        ("coupled_simd_name", ctypes.c_char_p, [int_]),
        ("coupled_phase1", int_,
         [int_, ptr, ptr, ptr, long_, long_, long_, f32, f32, int_, ptr, long_, int_]),
        ("coupled_phase2", None, [int_, ptr, ptr, ptr, long_, long_, f32, f32, long_, int_]),
    ]:
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled library, built on first call; None if it cannot be built (see reason).

    ``COUPLED_DS_SIMD`` (read here, once) picks an instruction-set variant other than the best
    this CPU supports: one of :data:`SIMD_LEVELS`.
    """
    with _lock:
        if "lib" not in _state:
            if os.environ.get("COUPLED_DS_NATIVE", "1") == "0":
                _state["lib"], _state["reason"] = None, "disabled by COUPLED_DS_NATIVE=0"
            else:
                try:
                    lib = _load()
                except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                    _state["lib"], _state["reason"] = None, str(exc)
                    logger.info("coupled_ds: C kernels unavailable (%s); using the row-chunked "
                                "torch kernels instead (same math, slower).", exc)
                else:
                    wanted = os.environ.get("COUPLED_DS_SIMD")
                    if wanted:  # a bad value raises here, every time, before anything is kept
                        _select(lib, wanted, "COUPLED_DS_SIMD")
                    _state["lib"], _state["reason"] = lib, None
        return _state["lib"]  # type: ignore[return-value]


def _select(lib: ctypes.CDLL, level: str | None, what: str) -> str:
    if level is None:
        return SIMD_LEVELS[lib.coupled_simd_select(-1)]
    available = SIMD_LEVELS[: lib.coupled_simd_best() + 1]
    if level not in available:
        raise ValueError(f"{what}={level!r}: this CPU and build run the C kernels with "
                         f"{', '.join(available)}; pick one of those (or unset it for the best).")
    lib.coupled_simd_select(SIMD_LEVELS.index(level))
    return level


def unavailable_reason() -> str | None:
    """Why :func:`library` returned None (None when it is available or not yet tried)."""
    return _state.get("reason")  # type: ignore[return-value]


def simd_level() -> str | None:
    """The instruction-set variant the C kernels run with: one of :data:`SIMD_LEVELS` (the best
    this CPU supports unless chosen otherwise); None where the library is unavailable."""
    lib = library()
    return None if lib is None else SIMD_LEVELS[lib.coupled_simd_current()]


def simd_levels() -> tuple[str, ...]:
    """The variants this CPU and build can run (``("baseline",)`` off x86-64)."""
    lib = library()
    return () if lib is None else SIMD_LEVELS[: lib.coupled_simd_best() + 1]


def set_simd_level(level: str | None) -> str:
    """Run the C kernels with ``level`` from now on (None: the best this CPU supports), for
    benchmarks and tests. Every variant gives bit-identical results. Returns the level."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"C kernels unavailable: {unavailable_reason()}")
    return _select(lib, level, "set_simd_level")


def supports(*tensors: torch.Tensor | None) -> bool:
    """Whether the C kernels can take these tensors (CPU, one dtype of float32/bf16, contiguous)."""
    present = [t for t in tensors if t is not None]
    dtype = present[0].dtype
    return (dtype in _DTYPE_CODE and all(t.device.type == "cpu" and t.dtype == dtype
                                     and t.is_contiguous() for t in present)
            and library() is not None)


def _chunk_rows(H: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(H, 1))


def phase1_rows_(acc_H: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor | None,
                 grad: torch.Tensor, *, rows: int, H: int, rows_acc: int, beta1: float,
                 beta2: float, maximize: bool) -> None:
    """Phase 1 on ``rows`` rows of width ``H`` held as contiguous 1-D runs [rows * H].

    Updates ``exp_avg`` and ``exp_avg_sq`` (None: compact state) in place, and adds the new v
    (or g^2 when ``exp_avg_sq`` is None) of the first ``rows_acc`` rows to ``acc_H``, a
    contiguous float64 [H] tensor (a partial row is one row of width ``H`` = its length, with
    ``acc_H`` the matching slice). Runs on ``torch.get_num_threads()`` threads inside one C call
    (the GIL is released once; no Python runs in the workers, and no torch op runs around it).
    """
    failed = library().coupled_phase1(
        _DTYPE_CODE[grad.dtype], exp_avg.data_ptr(),
        None if exp_avg_sq is None else exp_avg_sq.data_ptr(), grad.data_ptr(), rows, H,
        rows_acc, beta1, beta2, int(maximize), acc_H.data_ptr(), _chunk_rows(H),
        torch.get_num_threads())
    if failed:
        raise MemoryError(f"coupled_ds C kernels: no memory for the per-chunk column sums "
                          f"({rows} rows of {H})")


def phase2_rows_(param: torch.Tensor, exp_avg: torch.Tensor, denom_H: torch.Tensor, *,
                 rows: int, H: int, step_size: float, decay: float) -> None:
    """Phase 2 on ``rows`` rows of width ``H``: p <- p * decay - step_size * m / denom_H[col].

    ``denom_H`` is a contiguous float32 [H] tensor.
    """
    library().coupled_phase2(_DTYPE_CODE[param.dtype], param.data_ptr(), exp_avg.data_ptr(),
                             denom_H.data_ptr(), rows, H, step_size, decay, _chunk_rows(H),
                             torch.get_num_threads())
