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

That is 8 tensor passes per element against fused AdamW's 7.

The library is plain C99 (no torch headers), compiled once with the system C compiler in about
a second and cached under ``$XDG_CACHE_HOME/coupled_ds`` (default ``~/.cache/coupled_ds``) keyed
by a hash of the source, and called through ctypes (one call per phase per piece, GIL released).
Inside a call, chunks of rows are handed out dynamically to ``torch.get_num_threads()`` threads:
OpenMP when the compiler has it (linked as ``libgomp.so.1``, the soname torch's own runtime is
loaded under, so the regions run on torch's thread pool), else pthreads. Per-chunk column sums
are added in chunk order, so results do not depend on the thread schedule. Where no compiler
works, :func:`library` returns None and :mod:`coupled_ds.kernels` uses its row-chunked torch
form instead (same math, slower); the reason is kept in :func:`unavailable_reason` and logged
once. Set ``COUPLED_DS_NATIVE=0`` to disable the library (read once, at first use).

Supported: float32 and bfloat16 contiguous CPU tensors (bf16 is computed in float32 and rounded
to nearest-even once per stored value, so it is slightly more accurate than torch's per-op
rounding). Everything else goes to the torch form.
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

__all__ = ["library", "phase1_rows_", "phase2_rows_", "simd_level", "supports",
           "unavailable_reason"]

_SOURCE = r"""
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) && defined(__GNUC__) && !defined(COUPLED_NO_CLONES)
#define VEC __attribute__((target_clones("avx2", "default")))
#else
#define VEC
#endif

static inline float bf16_load(uint16_t x) {
  uint32_t u = (uint32_t)x << 16; float f; memcpy(&f, &u, 4); return f;
}
static inline uint16_t bf16_store(float f) {
  uint32_t u; memcpy(&u, &f, 4);
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu)) return (uint16_t)((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

/* Phase 1 on `rows` rows of width H: m <- lerp(m, g, 1-beta1) (or beta1 m - (1-beta1) g when
   maximizing), v <- beta2 v + (1-beta2) g^2, in one loop per row. The first `rows_acc` rows
   add the new v into acc[H] (float64); with v == NULL (compact state) they add g^2 instead and
   v is not kept. Sums go through scratch[H] (float32) over blocks of 32 rows: cheaper than
   float64 per element, and still exact to float32 rounding over 32 terms. */
#define M_NEW(mj, gj) (maximize ? beta1 * (mj) - w1 * (gj) : (mj) + w1 * ((gj) - (mj)))
#define PHASE1(NAME, T, LOAD, STORE)                                                          \
VEC void NAME(T *m, T *v, const T *g, long rows, long H, long rows_acc, float beta1,          \
              float beta2, int maximize, double *acc, float *scratch) {                       \
  const float w1 = 1.0f - beta1, w2 = 1.0f - beta2;                                           \
  float *restrict s = scratch;                                                                \
  for (long i0 = 0; i0 < rows; i0 += 32) {                                                    \
    const long i1 = i0 + 32 < rows ? i0 + 32 : rows;                                          \
    for (long j = 0; j < H; ++j) s[j] = 0.0f;                                                 \
    for (long i = i0; i < i1; ++i) {                                                          \
      T *restrict mi = m + i * H; const T *restrict gi = g + i * H;                           \
      T *restrict vi = v ? v + i * H : 0;                                                     \
      if (vi && i < rows_acc) { for (long j = 0; j < H; ++j) {                                \
          float gj = LOAD(gi[j]), mj = LOAD(mi[j]); mi[j] = STORE(M_NEW(mj, gj));             \
          T vj = STORE(beta2 * LOAD(vi[j]) + w2 * (gj * gj)); vi[j] = vj; s[j] += LOAD(vj); } } \
      else if (vi) { for (long j = 0; j < H; ++j) {                                           \
          float gj = LOAD(gi[j]), mj = LOAD(mi[j]); mi[j] = STORE(M_NEW(mj, gj));             \
          vi[j] = STORE(beta2 * LOAD(vi[j]) + w2 * (gj * gj)); } }                            \
      else if (i < rows_acc) { for (long j = 0; j < H; ++j) {                                 \
          float gj = LOAD(gi[j]), mj = LOAD(mi[j]); mi[j] = STORE(M_NEW(mj, gj));             \
          s[j] += gj * gj; } }                                                                \
      else { for (long j = 0; j < H; ++j) {                                                   \
          float gj = LOAD(gi[j]), mj = LOAD(mi[j]); mi[j] = STORE(M_NEW(mj, gj)); } }         \
    }                                                                                         \
    if (i0 < rows_acc) { double *restrict a = acc; for (long j = 0; j < H; ++j) a[j] += s[j]; } \
  }                                                                                           \
}

/* Phase 2 on `rows` rows of width H: p <- p * decay + (-step_size) * (m / denom[col]), the
   operation order of torch's p.mul_(decay).addcdiv_(m, denom, value=-step_size). The two halves
   of the rows are walked side by side: four memory streams per thread instead of two measured
   ~9% faster on a memory-bound core. */
#define P_NEW(LOAD, STORE, pj, mj, dj) STORE(LOAD(pj) * decay + (-step_size) * (LOAD(mj) / (dj)))
#define PHASE2(NAME, T, LOAD, STORE)                                                          \
VEC void NAME(T *p, const T *m, const float *denom, long rows, long H, float step_size,       \
              float decay) {                                                                  \
  const long half = rows / 2;                                                                 \
  const float *restrict d = denom;                                                            \
  for (long i = 0; i < half; ++i) {                                                           \
    T *restrict pa = p + i * H; const T *restrict ma = m + i * H;                             \
    T *restrict pb = p + (i + half) * H; const T *restrict mb = m + (i + half) * H;           \
    for (long j = 0; j < H; ++j) {                                                            \
      pa[j] = P_NEW(LOAD, STORE, pa[j], ma[j], d[j]);                                        \
      pb[j] = P_NEW(LOAD, STORE, pb[j], mb[j], d[j]); }                                       \
  }                                                                                           \
  for (long i = 2 * half; i < rows; ++i) {                                                    \
    T *restrict pi = p + i * H; const T *restrict mi = m + i * H;                             \
    for (long j = 0; j < H; ++j) pi[j] = P_NEW(LOAD, STORE, pi[j], mi[j], d[j]);            \
  }                                                                                           \
}

#define ID(x) (x)
PHASE1(coupled_phase1_f32, float, ID, ID)
PHASE2(coupled_phase2_f32, float, ID, ID)
PHASE1(coupled_phase1_bf16, uint16_t, bf16_load, bf16_store)
PHASE2(coupled_phase2_bf16, uint16_t, bf16_load, bf16_store)

/* Threads: chunks of `chunk_rows` rows are taken from an atomic counter by the calling thread
   and threads-1 pthreads, so a thread the OS schedules late just does fewer chunks. Phase 1
   writes each chunk's column sums to its own row of acc[n_chunks, H]: the caller adds them in
   order, so results do not depend on the schedule. If pthread_create fails, the calling thread
   does all chunks. */
typedef struct job {
  void (*chunk)(const struct job *, long);
  long n_chunks, chunk_rows, rows, H, rows_acc, next;
  void *p, *m, *v; const void *g; const float *denom;
  float beta1, beta2, step_size, decay; int maximize;
  double *acc; float *scratch;
} job_t;

static void *job_worker(void *arg) {
  job_t *job = (job_t *)arg;
  for (;;) {
    long i = __atomic_fetch_add(&job->next, 1, __ATOMIC_RELAXED);
    if (i >= job->n_chunks) return 0;
    job->chunk(job, i);
  }
}

#ifdef _OPENMP
/* Built with -fopenmp: libgomp.so.1 is the soname torch's own OpenMP runtime is loaded under,
   so these regions run on torch's thread pool. Its workers spin for a few ms after every torch
   op; separate pthreads would have to fight them for the cores (measured 1.9x slower than one
   thread when stepped right after torch's fused AdamW on 2 cores). */
int coupled_uses_openmp(void) { return 1; }
static void run_job(job_t *job, int threads) {
  job->n_chunks = (job->rows + job->chunk_rows - 1) / job->chunk_rows;
  if (threads > job->n_chunks) threads = (int)job->n_chunks;
  if (threads > 1) {
    #pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (long i = 0; i < job->n_chunks; ++i) job->chunk(job, i);
  } else {
    for (long i = 0; i < job->n_chunks; ++i) job->chunk(job, i);
  }
}
#else
int coupled_uses_openmp(void) { return 0; }
static void run_job(job_t *job, int threads) {
  pthread_t tid[64]; int started = 0;
  job->n_chunks = (job->rows + job->chunk_rows - 1) / job->chunk_rows;
  if (threads > 64) threads = 64;
  if (threads > job->n_chunks) threads = (int)job->n_chunks;
  for (int t = 1; t < threads; ++t)
    if (pthread_create(&tid[started], 0, job_worker, job) == 0) ++started;
  job_worker(job);
  for (int t = 0; t < started; ++t) pthread_join(tid[t], 0);
}
#endif

#define DRIVERS(SUFFIX, T)                                                                    \
static void chunk1_##SUFFIX(const job_t *j, long i) {                                         \
  long r0 = i * j->chunk_rows, n = j->rows - r0 < j->chunk_rows ? j->rows - r0 : j->chunk_rows;\
  long counted = j->rows_acc - r0; counted = counted < 0 ? 0 : (counted > n ? n : counted);   \
  coupled_phase1_##SUFFIX((T *)j->m + r0 * j->H, j->v ? (T *)j->v + r0 * j->H : 0,            \
                          (const T *)j->g + r0 * j->H, n, j->H, counted, j->beta1, j->beta2,  \
                          j->maximize, j->acc + i * j->H, j->scratch + i * j->H);             \
}                                                                                             \
static void chunk2_##SUFFIX(const job_t *j, long i) {                                         \
  long r0 = i * j->chunk_rows, n = j->rows - r0 < j->chunk_rows ? j->rows - r0 : j->chunk_rows;\
  coupled_phase2_##SUFFIX((T *)j->p + r0 * j->H, (const T *)j->m + r0 * j->H, j->denom, n,    \
                          j->H, j->step_size, j->decay);                                      \
}                                                                                             \
void coupled_phase1_##SUFFIX##_mt(T *m, T *v, const T *g, long rows, long H, long rows_acc,   \
                                  float beta1, float beta2, int maximize, double *acc,        \
                                  float *scratch, long chunk_rows, int threads) {             \
  job_t job; memset(&job, 0, sizeof job);                                                     \
  job.chunk = chunk1_##SUFFIX; job.m = m; job.v = v; job.g = g; job.rows = rows; job.H = H;   \
  job.rows_acc = rows_acc; job.beta1 = beta1; job.beta2 = beta2; job.maximize = maximize;     \
  job.acc = acc; job.scratch = scratch; job.chunk_rows = chunk_rows;                          \
  run_job(&job, threads);                                                                     \
}                                                                                             \
void coupled_phase2_##SUFFIX##_mt(T *p, const T *m, const float *denom, long rows, long H,    \
                                  float step_size, float decay, long chunk_rows, int threads) {\
  job_t job; memset(&job, 0, sizeof job);                                                     \
  job.chunk = chunk2_##SUFFIX; job.p = p; job.m = (void *)m; job.denom = denom;               \
  job.rows = rows; job.H = H; job.step_size = step_size; job.decay = decay;                   \
  job.chunk_rows = chunk_rows;                                                                \
  run_job(&job, threads);                                                                     \
}

DRIVERS(f32, float)
DRIVERS(bf16, uint16_t)

/* The instruction set the clones above run with on this CPU (what the ifunc resolver picks). */
const char *coupled_simd_level(void) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(COUPLED_NO_CLONES)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") ? "avx2" : "default (SSE2)";
#else
  return "default (compiler's baseline)";
#endif
}
"""

_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}
# Rows per unit of work handed to a thread: about 1 MiB of fp32 per tensor. Small enough that a
# thread scheduled late costs at most one chunk, large enough that a chunk's counter increment
# and call are noise (a 38M-element embedding is ~150 chunks).
_CHUNK_ELEMENTS = 1 << 18

_lock = threading.Lock()
_state: dict[str, object] = {}


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "coupled_ds"


def _compile(target: Path, *, openmp: bool = True) -> None:
    """Compile the source to ``target`` atomically (ranks may build at the same time)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "coupled_kernels.c"
        src.write_text(_SOURCE)
        out = Path(tmp) / target.name
        errors = []
        # -fopenmp shares torch's OpenMP thread pool (else pthreads); target_clones needs ifunc
        # support (glibc); -z defs (GNU ld) turns an undefined symbol into a build error
        # instead of a load error. Retry without each.
        attempts = [["-Wl,-z,defs"], ["-DCOUPLED_NO_CLONES", "-Wl,-z,defs"],
                    ["-DCOUPLED_NO_CLONES"]]
        for extra in ([["-fopenmp", "-Wl,-z,defs"]] if openmp else []) + attempts:
            cmd = [cc, "-O3", "-std=c99", "-pthread", "-shared", "-fPIC", *extra, str(src), "-o",
                   str(out)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if proc.returncode == 0:
                os.replace(out, target)
                return
            errors.append(proc.stderr.strip()[-400:])
        raise RuntimeError(f"{cc} failed: {' | '.join(errors)}")


def _load() -> ctypes.CDLL:
    digest = hashlib.sha256(_SOURCE.encode()).hexdigest()[:16]
    target = _cache_dir() / f"coupled_kernels-{digest}.so"
    if not target.exists():
        _compile(target)
    return _open(target)


def _open(path: Path) -> ctypes.CDLL:
    """Load a built library and declare its C signatures."""
    lib = ctypes.CDLL(str(path))
    ptr, long_, f32 = ctypes.c_void_p, ctypes.c_long, ctypes.c_float
    int_ = ctypes.c_int
    lib.coupled_uses_openmp.restype = int_
    lib.coupled_uses_openmp.argtypes = []
    lib.coupled_simd_level.restype = ctypes.c_char_p
    lib.coupled_simd_level.argtypes = []
    for suffix in _SUFFIX.values():
        fn = getattr(lib, f"coupled_phase1_{suffix}_mt")
        fn.restype = None
        fn.argtypes = [ptr, ptr, ptr, long_, long_, long_, f32, f32, int_, ptr, ptr, long_, int_]
        fn = getattr(lib, f"coupled_phase2_{suffix}_mt")
        fn.restype = None
        fn.argtypes = [ptr, ptr, ptr, long_, long_, f32, f32, long_, int_]
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled library, built on first call; None if it cannot be built (see reason)."""
    with _lock:
        if "lib" not in _state:
            if os.environ.get("COUPLED_DS_NATIVE", "1") == "0":
                _state["lib"], _state["reason"] = None, "disabled by COUPLED_DS_NATIVE=0"
            else:
                try:
                    _state["lib"], _state["reason"] = _load(), None
                except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                    _state["lib"], _state["reason"] = None, str(exc)
                    logger.info("coupled_ds: C kernels unavailable (%s); using the row-chunked "
                                "torch kernels instead (same math, slower).", exc)
        return _state["lib"]  # type: ignore[return-value]


def unavailable_reason() -> str | None:
    """Why :func:`library` returned None (None when it is available or not yet tried)."""
    return _state.get("reason")  # type: ignore[return-value]


def simd_level() -> str | None:
    """The instruction set the C kernels dispatched to on this CPU (None: no library)."""
    lib = library()
    return None if lib is None else lib.coupled_simd_level().decode()


def supports(*tensors: torch.Tensor | None) -> bool:
    """Whether the C kernels can take these tensors (CPU, one dtype of float32/bf16, contiguous)."""
    present = [t for t in tensors if t is not None]
    dtype = present[0].dtype
    return (dtype in _SUFFIX and all(t.device.type == "cpu" and t.dtype == dtype
                                     and t.is_contiguous() for t in present)
            and library() is not None)


def _chunk_rows(H: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(H, 1))


def phase1_rows_(acc_H: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor | None,
                 grad: torch.Tensor, *, rows: int, H: int, rows_acc: int, beta1: float,
                 beta2: float, maximize: bool) -> None:
    """Phase 1 on ``rows`` rows of width ``H`` held as contiguous 1-D runs [rows * H].

    Updates ``exp_avg`` and ``exp_avg_sq`` (None: compact state) in place, and adds the new v
    (or g^2 when ``exp_avg_sq`` is None) of the first ``rows_acc`` rows to ``acc_H``, a float64
    [H] tensor (a partial row is one row of width ``H`` = its length, with ``acc_H`` the matching
    slice). Runs on ``torch.get_num_threads()`` threads inside one C call (the GIL is released
    once; no Python runs in the workers).
    """
    fn = getattr(library(), f"coupled_phase1_{_SUFFIX[grad.dtype]}_mt")
    chunk_rows = _chunk_rows(H)
    n_chunks = max(1, -(-rows // chunk_rows))
    accs = torch.zeros(n_chunks, H, dtype=torch.float64)
    scratch = torch.empty(n_chunks, H, dtype=torch.float32)
    fn(exp_avg.data_ptr(), None if exp_avg_sq is None else exp_avg_sq.data_ptr(),
       grad.data_ptr(), rows, H, rows_acc, beta1, beta2, int(maximize), accs.data_ptr(),
       scratch.data_ptr(), chunk_rows, torch.get_num_threads())
    acc_H += accs.sum(0) if n_chunks > 1 else accs[0]


def phase2_rows_(param: torch.Tensor, exp_avg: torch.Tensor, denom_H: torch.Tensor, *,
                 rows: int, H: int, step_size: float, decay: float) -> None:
    """Phase 2 on ``rows`` rows of width ``H``: p <- p * decay - step_size * m / denom_H[col].

    ``denom_H`` is a contiguous float32 [H] tensor.
    """
    fn = getattr(library(), f"coupled_phase2_{_SUFFIX[param.dtype]}_mt")
    fn(param.data_ptr(), exp_avg.data_ptr(), denom_H.data_ptr(), rows, H, step_size, decay,
       _chunk_rows(H), torch.get_num_threads())
