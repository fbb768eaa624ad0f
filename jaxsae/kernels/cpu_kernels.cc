// CPU kernels of jaxsae.kernels (semantics: reference.py), as XLA FFI custom calls.
//
// Threading: OpenMP with static partitions; no output element is written by two threads.
// Values are float32 and accumulate in float32. Sparse codes are chunked ELL:
//   row [C] int32 (non-decreasing), idx [C, K] int32 (-1 = empty slot), val [C, K] float32.

#include <omp.h>

#if defined(__SSE__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <string>
#include <utility>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include "xla/ffi/api/ffi.h"
#include "bf16_screen.h"

#include <cblas.h>  // scipy-openblas32: symbols prefixed scipy_

namespace ffi = xla::ffi;

namespace {

// Floats of d per pass of gather_sum / gather_dot (a tuning knob, jaxsae_set_tile). Tiles keep an [F, tile]
// slice of the gathered matrix in cache, but measured here (F 6144 and 24576, d 768) they lost to whole
// rows with software prefetch at every tile size: the default is one pass.
int64_t g_tile = 1 << 30;

// GCC vector extensions: eight lanes, lowered to AVX2 with -march=native (to SSE pairs without it).
typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));
typedef uint32_t u8 __attribute__((vector_size(32)));

template <typename V>
inline V LoadV(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// True if any lane of a comparison result (0 / -1 lanes) is set.
inline bool Any(i8 m) {
#if defined(__AVX__)
  return !_mm256_testz_si256((__m256i)m, (__m256i)m);
#else
  int r = 0;
  for (int q = 0; q < 8; ++q) r |= m[q];
  return r != 0;
#endif
}

inline f8 Load8(const float* p) { return LoadV<f8>(p); }

inline void Store8(float* p, f8 v) { std::memcpy(p, &v, sizeof(v)); }

inline f8 Splat(float v) {
  f8 r;
  for (int i = 0; i < 8; ++i) r[i] = v;
  return r;
}

inline float Sum8(f8 s) { return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])); }

// The gathered rows are read at random, so the hardware prefetcher only catches on within a row: each
// kernel prefetches the rows of the next group of four while it works on the current one.
inline void Prefetch4(const float* const* p, int64_t x) {
#ifdef JAXSAE_NO_PREFETCH
  return;
#endif
  __builtin_prefetch(p[0] + x);
  __builtin_prefetch(p[1] + x);
  __builtin_prefetch(p[2] + x);
  __builtin_prefetch(p[3] + x);
}

// o[0:n] += Σ_{j<4} v[j] · r[j][0:n] (one load and store of o per four rows); prefetches pf[0..3].
inline void Axpy4(float* __restrict o, const float* const* r, const float* v, const float* const* pf, int64_t n) {
  const f8 va = Splat(v[0]), vb = Splat(v[1]), vc = Splat(v[2]), ve = Splat(v[3]);
  int64_t x = 0;
  for (; x + 16 <= n; x += 16) {
    Prefetch4(pf, x);
    for (int h = 0; h < 16; h += 8) {
      const int64_t y = x + h;
      Store8(o + y, Load8(o + y) + ((va * Load8(r[0] + y) + vb * Load8(r[1] + y)) +
                                    (vc * Load8(r[2] + y) + ve * Load8(r[3] + y))));
    }
  }
  for (; x < n; ++x) o[x] += (v[0] * r[0][x] + v[1] * r[1][x]) + (v[2] * r[2][x] + v[3] * r[3][x]);
}

inline void Axpy1(float* __restrict o, const float* __restrict r, float v, int64_t n) {
#pragma omp simd
  for (int64_t x = 0; x < n; ++x) o[x] += v * r[x];
}

// out[j] += y[0:n] · r[j][0:n] for four rows (shared loads of y, eight accumulator chains).
inline void Dot4(const float* __restrict y, const float* const* r, const float* const* pf, int64_t n, float* out) {
  f8 s[8] = {};
  int64_t x = 0;
  for (; x + 16 <= n; x += 16) {
    Prefetch4(pf, x);
    const f8 y0 = Load8(y + x), y1 = Load8(y + x + 8);
    for (int j = 0; j < 4; ++j) {
      s[j] += y0 * Load8(r[j] + x);
      s[j + 4] += y1 * Load8(r[j] + x + 8);
    }
  }
  for (int j = 0; j < 4; ++j) {
    float t = Sum8(s[j] + s[j + 4]);
    for (int64_t z = x; z < n; ++z) t += y[z] * r[j][z];
    out[j] = t;
  }
}

inline float Dot1(const float* __restrict a, const float* __restrict b, int64_t n) {
  float t = 0.0f;
#pragma omp simd reduction(+ : t)
  for (int64_t x = 0; x < n; ++x) t += a[x] * b[x];
  return t;
}

// The rows of one array, or of two laid end to end (row r < split is a[r], else b[r − split]): the
// scatters read the codes' and aux-k's rows from two arrays without concatenating them.
struct RowSource {
  const float* a;
  const float* b = nullptr;
  int64_t split = INT64_MAX;
  const float* Row(int64_t r, int64_t d) const { return r < split ? a + r * d : b + (r - split) * d; }
};

// Row pointers rows[src[j]] + d0 of four consecutive list entries from j on, repeating the last one
// past the end of the list (prefetching it again is harmless).
inline void Rows4(const RowSource& rows, const int32_t* src, int64_t j, int64_t end, int64_t d, int64_t d0,
                  const float** out) {
  for (int q = 0; q < 4; ++q) {
    const int64_t jj = std::max<int64_t>(0, std::min(j + q, end - 1));
    out[q] = rows.Row(end > 0 ? src[jj] : 0, d) + d0;
  }
}

// out[seg] (+)= Σ over the entries of each segment of wt · rows[src] along [d0, d0 + dn), where
// segments are runs of entries [begin[s], begin[s + 1]) with output row out_row[s].
void AccumulateRows(const RowSource& rows, const int32_t* src, const float* wt, const int64_t* begin,
                    const int64_t* out_row, int64_t n_seg, float* out, int64_t d, int64_t d0, int64_t dn) {
  const int64_t end = n_seg ? begin[n_seg] : 0;
  const float *r[4], *pf[4];
  for (int64_t s = 0; s < n_seg; ++s) {
    float* o = out + out_row[s] * d + d0;
    int64_t j = begin[s];
    for (; j + 4 <= begin[s + 1]; j += 4) {
      Rows4(rows, src, j, end, d, d0, r);
      Rows4(rows, src, j + 4, end, d, d0, pf);
      Axpy4(o, r, wt + j, pf, dn);
    }
    for (; j < begin[s + 1]; ++j) Axpy1(o, rows.Row(src[j], d) + d0, wt[j], dn);
  }
}

// OpenMP workers do not inherit the caller's floating-point mode (XLA flushes denormals): set one mode in
// every thread so that results never depend on which thread handled an entry.
// Usage: `const FpMode fp;` before the parallel region, `FpScope scope(fp);` first thing inside it.
// Denormals-are-zero is cleared: comparisons follow IEEE (a denormal is > 0) whatever the caller's mode.
struct FpMode {
#if defined(__SSE__)
  unsigned int csr = _mm_getcsr() & ~0x0040u;
#endif
};
struct FpScope {
#if defined(__SSE__)
  unsigned int saved = _mm_getcsr();
  explicit FpScope(const FpMode& m) { _mm_setcsr(m.csr); }
  ~FpScope() { _mm_setcsr(saved); }
#else
  explicit FpScope(const FpMode&) {}
#endif
};

// [lo, hi) of an even static split of n items among the team.
inline void Split(int64_t n, int64_t& lo, int64_t& hi) {
  const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
  lo = n * t / nt;
  hi = n * (t + 1) / nt;
}

// Sparse codes whose slots are scattered: chunked ELL (row [C], idx [C, K], val [C, K]); `row_offset`
// is added to row to index the RowSource of y (several code sets read one, each its own rows).
struct Codes {
  const int32_t* row;
  const int32_t* idx;
  const float* val;
  int64_t C, K, row_offset;
};

// Calls fn(latent, row, value) for the valid slots [s0, s1) of `c` (row clamped into [0, B), as y[row],
// without the set's row_offset).
template <typename Fn>
void ForSlots(const Codes& c, int64_t s0, int64_t s1, int64_t B, int64_t F, Fn fn) {
  for (int64_t s = s0; s < s1; ++s) {
    const uint32_t i = (uint32_t)c.idx[s];  // negatives become huge: both kinds of invalid id are skipped
    if (i >= (uint64_t)F) continue;
    const int64_t r = c.row[s / c.K];
    fn(i, (int32_t)std::clamp<int64_t>(r < 0 ? r + B : r, 0, B - 1), c.val ? c.val[s] : 0.0f);
  }
}

// Slots per latent of one code set [F], counted in parallel.
std::vector<int32_t> LatentCounts(const Codes& c, int64_t B, int64_t F) {
  const int nt_max = omp_get_max_threads();
  std::vector<int32_t> priv((int64_t)nt_max * F), out(F);
#pragma omp parallel
  {
    int64_t s0, s1;
    Split(c.C * c.K, s0, s1);
    int32_t* cnt = priv.data() + (int64_t)omp_get_thread_num() * F;
    std::fill(cnt, cnt + F, 0);
    ForSlots(c, s0, s1, B, F, [&](uint32_t i, int32_t, float) { ++cnt[i]; });
#pragma omp barrier
    int64_t f0, f1;
    Split(F, f0, f1);
    for (int64_t f = f0; f < f1; ++f) {
      int32_t n = 0;
      for (int u = 0; u < omp_get_num_threads(); ++u) n += priv[(int64_t)u * F + f];
      out[f] = n;
    }
  }
  return out;
}

bool SerialBlas() {
  static const bool once = (scipy_openblas_set_num_threads(1), true);  // our OpenMP team splits the work
  return once;
}

// Latents of one code set in at least 1 / kDenseShare of the rows (aux-k's dead latents: in all of
// them). The kernels take their part by one GEMM, a pass over the dense operand for all of them,
// instead of a gather per slot (measured at F 6144, d 768, 61 dead latents: aux-k's part of
// scatter_adam 38 -> 4 ms, of gather_sum and gather_dot about 6.5 -> 2 ms each).
constexpr int64_t kDenseShare = 4;

struct DenseLatents {
  std::vector<int32_t> ids;   // ascending
  std::vector<int32_t> slot;  // [F]: position in ids, or -1
  bool has(uint32_t f) const { return f < slot.size() && slot[f] >= 0; }
};

DenseLatents FindDense(const Codes& c, int64_t rows, int64_t F) {
  DenseLatents dl{{}, std::vector<int32_t>(F, -1)};
  if (c.C * c.K * kDenseShare < rows) return dl;
  const std::vector<int32_t> counts = LatentCounts(c, rows, F);
  for (int64_t f = 0; f < F; ++f)
    if (counts[f] * kDenseShare >= rows) {
      dl.slot[f] = (int32_t)dl.ids.size();
      dl.ids.push_back((int32_t)f);
    }
  return dl;
}

// Row-major C [m, n] (+)= A [m, k] · op(B), op(B) = B [k, n] or (transposed) B [n, k]ᵀ, by OpenBLAS
// with the rows of C split over the team (lda, ldb: A's (default k) and B's row strides).
void ParallelGemm(const float* a, const float* b, float* c, int64_t m, int64_t n, int64_t k, int64_t ldb,
                  bool b_transposed, float beta, int64_t lda = -1) {
  lda = lda < 0 ? k : lda;
  SerialBlas();
  const FpMode fp;
#pragma omp parallel
  {
    FpScope scope(fp);
    int64_t r0, r1;
    Split(m, r0, r1);
    if (r1 > r0)
      scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, b_transposed ? CblasTrans : CblasNoTrans, (blasint)(r1 - r0),
                        (blasint)n, (blasint)k, 1.0f, a + r0 * lda, (blasint)lda, b, (blasint)ldb, beta, c + r0 * n,
                        (blasint)n);
  }
}

// The rows w[ids] [n, d], contiguous.
std::vector<float> GatherRowsOf(const float* w, const std::vector<int32_t>& ids, int64_t d) {
  std::vector<float> out(ids.size() * d);
  for (size_t j = 0; j < ids.size(); ++j) std::memcpy(out.data() + j * d, w + (int64_t)ids[j] * d, d * sizeof(float));
  return out;
}

// ---------------------------------------------------------------------------------------------
// gather_sum: out[r] = Σ val · w[idx] over the slots of row r. Threads own row ranges; as chunks are
// sorted by row, a row range is a chunk range found by binary search. Each thread lists its non-empty
// slots once (segments = output rows), then sweeps the list once per tile of d.
void GatherSum(const int32_t* row, const int32_t* idx, const float* val, const float* w, float* out,
               int64_t C, int64_t K, int64_t F, int64_t d, int64_t R) {
  const DenseLatents dl = FindDense(Codes{row, idx, val, C, K, 0}, R, F);
  const bool dense = !dl.ids.empty();
  if (dense) {  // out = V · w[dense], V [R, n_dense] the dense latents' values
    const int64_t n = (int64_t)dl.ids.size();
    std::vector<float> v(R * n, 0.0f);
    ForSlots(Codes{row, idx, val, C, K, 0}, 0, C * K, R, F,
             [&](uint32_t f, int32_t r, float x) { if (dl.has(f)) v[r * n + dl.slot[f]] += x; });
    const std::vector<float> wd = GatherRowsOf(w, dl.ids, d);
    ParallelGemm(v.data(), wd.data(), out, R, d, n, d, false, 0.0f);
  }
  const FpMode fp;
#pragma omp parallel
  {
    FpScope scope(fp);
    int64_t r0, r1;
    Split(R, r0, r1);
    const int64_t c0 = std::lower_bound(row, row + C, (int32_t)r0) - row;
    const int64_t c1 = std::lower_bound(row, row + C, (int32_t)r1) - row;
    if (!dense) std::fill(out + r0 * d, out + r1 * d, 0.0f);
    std::vector<int32_t> src;
    std::vector<float> wt;
    std::vector<int64_t> begin, out_row;
    src.reserve((c1 - c0) * K);
    wt.reserve((c1 - c0) * K);
    for (int64_t c = c0; c < c1; ++c) {
      if (c == c0 || row[c] != row[c - 1]) {
        begin.push_back((int64_t)src.size());
        out_row.push_back(row[c]);
      }
      for (int64_t j = 0; j < K; ++j) {
        const int32_t i = idx[c * K + j];
        if (i < 0 || dl.has((uint32_t)i)) continue;
        src.push_back(std::min<int32_t>(i, (int32_t)(F - 1)));  // jnp gathers clamp out-of-range ids
        wt.push_back(val[c * K + j]);
      }
    }
    begin.push_back((int64_t)src.size());
    for (int64_t d0 = 0; d0 < d; d0 += g_tile)
      AccumulateRows(RowSource{w}, src.data(), wt.data(), begin.data(), out_row.data(), (int64_t)out_row.size(), out, d,
                     d0, std::min(g_tile, d - d0));
  }
}

// gather_dot: out[c, j] = y[row[c]] · w[idx[c, j]]; threads own chunk ranges; four dots share y loads.
void GatherDot(const int32_t* row, const int32_t* idx, const float* y, const float* w, float* out,
               int64_t C, int64_t K, int64_t B, int64_t F, int64_t d) {
  const DenseLatents dl = FindDense(Codes{row, idx, nullptr, C, K, 0}, B, F);
  std::vector<float> yw;  // [B, n_dense] = y · w[dense]ᵀ, read at the dense latents' slots
  if (!dl.ids.empty()) {
    const std::vector<float> wd = GatherRowsOf(w, dl.ids, d);
    yw.resize(B * dl.ids.size());
    ParallelGemm(y, wd.data(), yw.data(), B, (int64_t)dl.ids.size(), d, d, true, 0.0f);
  }
  const FpMode fp;
#pragma omp parallel
  {
    FpScope scope(fp);
    int64_t c0, c1;
    Split(C, c0, c1);
    std::fill(out + c0 * K, out + c1 * K, 0.0f);
    std::vector<int32_t> src;  // non-empty slots: w row and output position, in order
    std::vector<int64_t> pos;
    const int64_t n_dense = (int64_t)dl.ids.size();
    for (int64_t s = c0 * K; s < c1 * K; ++s)
      if (dl.has((uint32_t)idx[s])) {
        const int64_t r = row[s / K];
        out[s] = yw[std::clamp<int64_t>(r < 0 ? r + B : r, 0, B - 1) * n_dense + dl.slot[idx[s]]];
      } else if (idx[s] >= 0) {
        src.push_back(std::min<int32_t>(idx[s], (int32_t)(F - 1)));
        pos.push_back(s);
      }
    const int64_t n = (int64_t)src.size();
    const float *r[4], *pf[4];
    float dots[4];
    for (int64_t d0 = 0; d0 < d; d0 += g_tile) {
      const int64_t dn = std::min(g_tile, d - d0);
      int64_t j = 0;
      while (j < n) {
        const int64_t c = pos[j] / K;
        int64_t rr = row[c];
        rr = std::clamp<int64_t>(rr < 0 ? rr + B : rr, 0, B - 1);  // jnp indexing: wrap negatives, clamp
        const float* yr = y + rr * d + d0;
        int64_t e = j;  // the entries of chunk c
        while (e < n && pos[e] / K == c) ++e;
        for (; j + 4 <= e; j += 4) {
          Rows4(RowSource{w}, src.data(), j, n, d, d0, r);
          Rows4(RowSource{w}, src.data(), j + 4, n, d, d0, pf);
          Dot4(yr, r, pf, dn, dots);
          for (int q = 0; q < 4; ++q) out[pos[j + q]] += dots[q];
        }
        for (; j < e; ++j) out[pos[j]] += Dot1(yr, w + src[j] * d + d0, dn);
      }
    }
  }
}

// out [d, n] = a [n, d] transposed, in 8 × 8 blocks.
void Transpose(const float* a, int64_t n, int64_t d, float* out) {
  for (int64_t j0 = 0; j0 < n; j0 += 8)
    for (int64_t x0 = 0; x0 < d; x0 += 8)
      for (int64_t j = j0; j < std::min(j0 + 8, n); ++j)
        for (int64_t x = x0; x < std::min(x0 + 8, d); ++x) out[x * n + j] = a[j * d + x];
}

// The sums Σ val · y[row] per latent of several code sets, in two parts: a set's dense latents (see
// DenseLatents) by a GEMM, V [n, B] · y[set rows] [B, d], into `dense`; the other slots grouped by
// latent (CSC): latent f's are [start[f], start[f + 1]) of (src_row, src_val), src_row indexing y with
// the set's row_offset added; built by a counting sort.
struct LatentSums {
  std::vector<int64_t> start;
  std::vector<int32_t> src_row;
  std::vector<float> src_val;
  std::vector<int32_t> dense_slot;  // [F]: row of `dense` holding the latent's GEMM part, or -1
  std::vector<float> dense;         // [n_dense, d]
};

constexpr int64_t kDenseBlock = 256;  // latents per GEMM
constexpr int64_t kDenseRows = 512;   // rows per GEMM: V holds kDenseBlock · kDenseRows floats (512 KB)

// dense[slot[f]] += Σ over set c's slots of latent f (f in dl) of val · y_c[row], y_c [B, d]: per block of
// latents, one pass over the slots (rows ascending, as chunked ELL stores them) that fills V [n, rows] a
// block of rows at a time, each block then added by a GEMM V · y_c[rows].
void DenseSums(const Codes& c, const DenseLatents& dl, const int32_t* slot, const float* y_c, int64_t B, int64_t F,
               int64_t d, float* dense) {
  std::vector<float> v(kDenseBlock * kDenseRows), out(kDenseBlock * d);
  for (int64_t j0 = 0; j0 < (int64_t)dl.ids.size(); j0 += kDenseBlock) {
    const int64_t n = std::min<int64_t>(kDenseBlock, dl.ids.size() - j0);
    std::fill(out.begin(), out.end(), 0.0f);
    int64_t r0 = -1;  // the rows [r0, r0 + kDenseRows) that v holds
    auto flush = [&] {
      if (r0 < 0) return;
      const int64_t rows = std::min(kDenseRows, B - r0);
      ParallelGemm(v.data(), y_c + r0 * d, out.data(), n, d, rows, d, false, 1.0f, kDenseRows);
      r0 = -1;
    };
    ForSlots(c, 0, c.C * c.K, B, F, [&](uint32_t i, int32_t r, float val) {
      const int64_t q = dl.has(i) ? dl.slot[i] - j0 : -1;
      if (q < 0 || q >= n) return;
      if (r0 < 0 || r < r0 || r >= r0 + kDenseRows) {  // another block of rows (any order is summed right)
        flush();
        r0 = r / kDenseRows * kDenseRows;
        std::fill(v.begin(), v.begin() + n * kDenseRows, 0.0f);
      }
      v[q * kDenseRows + (r - r0)] += val;
    });
    flush();
    for (int64_t q = 0; q < n; ++q) {
      float* o = dense + (int64_t)slot[dl.ids[j0 + q]] * d;
      for (int64_t x = 0; x < d; ++x) o[x] += out[q * d + x];
    }
  }
}

LatentSums BuildSums(const Codes* sets, int n_sets, int64_t B, int64_t F, const RowSource& y, int64_t d) {
  LatentSums ls{std::vector<int64_t>(F + 1), {}, {}, std::vector<int32_t>(F, -1), {}};
  std::vector<DenseLatents> dense_in;  // per set: its dense latents
  int32_t n_dense = 0;
  for (int q = 0; q < n_sets; ++q) {
    dense_in.push_back(FindDense(sets[q], B, F));
    for (int32_t f : dense_in[q].ids)
      if (ls.dense_slot[f] < 0) ls.dense_slot[f] = n_dense++;
  }
  ls.dense.assign((int64_t)n_dense * d, 0.0f);
  for (int q = 0; q < n_sets; ++q)
    if (!dense_in[q].ids.empty())
      DenseSums(sets[q], dense_in[q], ls.dense_slot.data(), y.Row(sets[q].row_offset, d), B, F, d, ls.dense.data());

  // The light slots by a parallel counting sort over the sets laid end to end.
  int64_t S = 0;
  for (int q = 0; q < n_sets; ++q) S += sets[q].C * sets[q].K;
  auto for_light = [&](int64_t s0, int64_t s1, auto fn) {
    int64_t base = 0;
    for (int q = 0; q < n_sets; ++q) {
      const Codes& c = sets[q];
      const int64_t n = c.C * c.K, lo = std::max(s0 - base, (int64_t)0), hi = std::min(s1 - base, n);
      if (lo < hi)
        ForSlots(c, lo, hi, B, F, [&](uint32_t i, int32_t r, float v) {
          if (!dense_in[q].has(i)) fn(i, (int32_t)(r + c.row_offset), v);
        });
      base += n;
    }
  };
  const int nt_max = omp_get_max_threads();
  std::vector<int32_t> counts((int64_t)nt_max * F + 1);
#pragma omp parallel
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    int64_t s0, s1;
    Split(S, s0, s1);
    int32_t* cnt = counts.data() + (int64_t)t * F;
    std::fill(cnt, cnt + F, 0);
    for_light(s0, s1, [&](uint32_t i, int32_t, float) { ++cnt[i]; });
#pragma omp barrier
#pragma omp single
    {
      int64_t acc = 0;  // start[f] = first position of latent f; counts become each thread's offsets
      for (int64_t f = 0; f < F; ++f) {
        ls.start[f] = acc;
        for (int u = 0; u < nt; ++u) {
          const int32_t n = counts[(int64_t)u * F + f];
          counts[(int64_t)u * F + f] = (int32_t)acc;
          acc += n;
        }
      }
      ls.start[F] = acc;
      ls.src_row.resize(acc);
      ls.src_val.resize(acc);
    }
    for_light(s0, s1, [&](uint32_t i, int32_t r, float v) {
      const int32_t p = cnt[i]++;
      ls.src_row[p] = r;
      ls.src_val[p] = v;
    });
  }
  return ls;
}

// Latents per tile where sums are written into a [d, F] layout: 128 latents = 512 contiguous bytes per
// row of d (measured at F 6144, d 768: scatter_adam of W_enc 56 ms with 16, 45 with 64 and 128).
constexpr int64_t kColumnTile = 128;

// Runs emit(f0, n, buf) in parallel over tiles of up to `tile` latents, buf [n, d] (`transposed`: [d, n])
// holding their sums Σ val · y[row] (latent ranges per thread balanced by entries + `latent_cost` each).
template <typename Emit>
void ForLatentTiles(const LatentSums& ls, const RowSource& y, int64_t F, int64_t d, int64_t tile, int64_t latent_cost,
                    bool transposed, Emit emit) {
  const FpMode fp;
  const int64_t* start = ls.start.data();
#pragma omp parallel
  {
    FpScope scope(fp);
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t total = start[F] + F * latent_cost;
    auto cut = [&](int64_t u) {
      const int64_t goal = total * u / nt;
      int64_t lo = 0, hi = F;  // first f with start[f] + cost · f >= goal
      while (lo < hi) {
        const int64_t mid = (lo + hi) / 2;
        if (start[mid] + mid * latent_cost < goal) lo = mid + 1; else hi = mid;
      }
      return lo;
    };
    const int64_t f0 = cut(t), f1 = t + 1 == nt ? F : cut(t + 1);
    std::vector<float> buf(tile * d), turned(transposed ? tile * d : 0);
    std::vector<int64_t> local(tile);
    for (int64_t j = 0; j < tile; ++j) local[j] = j;
    for (int64_t fa = f0; fa < f1; fa += tile) {
      const int64_t n = std::min(tile, f1 - fa);
      std::fill(buf.begin(), buf.begin() + n * d, 0.0f);
      AccumulateRows(y, ls.src_row.data(), ls.src_val.data(), start + fa, local.data(), n, buf.data(), d, 0, d);
      for (int64_t j = 0; j < n; ++j) {
        const int32_t slot = ls.dense_slot[fa + j];
        if (slot >= 0)
          for (int64_t x = 0; x < d; ++x) buf[j * d + x] += ls.dense[slot * d + x];
      }
      if (transposed) Transpose(buf.data(), n, d, turned.data());
      emit(fa, n, transposed ? turned.data() : buf.data());
    }
  }
}

// scatter_rows: out[f] = Σ val · y[row] over the slots with idx = f; each thread owns a latent range
// balanced by entry count and writes each of its output rows (zeros included) once.
// scatter_cols (`transposed`): the same sums written as out [d, F] (the encoder's gradient in W_enc's
// layout, without a separate transpose pass), through tiles of kColumnTile latents.
void ScatterRows(const int32_t* row, const int32_t* idx, const float* val, const float* y, float* out,
                 int64_t C, int64_t K, int64_t B, int64_t F, int64_t d, bool transposed) {
  const Codes codes{row, idx, val, C, K, 0};
  const LatentSums ls = BuildSums(&codes, 1, B, F, RowSource{y}, d);
  if (transposed) {
    ForLatentTiles(ls, RowSource{y}, F, d, kColumnTile, 1, true, [&](int64_t fa, int64_t n, const float* buf) {
      for (int64_t x = 0; x < d; ++x) std::copy(buf + x * n, buf + (x + 1) * n, out + x * F + fa);
    });
  } else {
    ForLatentTiles(ls, RowSource{y}, F, d, 1, 1, false, [&](int64_t f, int64_t, const float* buf) {
      std::copy(buf, buf + d, out + f * d);
    });
  }
}

// ---------------------------------------------------------------------------------------------
// A positive float's bit pattern, which orders like the value; 0 for the rest.
inline int32_t PositiveBits(float a) {
  int32_t b;
  std::memcpy(&b, &a, 4);
  return a > 0.0f ? b : 0;  // non-positive and NaN entries: 0, never selected
}

// topk_rows. A key orders entries like lax.top_k: larger value first, then lower latent id first.
inline uint64_t Key(uint32_t bits, int64_t f) { return ((uint64_t)bits << 32) | (uint32_t)(0xFFFFFFFFu - f); }

// Of n candidate keys, writes the ids of the k best to out ascending, then -1 up to `size`.
void KeepBest(uint64_t* cand, int64_t n, int64_t k, int64_t size, int32_t* out) {
  if (n > k) {
    std::nth_element(cand, cand + (k - 1), cand + n, std::greater<uint64_t>());
    n = k;
  }
  for (int64_t q = 0; q < n; ++q) out[q] = (int32_t)(0xFFFFFFFFu - (uint32_t)cand[q]);
  std::sort(out, out + n);
  std::fill(out + n, out + size, -1);
}

// Per-row scratch: the masked bit patterns (0 = not a candidate), block maxima, candidate keys.
struct TopkScratch {
  std::vector<int32_t> bits, block_max, visit;  // visit: the screen's blocks to read (ScanRow)
  std::vector<uint64_t> cand;
  explicit TopkScratch(int64_t F) : bits(F), block_max(2 * F), cand(F) {}
};

// Blocks of one row's pass 1: entries per block, full blocks, all blocks (the tail entries are blocks of
// their own).
struct RowBlocks {
  int64_t blk, n_full, nb;
};

// Pass 1 of TopkRow: fills sc.bits and sc.block_max and returns t, the k-th largest block maximum (1 when
// there are at most k blocks: every positive entry may be among the k largest).
int32_t KthBlockMax(const float* __restrict a, const uint8_t* __restrict mask, int64_t F, int64_t k, TopkScratch& sc,
                    RowBlocks& rb) {
  int64_t blk = 16;  // entries per block, a multiple of 8 or 1
  while (blk > 1 && F / blk < 4 * k) blk = blk == 16 ? 8 : 1;
  int32_t* __restrict m = sc.bits.data();
  int32_t* __restrict bmax = sc.block_max.data();
  int64_t nb = 0, f = 0;
  if (blk >= 8)
    for (; f + blk <= F; f += blk) {
      i8 mx = {};
      for (int64_t h = f; h < f + blk; h += 8) {
        i8 keep = LoadV<f8>(a + h) > 0.0f;
        for (int q = 0; q < 8; ++q) keep[q] &= -(int32_t)(mask[h + q] != 0);
        const i8 b = LoadV<i8>(a + h) & keep;
        std::memcpy(m + h, &b, sizeof(b));
        mx = mx > b ? mx : b;
      }
      int32_t r = mx[0];
      for (int q = 1; q < 8; ++q) r = std::max(r, mx[q]);
      bmax[nb++] = r;
    }
  rb = RowBlocks{blk, nb, 0};
  for (; f < F; ++f) {
    int32_t b;
    std::memcpy(&b, a + f, 4);
    bmax[nb++] = m[f] = (a[f] > 0.0f) & (mask[f] != 0) ? b : 0;
  }
  rb.nb = nb;
  if (nb <= k) return 1;
  int32_t* sel = bmax + F;  // nth_element on a copy: the maxima still tell which blocks to visit
  std::copy(bmax, bmax + nb, sel);
  std::nth_element(sel, sel + (k - 1), sel + nb, std::greater<int32_t>());
  return std::max<int32_t>(1, sel[k - 1]);
}

// One row, in two vectorised passes. Pass 1 maps entries to their bit patterns (positive floats order as
// their int32 patterns; masked-out and non-positive entries become 0) and takes the maximum of each block
// of `blk` entries. The k-th largest block maximum t is a lower bound of the k-th largest entry (the k
// largest maxima are k distinct entries), and a tight one when blocks outnumber k several times. Pass 2
// keeps the entries >= t (about k of them), and an nth_element on (value, -latent) keys picks the k best.
void TopkRow(const float* __restrict a, const uint8_t* __restrict mask, int64_t F, int64_t k, int64_t size,
             TopkScratch& sc, int32_t* __restrict out) {
  RowBlocks rb;
  const int32_t t = KthBlockMax(a, mask, F, k, sc, rb);
  const int64_t blk = rb.blk, n_full = rb.n_full, nb = rb.nb;
  const int32_t* __restrict m = sc.bits.data();
  const int32_t* __restrict bmax = sc.block_max.data();
  uint64_t* __restrict cand = sc.cand.data();
  int64_t n = 0;
  for (int64_t q = 0; q < nb; ++q) {
    if (bmax[q] < t) continue;
    const int64_t lo = q < n_full ? q * blk : n_full * blk + (q - n_full), hi = q < n_full ? lo + blk : lo + 1;
    for (int64_t x = lo; x < hi; ++x) {
      cand[n] = Key((uint32_t)m[x], x);
      n += m[x] >= t;
    }
  }
  KeepBest(cand, n, k, size, out);
}

// One row when few latents are allowed (aux-k's dead latents): visit only `ids` instead of all F.
void TopkRowFew(const float* __restrict a, const int64_t* ids, int64_t n_ids, int64_t k, int64_t size,
                uint64_t* __restrict cand, int32_t* __restrict out) {
  int64_t n = 0;
  for (int64_t q = 0; q < n_ids; ++q) {
    const int64_t f = ids[q];
    uint32_t b;
    std::memcpy(&b, a + f, 4);
    cand[n] = Key(b, f);
    n += a[f] > 0.0f;
  }
  KeepBest(cand, n, k, size, out);
}

// Per-row top-k among the latents of a mask: scans the row, or visits only the allowed ids when few.
struct RowTopk {
  const uint8_t* mask;
  int64_t F, k, size;
  std::vector<int64_t> ids;
  bool few, all;
  RowTopk(const bool* m, int64_t F_, int64_t k_, int64_t size_)
      : mask(reinterpret_cast<const uint8_t*>(m)), F(F_), k(std::clamp<int64_t>(k_, 0, std::min(size_, F_))),
        size(size_) {
    for (int64_t f = 0; f < F; ++f)
      if (mask[f]) ids.push_back(f);
    few = (int64_t)ids.size() * 16 < F;  // a few allowed latents: random reads beat a scan of the row
    all = (int64_t)ids.size() == F;
  }
  void Run(const float* a, TopkScratch& sc, int32_t* out) const {
    if (k == 0)
      std::fill(out, out + size, -1);
    else if (few)
      TopkRowFew(a, ids.data(), (int64_t)ids.size(), k, size, sc.cand.data(), out);
    else
      TopkRow(a, mask, F, k, size, sc, out);
  }
};

void TopkRows(const float* acts, const bool* mask, int64_t k, int32_t* out, int64_t R, int64_t F,
              int64_t size) {
  const RowTopk sel(mask, F, k, size);
  const FpMode fp;
#pragma omp parallel
  {
    FpScope scope(fp);
    TopkScratch sc(F);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < R; ++r) sel.Run(acts + r * F, sc, out + r * size);
  }
}

// ---------------------------------------------------------------------------------------------
// encode / encode_topk: the encoder matmul x·w + b in row blocks, each block by single-threaded OpenBLAS
// in one OpenMP thread (measured here: within 5% of OpenBLAS's own threading, 1.3-1.5x faster than XLA's
// dot). encode_topk selects while the block is hot and never holds more than one block per thread.
// Row blocks of at most this many bytes of pre-activations per thread. The screen's (bf16_screen.h, per
// column group) are half as large: its GEMM reads the bfloat16 weights at half the bytes, and at 32x it
// ran as fast with 8 MB blocks as with 16; float32's OpenBLAS blocks slowed by 15% then.
constexpr int64_t kEncodeBlockBytes = 16 << 20, kScreenBlockBytes = 8 << 20;

int64_t EncodeBlockRows(int64_t F, bool screened = false) {
  const int64_t bytes = screened ? kScreenBlockBytes : kEncodeBlockBytes;
  return std::clamp<int64_t>(bytes / (4 * std::max<int64_t>(F, 1)), 64, 256);
}

// buf [n, F] = x[r0 : r0 + n] · w + b  (x [R, d], w [d, F] row-major).
void EncodeBlock(const float* x, const float* w, const float* b, int64_t r0, int64_t n, int64_t d, int64_t F,
                 float* buf) {
  for (int64_t r = 0; r < n; ++r) std::memcpy(buf + r * F, b, F * sizeof(float));
  if (d > 0)
    scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (blasint)n, (blasint)F, (blasint)d, 1.0f,
                      x + r0 * d, (blasint)d, w, (blasint)F, 1.0f, buf, (blasint)F);
}

// Calls body(r0, n, thread_buffer_or_null) for the row blocks of [0, R), blocks spread over the team.
template <typename Body>
void ForRowBlocks(int64_t R, int64_t F, bool own_buffer, Body body) {
  const int64_t blk = EncodeBlockRows(F);
  const int64_t nb = (R + blk - 1) / blk;
  SerialBlas();  // parallel over blocks instead
  const FpMode fp;
#pragma omp parallel
  {
    FpScope scope(fp);
    std::vector<float> buf(own_buffer ? blk * F : 0);
#pragma omp for schedule(dynamic, 1)
    for (int64_t q = 0; q < nb; ++q) body(q * blk, std::min(blk, R - q * blk), own_buffer ? buf.data() : nullptr);
  }
}

void Encode(const float* x, const float* w, const float* b, float* out, int64_t R, int64_t d, int64_t F) {
  ForRowBlocks(R, F, false, [&](int64_t r0, int64_t n, float*) { EncodeBlock(x, w, b, r0, n, d, F, out + r0 * F); });
}

void ValuesAt(const float* a, const int32_t* ids, int64_t size, float* out) {
  for (int64_t j = 0; j < size; ++j) out[j] = ids[j] >= 0 ? a[ids[j]] : 0.0f;
}

// The blocks' vectors laid end to end (each freed as it is copied).
template <typename T>
std::vector<T> Concatenate(std::vector<std::vector<T>>& blocks) {
  std::vector<T> out;
  size_t n = 0;
  for (const auto& v : blocks) n += v.size();
  out.reserve(n);
  for (auto& v : blocks) {
    out.insert(out.end(), v.begin(), v.end());
    std::vector<T>().swap(v);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Screened selections (bf16_screen.h). A row block is encoded approximately (x̃·w̃ + b, bfloat16 operands,
// float32 sums), with a bound beta per row on |approx − exact|. An entry can be selected only if its
// exact value is >= a lower bound L of the selection's threshold, so only the entries with approx >=
// L − beta (the candidates, about k per row plus those within 2·beta of the threshold) get their exact
// float32 value, after all blocks, by latent groups (`Refine`). Each selection then runs on the
// candidates alone: its result is the one on exact values. When the bound is not finite (NaN or
// infinite inputs) or the candidates would not fit, the kernel runs unscreened instead.
enum ScreenMode : int32_t { kScreenOff = 0, kScreenAuto = 1, kScreenRequired = 2 };

struct Candidate {
  int32_t row, f;
  float approx, v;  // v: the bound beta of its row and column group until refined, then the exact value
};

// Lanes (0 / -1) of the latents allowed by a mask, for vectorised candidate tests.
std::vector<int32_t> MaskLanes(const bool* mask, int64_t F) {
  std::vector<int32_t> out(F);
  for (int64_t f = 0; f < F; ++f) out[f] = mask == nullptr || mask[f] ? -1 : 0;
  return out;
}

// Appends the candidates of the approximate row a [F] (latents first + [0, F) of a column group, block
// maxima block_max, bound beta) as (row, first + f), latents ascending: entries >= floor_main on main's
// lanes, and >= floor_aux on aux's (lanes from the group's first latent). Only the blocks whose maximum
// reaches a floor are read; their cache lines are all requested before the first is read.
void ScanRow(const float* a, const float* block_max, int64_t F, int64_t first, int32_t row, float beta,
             float floor_main, const int32_t* lanes_main, float floor_aux, const int32_t* lanes_aux,
             std::vector<int32_t>& visit, std::vector<Candidate>& out) {
  const float lowest = std::min(floor_main, floor_aux);
  visit.clear();
  for (int64_t q = 0; q * screen::kBlock < F; ++q)
    if (block_max[q] >= lowest) {
      visit.push_back((int32_t)q);
      __builtin_prefetch(a + q * screen::kBlock);
      __builtin_prefetch(a + q * screen::kBlock + screen::kBlock - 1);
    }
  const f8 fm = Splat(floor_main), fa = Splat(floor_aux);
  for (const int32_t q : visit) {
    const int64_t f0 = q * screen::kBlock;
    if (f0 + screen::kBlock > F) {
      for (int64_t f = f0; f < F; ++f)
        if ((a[f] >= floor_main && lanes_main[f]) || (a[f] >= floor_aux && lanes_aux[f]))
          out.push_back({row, (int32_t)(first + f), a[f], beta});
      continue;
    }
    for (int64_t f = f0; f < f0 + screen::kBlock; f += 8) {
      const f8 v = Load8(a + f);
      const i8 m = ((i8)(v >= fm) & LoadV<i8>(lanes_main + f)) | ((i8)(v >= fa) & LoadV<i8>(lanes_aux + f));
      if (Any(m))
        for (int q8 = 0; q8 < 8; ++q8)
          if (m[q8]) out.push_back({row, (int32_t)(first + f + q8), v[q8], beta});
    }
  }
}


// c.v = x[c.row] · w[:, c.f] + b[c.f] in float32 for every candidate. w's columns are strided, so the
// candidates go by latent (a counting sort), 16 latents at a time with their columns transposed once into
// a [16, d] tile: one pass over w for the whole batch. A latent's candidates share the tile's row, four
// dot products at a time, prefetching the next four rows of x.
void Refine(std::vector<Candidate>& c, const float* x, const float* w, const float* b, int64_t d, int64_t F) {
  constexpr int64_t kGroup = 16;
  std::vector<int64_t> start(F + 1, 0);
  for (const Candidate& e : c) ++start[e.f + 1];
  for (int64_t f = 0; f < F; ++f) start[f + 1] += start[f];
  std::vector<int64_t> order(c.size()), next(start.begin(), start.end() - 1);
  for (int64_t i = 0; i < (int64_t)c.size(); ++i) order[next[c[i].f]++] = i;
  const FpMode fp;
#pragma omp parallel
  {
    FpScope scope(fp);
    std::vector<float> tile(kGroup * d);
#pragma omp for schedule(dynamic, 4)
    for (int64_t f0 = 0; f0 < F; f0 += kGroup) {
      const int64_t n = std::min(kGroup, F - f0);
      if (start[f0] == start[f0 + n]) continue;
      for (int64_t i = 0; i < d; ++i)
        for (int64_t j = 0; j < n; ++j) tile[j * d + i] = w[i * F + f0 + j];
      const int64_t end = start[f0 + n];
      auto row = [&](int64_t q) { return x + (int64_t)c[order[std::min(q, end - 1)]].row * d; };
      for (int64_t f = f0; f < f0 + n; ++f) {
        const float* t = tile.data() + (f - f0) * d;
        int64_t q = start[f];
        for (; q + 4 <= start[f + 1]; q += 4) {
          const float* r[4] = {row(q), row(q + 1), row(q + 2), row(q + 3)};
          const float* pf[4] = {row(q + 4), row(q + 5), row(q + 6), row(q + 7)};
          float out[4];
          Dot4(t, r, pf, d, out);
          for (int j = 0; j < 4; ++j) c[order[q + j]].v = out[j] + b[f];
        }
        for (; q < start[f + 1]; ++q) c[order[q]].v = Dot1(row(q), t, d) + b[f];
      }
    }
  }
}

// The top k of `sel` among one row's refined candidates c [n] (latents ascending), as RowTopk::Run and
// ValuesAt on the exact row: ids ascending then -1 up to sel.size, and their values.
void SelectCandidates(const Candidate* c, int64_t n, const RowTopk& sel, TopkScratch& sc, int32_t* idx, float* val) {
  uint64_t* cand = sc.cand.data();
  int64_t m = 0;
  for (int64_t j = 0; j < n && sel.k > 0; ++j)
    if (sel.mask[c[j].f] && c[j].v > 0.0f) cand[m++] = Key((uint32_t)PositiveBits(c[j].v), c[j].f);
  if (sel.k == 0)
    std::fill(idx, idx + sel.size, -1);
  else
    KeepBest(cand, m, sel.k, sel.size, idx);
  int64_t j = 0;
  for (int64_t q = 0; q < sel.size; ++q) {
    if (idx[q] < 0) {
      val[q] = 0.0f;
      continue;
    }
    while (c[j].f != idx[q]) ++j;
    val[q] = c[j].v;
  }
}

// The top k of `sel` per row when its latents are few (RowTopk::few, aux-k's dead latents): their exact
// values for every row by one GEMM, x [R, d] · w[:, ids] + b[ids], instead of candidates (they would be
// about half of all the candidates, each a dot product), then SelectCandidates on each row of them.
void SelectFewExactly(const float* x, const float* w, const float* b, int64_t R, int64_t d, int64_t F,
                      const RowTopk& sel, TopkScratch* scratch, int32_t* idx, float* val) {
  const int64_t n = (int64_t)sel.ids.size();
  std::vector<float> cols(d * n), pre(R * n);
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = 0; j < n; ++j) cols[i * n + j] = w[i * F + sel.ids[j]];
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = 0; j < n; ++j) pre[r * n + j] = b[sel.ids[j]];
  if (n > 0 && d > 0) ParallelGemm(x, cols.data(), pre.data(), R, n, d, n, false, 1.0f);
  const FpMode fp;
#pragma omp parallel
  {
    FpScope scope(fp);
    std::vector<Candidate> row(n);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t j = 0; j < n; ++j) row[j] = {(int32_t)r, (int32_t)sel.ids[j], pre[r * n + j], pre[r * n + j]};
      SelectCandidates(row.data(), n, sel, scratch[omp_get_thread_num()], idx + r * sel.size, val + r * sel.size);
    }
  }
}

// Runs fn(r, candidates of row r, their count) for every row in parallel; c is row-major.
template <typename Fn>
void ForCandidateRows(const std::vector<Candidate>& c, int64_t R, Fn fn) {
  std::vector<int64_t> start(R + 1, 0);
  for (const Candidate& e : c) ++start[e.row + 1];
  for (int64_t r = 0; r < R; ++r) start[r + 1] += start[r];
  const FpMode fp;
#pragma omp parallel
  {
    FpScope scope(fp);
    const int t = omp_get_thread_num();
#pragma omp for schedule(static)
    for (int64_t r = 0; r < R; ++r) fn(t, r, c.data() + start[r], start[r + 1] - start[r]);
  }
}

// Column groups: the screen's packed weights are held one group of latents at a time (up to
// kScreenGroupBytes; at d 768, F 24576: 4 groups of 9.4 MB instead of 38 MB at once; at F 6144 one).
// Groups go outer, row blocks inner. A row's floor for its top k is the k-th largest lower bound seen in
// its groups so far (RunningBound), looser in its first groups: their extra candidates are dropped, before
// the refinement, once the row's last group has tightened it (MergeGroups). Each group costs the rows'
// bounds and scans again: measured at 32x, TopK's step took 650 ms in one group, 662 in 4, 682 in 10.
constexpr int64_t kScreenGroupBytes = 10 << 20;
int64_t g_screen_group = 0;  // latents per group when > 0 (jaxsae_set_screen_group: tests)

struct ColumnGroups {
  int64_t count, cols;  // groups; latents per group, a multiple of screen::kCols (the last may hold fewer)
  int64_t block_rows;   // rows per block, the same in every group (MergeGroups pairs their blocks)
  int64_t blocks(int64_t R) const { return (R + block_rows - 1) / block_rows; }
};

ColumnGroups SplitColumns(int64_t d, int64_t F) {
  const int64_t most_cols = g_screen_group > 0 ? g_screen_group : kScreenGroupBytes / (4 * ((d + 1) / 2));
  const int64_t most = std::max(screen::kCols, most_cols / screen::kCols * screen::kCols);
  const int64_t even = (F + (F + most - 1) / most - 1) / ((F + most - 1) / most);  // F over the groups, rounded up
  const int64_t cols = (even + screen::kCols - 1) / screen::kCols * screen::kCols;
  return {(F + cols - 1) / cols, cols, EncodeBlockRows(cols, true)};
}

// One column group's packed weights and the bias bound, or ok false (a weight or bias not finite).
struct ScreenSetup {
  screen::Weights w;
  float b_max = 0;
  bool ok = false;
};

// The largest |b|, or NaN when b is not finite.
float BiasBound(const float* b, int64_t F) {
  bool finite = true;  // max() would drop a NaN
  float m = 0;
  for (int64_t f = 0; f < F; ++f) {
    finite = finite && std::isfinite(b[f]);
    m = std::max(m, std::fabs(b[f]));
  }
  return finite ? m : NAN;
}

ScreenSetup SetUpGroup(const float* w, int64_t d, int64_t F, int64_t f0, int64_t nc, float b_max) {
  ScreenSetup s;
#if JAXSAE_SCREEN
  s.w = screen::Pack(w + f0, d, nc, F);
#endif
  s.b_max = b_max;
  s.ok = std::isfinite(s.w.norm) && std::isfinite(s.w.rounded_norm) && std::isfinite(s.w.error_norm);
  return s;
}

// Encodes the rows [r0, r0 + n) approximately on one column group into buf [n, nc], with their bounds
// (rows.beta [n]) and block maxima block_max [n][ceil(nc / 16)]; b: the group's biases. False when a
// bound is not finite.
bool ApproxBlock(const ScreenSetup& s, const float* x, const float* b, int64_t r0, int64_t n, screen::Rows& rows,
                 float* buf, float* block_max) {
#if JAXSAE_SCREEN
  screen::Round(x + r0 * s.w.d, n, s.w, s.b_max, rows);
  for (int64_t r = 0; r < n; ++r)
    if (!std::isfinite(rows.beta[r])) return false;
  screen::Approx(rows, n, s.w, b, buf, block_max);
  return true;
#else
  return false;
#endif
}

// What a screened pass came to: it could not be used (screen off or unavailable, a weight or bias not
// finite), it stopped (a row's bound not finite, or the visitor gave up), or it ran over every block.
enum class Screened { kUnusable, kStopped, kRan };

// One approximate row block of a column group, as the visitor of ForScreenedBlocks sees it.
struct ApproxRows {
  int64_t g, f0, nc, q, r0, n;  // group, its latents [f0, f0 + nc); block q, rows [r0, r0 + n)
  const float* a;               // [n, nc]
  const float* block_max;       // [n, ceil(nc / 16)]
  const float* beta;            // [n]
  int t;                        // the thread
};

// Runs the screen over the column groups of w (outer) and the row blocks of x (inner, spread over the
// team): visit(ApproxRows) on the thread that encoded each block; it returns false to stop the pass.
// With `sample`, the first block of each thread in group 0 goes to sample(ApproxRows) first, then
// decide() runs on one thread, then those blocks are visited (batchtopk's guess of its threshold).
template <typename Visit, typename Sample, typename Decide>
Screened ForScreenedBlocks(const float* x, const float* w, const float* b, int64_t R, int64_t d, int64_t F,
                           int32_t mode, const ColumnGroups& groups, Visit visit, bool sample, Sample sample_fn,
                           Decide decide) {
  if (!JAXSAE_SCREEN || mode == kScreenOff || d == 0 || F == 0 || R == 0) return Screened::kUnusable;
  const float b_max = BiasBound(b, F);
  if (!std::isfinite(b_max)) return Screened::kUnusable;
  std::atomic<bool> stopped{false};
  const FpMode fp;
  for (int64_t g = 0; g < groups.count && !stopped.load(); ++g) {
    const int64_t f0 = g * groups.cols, nc = std::min(groups.cols, F - f0);
    const ScreenSetup s = SetUpGroup(w, d, F, f0, nc, b_max);
    if (!s.ok) return Screened::kUnusable;
    const int64_t blk = groups.block_rows, nb = groups.blocks(R), n_blocks = (nc + screen::kBlock - 1) / screen::kBlock;
#pragma omp parallel
    {
      FpScope scope(fp);
      const int t = omp_get_thread_num(), nt = omp_get_num_threads();
      std::vector<float> buf(blk * nc), block_max(blk * n_blocks);
      screen::Rows rows;
      auto encode = [&](int64_t q) {
        const int64_t r0 = q * blk, n = std::min(blk, R - r0);
        if (stopped.load() || !ApproxBlock(s, x, b + f0, r0, n, rows, buf.data(), block_max.data())) {
          stopped = true;
          return ApproxRows{};
        }
        return ApproxRows{g, f0, nc, q, r0, n, buf.data(), block_max.data(), rows.beta.data(), t};
      };
      auto run = [&](const ApproxRows& block) {
        if (block.a != nullptr && !stopped.load() && !visit(block)) stopped = true;
      };
      const int64_t first = sample && g == 0 ? std::min<int64_t>(nt, nb) : 0;
      ApproxRows mine{};
      if (t < first) {
        mine = encode(t);
        if (mine.a != nullptr) sample_fn(mine);
      }
      if (first > 0) {
#pragma omp barrier
#pragma omp single
        decide();
      }
      if (t < first) run(mine);
#pragma omp for schedule(dynamic, 1)
      for (int64_t q = first; q < nb; ++q) run(encode(q));
    }
  }
  return stopped.load() ? Screened::kStopped : Screened::kRan;
}

// Per row, the k largest lower bounds (as PositiveBits) of the exact values of distinct allowed entries
// seen so far in the row's column groups: the smallest of them is a lower bound of the row's k-th
// largest allowed exact value (0 while fewer than k are positive). With every latent allowed and enough
// blocks, a group contributes its block maxima less beta, else its allowed entries less beta.
class RunningBound {
 public:
  RunningBound(const RowTopk& sel, int64_t R, bool used)
      : k_(used ? sel.k : 0), blocks_(sel.all && (sel.F + screen::kBlock - 1) / screen::kBlock >= 4 * sel.k),
        top_(R * k_, 0) {}
  bool used() const { return k_ > 0; }
  // Adds row r's bounds from one group (a [nc], its block maxima bm, lanes of the allowed latents from
  // the group's first) and returns the candidates' floor there: the row's bound so far less beta.
  float Add(int64_t r, const float* a, const float* bm, int64_t nc, const int32_t* lanes, float beta,
            std::vector<int32_t>& v) {
    if (!used()) return INFINITY;
    v.clear();
    if (blocks_)
      for (int64_t j = 0; j * screen::kBlock < nc; ++j) v.push_back(PositiveBits(bm[j] - beta));
    else
      for (int64_t f = 0; f < nc; ++f)
        if (lanes[f]) v.push_back(PositiveBits(a[f] - beta));
    int32_t* top = top_.data() + r * k_;
    v.insert(v.end(), top, top + k_);
    std::nth_element(v.begin(), v.begin() + (k_ - 1), v.end(), std::greater<int32_t>());
    std::copy(v.begin(), v.begin() + k_, top);
    return Floor(r, beta);
  }
  // The floor of row r's candidates with bound beta, from the groups added so far.
  float Floor(int64_t r, float beta) const {
    if (!used()) return INFINITY;
    const int32_t* top = top_.data() + r * k_;
    const int32_t t = *std::min_element(top, top + k_);
    float lower;
    std::memcpy(&lower, &t, 4);
    return (t > 0 ? lower : 0.0f) - beta;
  }

 private:
  int64_t k_;
  bool blocks_;
  std::vector<int32_t> top_;  // [R, k]
};

// Appends the candidates of an approximate block's rows to `out` (ScanRow): main's floor per row from
// main_floor(row, approx row, its block maxima, beta), aux-k's from its running bound (+inf if unused).
template <typename MainFloor>
void ScanBlock(const ApproxRows& z, MainFloor main_floor, const int32_t* lanes_main, RunningBound& bound_aux,
               const int32_t* lanes_aux, TopkScratch& sc, std::vector<Candidate>& out) {
  const int64_t n_blocks = (z.nc + screen::kBlock - 1) / screen::kBlock;
  for (int64_t i = 0; i < z.n; ++i) {
    const float *a = z.a + i * z.nc, *m = z.block_max + i * n_blocks;
    const int64_t r = z.r0 + i;
    const float floor_main = main_floor(r, a, m, z.beta[i]);
    const float floor_aux = bound_aux.Add(r, a, m, z.nc, lanes_aux + z.f0, z.beta[i], sc.bits);
    ScanRow(a, m, z.nc, z.f0, (int32_t)r, z.beta[i], floor_main, lanes_main + z.f0, floor_aux, lanes_aux + z.f0,
            sc.visit, out);
  }
}

// The candidates of all groups (lists[g · nb + q]: group g's of row block q, row-major), row-major with
// latents ascending within a row, keeping those for which keep(c) holds. Frees the lists.
template <typename Keep>
std::vector<Candidate> MergeGroups(std::vector<std::vector<Candidate>>& lists, int64_t groups, int64_t nb, Keep keep) {
  std::vector<std::vector<Candidate>> blocks(nb);
  const FpMode fp;
#pragma omp parallel
  {
    FpScope scope(fp);
    std::vector<size_t> at(groups);
#pragma omp for schedule(dynamic, 1)
    for (int64_t q = 0; q < nb; ++q) {
      std::fill(at.begin(), at.end(), 0);
      for (;;) {
        int32_t row = INT32_MAX;
        for (int64_t g = 0; g < groups; ++g)
          if (at[g] < lists[g * nb + q].size()) row = std::min(row, lists[g * nb + q][at[g]].row);
        if (row == INT32_MAX) break;
        for (int64_t g = 0; g < groups; ++g)
          for (const auto& l = lists[g * nb + q]; at[g] < l.size() && l[at[g]].row == row; ++at[g])
            if (keep(l[at[g]])) blocks[q].push_back(l[at[g]]);
      }
      for (int64_t g = 0; g < groups; ++g) std::vector<Candidate>().swap(lists[g * nb + q]);
    }
  }
  return Concatenate(blocks);
}

// Success, or, when the caller required the screen (tests) and the kernel ran without it, an error
// (encode_topk: selected without it; encode_batchtopk: ran no screened pass).
ffi::Error ScreenResult(const char* name, int32_t mode, bool screened) {
  if (mode == kScreenRequired && !screened)
    return ffi::Error::Internal(std::string(name) + ": screen=2 (required), but the kernel ran unscreened");
  return ffi::Error::Success();
}

// encode_topk with the screen; false (nothing written) when it cannot be used.
bool EncodeTopkScreened(const float* x, const float* w, const float* b, int64_t R, int64_t d, int64_t F,
                        const RowTopk& main, const RowTopk& aux, int32_t mode, int32_t* idx, float* val,
                        int32_t* aux_idx, float* aux_val) {
  const std::vector<int32_t> lanes_main = MaskLanes(reinterpret_cast<const bool*>(main.mask), F),
                             lanes_aux = MaskLanes(reinterpret_cast<const bool*>(aux.mask), F);
  const ColumnGroups groups = SplitColumns(d, F);
  const int64_t nb = groups.blocks(R);
  const int64_t cap = (4 * (main.k + aux.k) + 64) * R;  // candidates beyond: screening does not pay
  RunningBound bound_main(main, R, true), bound_aux(aux, R, !aux.few);
  std::vector<std::vector<Candidate>> lists(groups.count * nb);
  std::vector<TopkScratch> scratch;
  for (int u = 0; u < omp_get_max_threads(); ++u) scratch.emplace_back(F);
  std::atomic<int64_t> found{0};
  auto visit = [&](const ApproxRows& z) {
    TopkScratch& sc = scratch[z.t];
    std::vector<Candidate>& out = lists[z.g * nb + z.q];
    auto main_floor = [&](int64_t r, const float* a, const float* m, float beta) {
      return bound_main.Add(r, a, m, z.nc, lanes_main.data() + z.f0, beta, sc.bits);
    };
    ScanBlock(z, main_floor, lanes_main.data(), bound_aux, lanes_aux.data(), sc, out);
    return (found += (int64_t)out.size()) <= cap;
  };
  auto none = [](const ApproxRows&) {};
  if (ForScreenedBlocks(x, w, b, R, d, F, mode, groups, visit, false, none, [] {}) != Screened::kRan) return false;
  std::vector<Candidate> c = MergeGroups(lists, groups.count, nb, [&](const Candidate& e) {
    return (lanes_main[e.f] && e.approx >= bound_main.Floor(e.row, e.v)) ||
           (lanes_aux[e.f] && e.approx >= bound_aux.Floor(e.row, e.v));
  });
  Refine(c, x, w, b, d, F);
  ForCandidateRows(c, R, [&](int t, int64_t r, const Candidate* rc, int64_t n) {
    SelectCandidates(rc, n, main, scratch[t], idx + r * main.size, val + r * main.size);
    if (!aux.few) SelectCandidates(rc, n, aux, scratch[t], aux_idx + r * aux.size, aux_val + r * aux.size);
  });
  if (aux.few) SelectFewExactly(x, w, b, R, d, F, aux, scratch.data(), aux_idx, aux_val);
  return true;
}

// Per row of pre = x·w + b: the top k under `mask` (ids ascending, their values), and the top k_aux under
// `mask_aux`. Returns whether the screen was used.
bool EncodeTopk(const float* x, const float* w, const float* b, int64_t R, int64_t d, int64_t F, const bool* mask,
                int64_t k, int64_t size, const bool* mask_aux, int64_t k_aux, int64_t size_aux, int32_t mode,
                int32_t* idx, float* val, int32_t* aux_idx, float* aux_val) {
  const RowTopk main(mask, F, k, size), aux(mask_aux, F, k_aux, size_aux);
  if (EncodeTopkScreened(x, w, b, R, d, F, main, aux, mode, idx, val, aux_idx, aux_val)) return true;
  std::vector<TopkScratch> scratch;
  for (int u = 0; u < omp_get_max_threads(); ++u) scratch.emplace_back(F);
  ForRowBlocks(R, F, true, [&](int64_t r0, int64_t n, float* buf) {
    EncodeBlock(x, w, b, r0, n, d, F, buf);
    TopkScratch& sc = scratch[omp_get_thread_num()];
    for (int64_t r = r0; r < r0 + n; ++r) {
      const float* a = buf + (r - r0) * F;
      main.Run(a, sc, idx + r * size);
      ValuesAt(a, idx + r * size, size, val + r * size);
      aux.Run(a, sc, aux_idx + r * size_aux);
      ValuesAt(a, aux_idx + r * size_aux, size_aux, aux_val + r * size_aux);
    }
  });
  return false;
}

// ---------------------------------------------------------------------------------------------
// positive_histogram. Level 0 bins every entry by its high 16 bits, with the entries that are not > 0
// moved to a bin >= 0x8000 (the negative half, dropped at the end): no branch (about half the entries
// are positive) and no shared spare bin whose increments would form one long store-to-load chain.
constexpr int64_t kBins = 65536;
constexpr int64_t kBlock = 64;

// Adds the entries acts[i0 : i1] to h by their high 16 bits (non-positive entries to bins >= 0x8000).
inline uint32_t Level0Key(float a) {
  uint32_t b;
  std::memcpy(&b, &a, 4);
  return (b >> 16) | (a > 0.0f ? 0u : 0x8000u);
}

void HistogramLevel0(const float* acts, int64_t i0, int64_t i1, int32_t* h) {
  uint32_t key[kBlock];
  int64_t i = i0;
  for (; i + kBlock <= i1; i += kBlock) {
#pragma omp simd
    for (int x = 0; x < kBlock; ++x) key[x] = Level0Key(acts[i + x]);
    for (int x = 0; x < kBlock; ++x) ++h[key[x]];
  }
  for (; i < i1; ++i) ++h[Level0Key(acts[i])];
}

// Adds the positive entries acts[i0 : i1] whose high 16 bits equal `prefix` to h by their low 16 bits.
// Few entries share the prefix: a well-predicted branch on a vectorised block test.
void HistogramLevel1(const float* acts, int64_t i0, int64_t i1, int64_t prefix, int32_t* h) {
  const uint32_t* bits = reinterpret_cast<const uint32_t*>(acts);
  const uint32_t want = (uint32_t)prefix;
  int64_t i = i0;
  for (; i + 16 <= i1; i += 16) {
    const u8 hi0 = LoadV<u8>(bits + i) >> 16, hi1 = LoadV<u8>(bits + i + 8) >> 16;
    if (Any((hi0 == want) | (hi1 == want)))
      for (int x = 0; x < 16; ++x)
        if (acts[i + x] > 0.0f && (bits[i + x] >> 16) == want) ++h[bits[i + x] & 0xFFFF];
  }
  for (; i < i1; ++i)
    if (acts[i] > 0.0f && (bits[i] >> 16) == want) ++h[bits[i] & 0xFFFF];
}

// Sums the team's private histograms priv [nt, kBins] into out, dropping the bins >= `valid`.
void ReduceHistograms(const std::vector<int32_t>& priv, int nt, int64_t valid, int32_t* out) {
  int64_t k0, k1;
  Split(kBins, k0, k1);
  for (int64_t key = k0; key < k1; ++key) {
    int32_t s = 0;
    for (int u = 0; u < nt; ++u) s += priv[(int64_t)u * kBins + key];
    out[key] = key < valid ? s : 0;
  }
}

void Histogram(const float* acts, int64_t n, int32_t prefix, int level, int32_t* out) {
  const int nt_max = omp_get_max_threads();
  std::vector<int32_t> priv((int64_t)nt_max * kBins, 0);
  const FpMode fp;
#pragma omp parallel
  {
    FpScope scope(fp);
    int64_t i0, i1;
    Split(n, i0, i1);
    int32_t* h = priv.data() + (int64_t)omp_get_thread_num() * kBins;
    if (level == 0)
      HistogramLevel0(acts, i0, i1, h);
    else
      HistogramLevel1(acts, i0, i1, prefix, h);
#pragma omp barrier
    ReduceHistograms(priv, omp_get_num_threads(), level == 0 ? kBins / 2 : kBins, out);
  }
}

// row_counts: per row, entries above and equal to the per-latent threshold.
void RowCounts(const float* acts, const float* thr, int32_t* above, int32_t* equal, int64_t R, int64_t F) {
  const FpMode fp;
#pragma omp parallel
  {
    FpScope scope(fp);
#pragma omp for schedule(static)
  for (int64_t r = 0; r < R; ++r) {
    const float* __restrict a = acts + r * F;
    int32_t na = 0, ne = 0;
#pragma omp simd reduction(+ : na, ne)
    for (int64_t f = 0; f < F; ++f) {
      na += a[f] > thr[f];
      ne += a[f] == thr[f];
    }
    above[r] = na;
    equal[r] = ne;
  }
  }
}

// Chunk c's row for the chunked ELL written from chunk_start (as the reference's scatter-max + cummax):
// the last non-empty row starting at or before it (0 if none); chunks past the last used one get R - 1.
void ChunkOwners(const int64_t* taken, const int32_t* chunk_start, int64_t R, int64_t n_chunks, int64_t size,
                 int32_t* row_out) {
  std::vector<int32_t> owner(n_chunks + 1, 0);
  int64_t used = 0;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t nc = (taken[r] + size - 1) / size;
    if (nc == 0) continue;
    const int64_t s = chunk_start[r];
    if (s >= 0 && s < n_chunks) owner[s] = std::max<int32_t>(owner[s], (int32_t)r);
    used = std::max(used, s + nc);
  }
  int32_t run = 0;
  for (int64_t c = 0; c < n_chunks; ++c) {
    run = std::max(run, owner[c]);
    row_out[c] = c < used ? run : (int32_t)(R - 1);
  }
}

// compact: row r's taken latents go, in ascending order, to the flat positions chunk_start[r]·size + slot
// of idx (its chunks are consecutive). Blocks of 16 with nothing at or above the threshold are skipped.
void Compact(const float* acts, const float* thr, const int32_t* quota, const int32_t* chunk_start,
             int32_t* row_out, int32_t* idx_out, int64_t R, int64_t F, int64_t n_chunks, int64_t size) {
  const int64_t total = n_chunks * size;
  std::vector<int64_t> taken(R);
  const FpMode fp;
#pragma omp parallel
  {
    FpScope scope(fp);
    int64_t p0, p1;
    Split(total, p0, p1);
    std::fill(idx_out + p0, idx_out + p1, -1);
#pragma omp barrier
#pragma omp for schedule(static)
    for (int64_t r = 0; r < R; ++r) {
      const float* __restrict a = acts + r * F;
      const int64_t base = (int64_t)chunk_start[r] * size;
      const int64_t q = quota[r];
      int64_t n = 0, n_eq = 0;
      auto visit = [&](int64_t f) {
        const bool eq = a[f] == thr[f];
        if ((a[f] > thr[f]) | (eq & (n_eq < q))) {
          const int64_t p = base + n++;
          if (p >= 0 && p < total) idx_out[p] = (int32_t)f;  // the reference drops writes past the end
        }
        n_eq += eq;
      };
      int64_t f = 0;
      for (; f + 16 <= F; f += 16) {
        const i8 ge = (LoadV<f8>(a + f) >= LoadV<f8>(thr + f)) | (LoadV<f8>(a + f + 8) >= LoadV<f8>(thr + f + 8));
        if (Any(ge))
          for (int x = 0; x < 16; ++x) visit(f + x);
      }
      for (; f < F; ++f) visit(f);
      taken[r] = n;
    }
  }
  ChunkOwners(taken.data(), chunk_start, R, n_chunks, size, row_out);
}

// encode_histogram: encode, plus positive_histogram's level 0 of the result taken while each block is hot.
void EncodeHistogram(const float* x, const float* w, const float* b, float* out, int32_t* hist, int64_t R,
                     int64_t d, int64_t F) {
  const int nt_max = omp_get_max_threads();
  std::vector<int32_t> priv((int64_t)nt_max * kBins, 0);
  ForRowBlocks(R, F, false, [&](int64_t r0, int64_t n, float*) {
    EncodeBlock(x, w, b, r0, n, d, F, out + r0 * F);
    HistogramLevel0(out + r0 * F, 0, n * F, priv.data() + (int64_t)omp_get_thread_num() * kBins);
  });
  const FpMode fp;
#pragma omp parallel
  {
    FpScope scope(fp);
    ReduceHistograms(priv, nt_max, kBins / 2, hist);
  }
}

// ---------------------------------------------------------------------------------------------
// encode_batchtopk: one data shard's BatchTopK without ever holding pre = x·w + b [R, F]: the same
// results as encode_histogram, select_batchtopk and aux-k's topk_rows on it (see ops.encode_batchtopk),
// with one encoder pass when its guess holds. Each row block, while in cache, adds to the level-0
// histogram, takes aux-k's per-row top k, and keeps its entries at or above a guessed lower bound of
// the threshold in a row-major pool. The guess: each thread's first block is encoded before any other,
// and the guess is the level-0 bin above which those rows hold kPoolMargin times their share of k·B.
// Once the histogram is whole the pool must hold every entry of the threshold's level-0 bin and above;
// when it does not (those first rows were unlike the rest, or the pool overflowed), the encoder runs
// again to collect exactly that (its size now known), or, if even that would overflow (many equal
// values), once for the level-1 histogram and once for the selection itself.
constexpr int64_t kPoolMargin = 3;
constexpr int64_t kPoolRoom = 8;  // a block that finds kPoolRoom · k·B pooled entries before it marks the pool
                                  // incomplete (blocks running at once may take it a little over)

struct PoolEntry {
  int32_t row, f, bits;  // bits: the value's float32 pattern (positive: ordered like the value)
};

// Appends the entries of buf [n, F] (rows r0 + ...) with bits >= lo to out in row-major order, keeping at
// most `max_eq` (when >= 0) equal to lo; false (out partial) once out would exceed `room` entries.
bool CollectAbove(const float* buf, int64_t r0, int64_t n, int64_t F, int32_t lo, int64_t max_eq, int64_t room,
                  std::vector<PoolEntry>& out) {
  int64_t n_eq = 0;
  const i8 lo8 = (i8){} + lo;
  for (int64_t r = 0; r < n; ++r) {
    const float* a = buf + r * F;
    auto visit = [&](int64_t f) {
      const int32_t b = PositiveBits(a[f]);
      if (b < lo || b == 0) return true;
      if (b == lo && max_eq >= 0 && n_eq++ >= max_eq) return true;
      if ((int64_t)out.size() >= room) return false;
      out.push_back({(int32_t)(r0 + r), (int32_t)f, b});
      return true;
    };
    int64_t f = 0;
    for (; f + 16 <= F; f += 16)
      if (Any((LoadV<i8>(a + f) >= lo8) | (LoadV<i8>(a + f + 8) >= lo8)))
        for (int x = 0; x < 16; ++x)
          if (!visit(f + x)) return false;
    for (; f < F; ++f)
      if (!visit(f)) return false;
  }
  return true;
}

// priv [nt, kBins] summed over the team into int64 bins (those >= `valid` left 0), on one thread.
std::vector<int64_t> SumHistograms(const std::vector<int32_t>& priv, int nt, int64_t valid) {
  std::vector<int64_t> out(kBins, 0);
  for (int u = 0; u < nt; ++u)
    for (int64_t key = 0; key < valid; ++key) out[key] += priv[(int64_t)u * kBins + key];
  return out;
}

// The largest bin h whose suffix count Σ_{h' >= h} hist[h'] reaches `need` (>= 1), with above = the
// suffix count of h + 1; -1 if the whole histogram holds fewer.
int64_t TopBin(const int64_t* hist, int64_t need, int64_t& above) {
  int64_t acc = 0;
  for (int64_t h = kBins - 1; h >= 0; --h) {
    if (acc + hist[h] >= need) {
      above = acc;
      return h;
    }
    acc += hist[h];
  }
  above = acc;
  return -1;
}

// The threshold of select_batchtopk: its bits t and how many entries equal to it are taken.
struct Threshold {
  int32_t bits;
  int64_t need;
};

// Chunked ELL written by a kernel: row [n_chunks], idx [n_chunks, size], the values at the slots.
struct EllOut {
  int32_t *row, *idx;
  float* val;
  int64_t n_chunks, size;
};

// Writes the pool's entries for which take(entry) holds (called once per entry, in pool order) as
// chunked ELL: row r's entries, in pool order (row-major: latents ascending), fill the chunks from
// chunk_start[r] = Σ_{r' < r} ceil(taken[r'] / size) on; entries past the last chunk are dropped.
template <typename Take>
void EmitCodes(const std::vector<PoolEntry>& pool, Take take_fn, int64_t R, const EllOut& o) {
  std::vector<int64_t> taken(R, 0);
  std::vector<uint8_t> take(pool.size());
  for (size_t i = 0; i < pool.size(); ++i) {
    take[i] = take_fn(pool[i]);
    taken[pool[i].row] += take[i];
  }
  std::vector<int32_t> chunk_start(R);
  int64_t acc = 0;
  for (int64_t r = 0; r < R; ++r) {
    chunk_start[r] = (int32_t)std::min<int64_t>(acc, INT32_MAX);
    acc += (taken[r] + o.size - 1) / o.size;
  }
  const int64_t total = o.n_chunks * o.size;
  std::fill(o.idx, o.idx + total, -1);
  std::fill(o.val, o.val + total, 0.0f);
  std::vector<int64_t> next(R, 0);
  for (size_t i = 0; i < pool.size(); ++i) {
    if (!take[i]) continue;
    const PoolEntry& e = pool[i];
    const int64_t p = (int64_t)chunk_start[e.row] * o.size + next[e.row]++;
    if (p >= total) continue;  // as compact: writes past the end are dropped
    o.idx[p] = e.f;
    std::memcpy(o.val + p, &e.bits, 4);
  }
  ChunkOwners(taken.data(), chunk_start.data(), R, o.n_chunks, o.size, o.row);
}

// Runs body(block, r0, n, buf) over the row blocks, each encoded into the thread's buffer.
template <typename Body>
void ForEncodedBlocks(const float* x, const float* w, const float* b, int64_t R, int64_t d, int64_t F, Body body) {
  ForRowBlocks(R, F, true, [&](int64_t r0, int64_t n, float* buf) {
    EncodeBlock(x, w, b, r0, n, d, F, buf);
    body(r0 / EncodeBlockRows(F), r0, n, buf);
  });
}

// The guess of pass 1: the level-0 bin above which the sampled entries (histograms priv [nt, kBins], a
// `share` of all entries) hold `margin` times their share of kb, as the bits of the bin's lowest value (1 if none).
int32_t GuessThreshold(const std::vector<int32_t>& priv, int nt, double share, int64_t kb,
                       double margin = kPoolMargin) {
  const std::vector<int64_t> sample = SumHistograms(priv, nt, kBins / 2);
  const int64_t want = std::max<int64_t>(1, (int64_t)std::ceil(margin * (double)kb * share));
  int64_t above;
  const int64_t g = TopBin(sample.data(), want, above);
  return g > 0 ? (int32_t)(g << 16) : 1;
}

// The threshold from a pool that holds every entry of level-0 bin hi and above (above_hi: the count of
// those above bin hi): level 1 of bin hi, from the pool.
Threshold ThresholdFromPool(const std::vector<PoolEntry>& pool, int64_t hi, int64_t above_hi, int64_t kb) {
  std::vector<int64_t> low(kBins, 0);
  for (const PoolEntry& e : pool)
    if ((e.bits >> 16) == hi) ++low[e.bits & 0xFFFF];
  int64_t above_lo = 0;
  const int64_t lo = TopBin(low.data(), kb - above_hi, above_lo);
  return Threshold{(int32_t)((hi << 16) | lo), kb - above_hi - above_lo};
}

// The codes: the pool's entries above th and the first th.need equal to it; smallest = th's bits.
void EmitSelection(const std::vector<PoolEntry>& pool, Threshold th, int64_t R, const EllOut& o, float* smallest) {
  int64_t n_eq = 0;
  EmitCodes(pool, [&](const PoolEntry& e) { return e.bits > th.bits || (e.bits == th.bits && n_eq++ < th.need); },
            R, o);
  std::memcpy(smallest, &th.bits, 4);
}

// encode_batchtopk with the screen, in one pass over the column groups: a guess of the threshold from
// each thread's first block of group 0 (the level-0 histogram of its approximate values), then per block
// the candidates for the pool (approx >= guess − beta) and for aux-k, all refined at the end. The pool is
// every entry >= guess; when it holds at least kb of them, the threshold is among them (the level-0 and
// level-1 histograms of the pool alone), and no histogram of the whole batch is needed. The guess asks
// for kScreenMargin times the sample's share of kb: each extra candidate costs a dot product, a guess
// above the threshold a whole unscreened pass (the sample: 512 rows of group 0 at B 4096, F 24576). Returns 1 when it
// selected (th, and pool row-major; aux-k written); 0 when the screen cannot be used; -1 when it ran
// but the candidates would not fit or the guess was above the threshold: then the unscreened passes run.
constexpr double kScreenMargin = 1.5;

int ScreenedBatchPass(const float* x, const float* w, const float* b, int64_t R, int64_t d, int64_t F, int64_t kb,
                      const RowTopk& aux, int32_t mode, int32_t* aux_idx, float* aux_val,
                      std::vector<PoolEntry>& pool, Threshold& th) {
  if (kb <= 0) return 0;
  const std::vector<int32_t> lanes_all = MaskLanes(nullptr, F),
                             lanes_aux = MaskLanes(reinterpret_cast<const bool*>(aux.mask), F);
  const ColumnGroups groups = SplitColumns(d, F);
  const int64_t nb = groups.blocks(R);
  const int64_t cap = kPoolRoom * kb + (2 * aux.k + 64) * R;
  const int nt_max = omp_get_max_threads();
  std::vector<int32_t> priv((int64_t)nt_max * kBins, 0);
  std::vector<TopkScratch> scratch;
  for (int u = 0; u < nt_max; ++u) scratch.emplace_back(F);
  RunningBound bound_aux(aux, R, !aux.few);  // aux-k's few latents: SelectFewExactly instead
  std::vector<std::vector<Candidate>> lists(groups.count * nb);
  std::atomic<int64_t> found{0}, sampled{0};
  int32_t guess = 1;
  float guess_value = 0;
  auto sample = [&](const ApproxRows& z) {
    HistogramLevel0(z.a, 0, z.n * z.nc, priv.data() + (int64_t)z.t * kBins);
    sampled += z.n * z.nc;
  };
  auto decide = [&] {
    guess = GuessThreshold(priv, nt_max, (double)sampled.load() / ((double)R * (double)F), kb, kScreenMargin);
    std::memcpy(&guess_value, &guess, 4);
  };
  auto visit = [&](const ApproxRows& z) {
    std::vector<Candidate>& out = lists[z.g * nb + z.q];
    auto pool_floor = [&](int64_t, const float*, const float*, float beta) { return guess_value - beta; };
    ScanBlock(z, pool_floor, lanes_all.data(), bound_aux, lanes_aux.data(), scratch[z.t], out);
    return (found += (int64_t)out.size()) <= cap;
  };
  const Screened ran = ForScreenedBlocks(x, w, b, R, d, F, mode, groups, visit, true, sample, decide);
  if (ran == Screened::kUnusable) return 0;
  if (ran == Screened::kStopped) return -1;
  std::vector<Candidate> c = MergeGroups(lists, groups.count, nb, [&](const Candidate& e) {
    return e.approx >= guess_value - e.v || (lanes_aux[e.f] && e.approx >= bound_aux.Floor(e.row, e.v));
  });
  Refine(c, x, w, b, d, F);
  pool.clear();
  std::vector<int64_t> hist(kBins, 0);
  for (const Candidate& e : c)
    if (PositiveBits(e.v) >= guess) {
      pool.push_back({e.row, e.f, PositiveBits(e.v)});
      ++hist[Level0Key(e.v)];
    }
  int64_t above_hi = 0;
  const int64_t hi = TopBin(hist.data(), kb, above_hi);
  if (hi < 0 && guess > 1) return -1;  // fewer than kb >= guess, and maybe some below it
  th = hi >= 0 ? ThresholdFromPool(pool, hi, above_hi, kb) : Threshold{0, 0};  // else: every positive entry
  if (aux.few)
    SelectFewExactly(x, w, b, R, d, F, aux, scratch.data(), aux_idx, aux_val);
  else
    ForCandidateRows(c, R, [&](int t, int64_t r, const Candidate* rc, int64_t n) {
      SelectCandidates(rc, n, aux, scratch[t], aux_idx + r * aux.size, aux_val + r * aux.size);
    });
  return 1;
}

// Returns the number of encoder passes run (1 when the guess held).
// `screened`: whether a screened pass ran (it selected if the passes are 1).
int32_t EncodeBatchTopk(const float* x, const float* w, const float* b, int64_t R, int64_t d, int64_t F, int64_t kb,
                        const bool* mask_aux, int64_t k_aux, const EllOut& o, int32_t* aux_idx, float* aux_val,
                        int64_t size_aux, float* smallest, int32_t mode, bool& screened) {
  const RowTopk aux(mask_aux, F, k_aux, size_aux);
  int32_t passes = 1;
  {
    std::vector<PoolEntry> pool;
    Threshold th{0, 0};
    const int tried = ScreenedBatchPass(x, w, b, R, d, F, kb, aux, mode, aux_idx, aux_val, pool, th);
    screened = tried != 0;
    if (tried == 1) {
      EmitSelection(pool, th, R, o, smallest);
      return passes;
    }
    passes += tried < 0;
  }
  const int64_t blk = EncodeBlockRows(F), nb = (R + blk - 1) / blk, cap = std::max<int64_t>(kPoolRoom * kb, 1024);
  const int nt_max = omp_get_max_threads();
  std::vector<int32_t> priv((int64_t)nt_max * kBins, 0);
  std::vector<TopkScratch> scratch;
  for (int u = 0; u < nt_max; ++u) scratch.emplace_back(F);
  std::vector<std::vector<PoolEntry>> blocks(nb);
  std::atomic<int64_t> pooled{0};
  std::atomic<bool> overflow{false};
  int32_t guess = 1;
  SerialBlas();
  const FpMode fp;
  // Pass 1: histogram, aux-k and the pool above the guess.
#pragma omp parallel
  {
    FpScope scope(fp);
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    std::vector<float> buf(blk * F);
    int32_t* h = priv.data() + (int64_t)t * kBins;
    auto encode = [&](int64_t q) {
      const int64_t r0 = q * blk, n = std::min(blk, R - r0);
      EncodeBlock(x, w, b, r0, n, d, F, buf.data());
      HistogramLevel0(buf.data(), 0, n * F, h);
      for (int64_t r = r0; r < r0 + n; ++r) {
        const float* a = buf.data() + (r - r0) * F;
        aux.Run(a, scratch[t], aux_idx + r * size_aux);
        ValuesAt(a, aux_idx + r * size_aux, size_aux, aux_val + r * size_aux);
      }
    };
    auto collect = [&](int64_t q) {
      const int64_t r0 = q * blk, n = std::min(blk, R - r0);
      const int64_t room = cap - pooled.load();
      if (overflow.load() || room <= 0 ||
          !CollectAbove(buf.data(), r0, n, F, guess, -1, room, blocks[q]))
        overflow = true;
      pooled += (int64_t)blocks[q].size();
    };
    const int64_t first = std::min<int64_t>(nt, nb);
    if (t < first) encode(t);
#pragma omp barrier
#pragma omp single
    guess = GuessThreshold(priv, nt, (double)std::min(R, first * blk) / (double)R, kb);
    if (t < first) collect(t);
#pragma omp for schedule(dynamic, 1)
    for (int64_t q = first; q < nb; ++q) {
      encode(q);
      collect(q);
    }
  }
  const std::vector<int64_t> hist = SumHistograms(priv, nt_max, kBins / 2);
  int64_t above_hi = 0;
  const int64_t hi = kb > 0 ? TopBin(hist.data(), kb, above_hi) : kBins - 1;
  const bool enough = kb > 0 && hi >= 0;
  const int32_t lo_needed = enough ? (int32_t)(hi << 16) : 1;  // every entry the selection may take
  bool exact = false;  // the pool's ties already trimmed (the third pass)
  Threshold th{0, 0};
  if (kb <= 0) {
    th = Threshold{-1, 0};  // as the reference: no entry taken, the threshold's bits all ones
  } else if (overflow.load() || guess > lo_needed) {
    for (auto& v : blocks) v.clear();
    const int64_t ge_hi = above_hi + (enough ? hist[hi] : 0);
    if (!enough || ge_hi <= cap) {
      ForEncodedBlocks(x, w, b, R, d, F, [&](int64_t q, int64_t r0, int64_t n, float* buf) {
        CollectAbove(buf, r0, n, F, lo_needed, -1, ge_hi + 1, blocks[q]);
      });
      passes += 1;
    } else {  // the level-1 histogram of bin hi, then the selection with its ties trimmed per block
      std::fill(priv.begin(), priv.end(), 0);
      ForEncodedBlocks(x, w, b, R, d, F, [&](int64_t, int64_t, int64_t n, float* buf) {
        HistogramLevel1(buf, 0, n * F, hi, priv.data() + (int64_t)omp_get_thread_num() * kBins);
      });
      const std::vector<int64_t> low = SumHistograms(priv, nt_max, kBins);
      int64_t above_lo = 0;
      const int64_t lo = TopBin(low.data(), kb - above_hi, above_lo);
      th = Threshold{(int32_t)((hi << 16) | lo), kb - above_hi - above_lo};
      ForEncodedBlocks(x, w, b, R, d, F, [&](int64_t q, int64_t r0, int64_t n, float* buf) {
        CollectAbove(buf, r0, n, F, th.bits, th.need, kb + th.need + 1, blocks[q]);
      });
      passes += 2;
      exact = true;
    }
  }
  const std::vector<PoolEntry> pool = Concatenate(blocks);
  if (enough && !exact) th = ThresholdFromPool(pool, hi, above_hi, kb);
  EmitSelection(pool, th, R, o, smallest);
  return passes;
}

// ---------------------------------------------------------------------------------------------
// encode_above: the entries of pre = x·w + b above a per-latent threshold thr [F] (jumprelu's band) as
// chunked ELL with their values, and each row's count: select_above(pre, thr) with count_above's counts
// (see ops.encode_above), without holding pre. Each row block's entries are pooled while in cache, at
// most n_chunks · size in all (more cannot fit: the caller then takes the dense loss), and written out at
// the end.
void EncodeAbove(const float* x, const float* w, const float* b, const float* thr, int64_t R, int64_t d, int64_t F,
                 const EllOut& o, int32_t* counts) {
  const int64_t nb = (R + EncodeBlockRows(F) - 1) / EncodeBlockRows(F), cap = o.n_chunks * o.size;
  std::vector<std::vector<PoolEntry>> blocks(nb);
  std::atomic<int64_t> pooled{0};
  ForEncodedBlocks(x, w, b, R, d, F, [&](int64_t q, int64_t r0, int64_t n, float* buf) {
    std::vector<PoolEntry>& out = blocks[q];
    const int64_t room = cap - pooled.load();
    for (int64_t r = 0; r < n; ++r) {
      const float* a = buf + r * F;
      int32_t cnt = 0;
      auto visit = [&](int64_t f) {
        if (!(a[f] > thr[f])) return;
        ++cnt;
        if ((int64_t)out.size() < room) out.push_back({(int32_t)(r0 + r), (int32_t)f, LoadV<int32_t>(a + f)});
      };
      int64_t f = 0;
      for (; f + 16 <= F; f += 16)
        if (Any((Load8(a + f) > Load8(thr + f)) | (Load8(a + f + 8) > Load8(thr + f + 8))))
          for (int z = 0; z < 16; ++z) visit(f + z);
      for (; f < F; ++f) visit(f);
      counts[r0 + r] = cnt;
    }
    pooled += (int64_t)out.size();
  });
  EmitCodes(Concatenate(blocks), [](const PoolEntry&) { return true; }, R, o);
}

// ---------------------------------------------------------------------------------------------
// sum_squares: Σ (a[r] − mean)² over the rows of a [R, d], each row in float32 lanes, rows summed in
// double. One pass over a, nothing written: XLA's CPU reduction of an expression such as (a − mean)²
// first writes it out whole (its tree reduction cannot fuse its producer), a [b, d] buffer per sum.
float SumSquares(const float* a, const float* mean, int64_t R, int64_t d) {
  double total = 0;
  const FpMode fp;
#pragma omp parallel reduction(+ : total)
  {
    FpScope scope(fp);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < R; ++r) {
      const float* x = a + r * d;
      f8 acc = {};
      int64_t j = 0;
      for (; j + 8 <= d; j += 8) {
        const f8 e = Load8(x + j) - Load8(mean + j);
        acc += e * e;
      }
      float tail = 0;
      for (; j < d; ++j) tail += (x[j] - mean[j]) * (x[j] - mean[j]);
      total += (double)Sum8(acc) + (double)tail;
    }
  }
  return (float)total;
}

// ---------------------------------------------------------------------------------------------
// reconstruction_errors: e = centred − decoded, written over decoded, and a = e − aux_hat over aux_hat
// (when aux_hat has rows), with sums [d + 2] = (Σ e², Σ a², Σ_rows e): each row's squares in float32
// lanes, rows and column sums in double. One pass, nothing else written: the loss's [b, d] arrays are
// centred, these two, and their gradients (scale_shift, written over them in turn).
void ReconstructionErrors(const float* centred, const float* decoded, const float* aux_hat, float* e, float* a,
                          int64_t R, int64_t d, bool aux, float* sums) {
  const int nt = omp_get_max_threads();
  std::vector<double> part((int64_t)nt * (d + 2), 0.0);
  const FpMode fp;
#pragma omp parallel
  {
    FpScope scope(fp);
    double* p = part.data() + (int64_t)omp_get_thread_num() * (d + 2);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < R; ++r) {
      const int64_t o = r * d;
      f8 se = {}, sa = {};
      int64_t j = 0;
      for (; j + 8 <= d; j += 8) {
        const f8 ev = Load8(centred + o + j) - Load8(decoded + o + j);
        Store8(e + o + j, ev);
        se += ev * ev;
        if (aux) {
          const f8 av = ev - Load8(aux_hat + o + j);
          Store8(a + o + j, av);
          sa += av * av;
        }
        for (int q = 0; q < 8; ++q) p[2 + j + q] += (double)ev[q];
      }
      double tail_e = 0, tail_a = 0;
      for (; j < d; ++j) {
        const float ev = centred[o + j] - decoded[o + j];
        e[o + j] = ev;
        tail_e += (double)ev * ev;
        if (aux) {
          const float av = ev - aux_hat[o + j];
          a[o + j] = av;
          tail_a += (double)av * av;
        }
        p[2 + j] += (double)ev;
      }
      p[0] += (double)Sum8(se) + tail_e;
      p[1] += (double)Sum8(sa) + tail_a;
    }
  }
  for (int64_t j = 0; j < d + 2; ++j) {
    double total = 0;
    for (int t = 0; t < nt; ++t) total += part[(int64_t)t * (d + 2) + j];
    sums[j] = (float)total;
  }
}

// scale_shift: out = s · a + v (a [R, d], v [d]), meant to be written over a.
void ScaleShift(const float* a, float s, const float* v, float* out, int64_t R, int64_t d) {
  const FpMode fp;
#pragma omp parallel
  {
    FpScope scope(fp);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < R; ++r)
      for (int64_t j = 0; j < d; ++j) out[r * d + j] = s * a[r * d + j] + v[j];
  }
}

// ---------------------------------------------------------------------------------------------
// The encoders' scratch (candidate lists, pools: many blocks under glibc's mmap threshold) is freed into
// the threads' malloc arenas, which keep its pages: resident through the rest of the step, when XLA's
// buffers peak. Handing them back costs about a millisecond (and their page faults in the next step).
void ReleaseFreedMemory() {
#if defined(__GLIBC__)
  malloc_trim(0);
#endif
}

// ---------------------------------------------------------------------------------------------
// FFI bindings. Shapes are checked by rank in the bindings; sizes come from the buffers.

ffi::Error GatherSumFfi(ffi::Buffer<ffi::S32, 1> row, ffi::Buffer<ffi::S32, 2> idx, ffi::Buffer<ffi::F32, 2> val,
                        ffi::Buffer<ffi::F32, 2> w, ffi::ResultBuffer<ffi::F32, 2> out) {
  const auto id = idx.dimensions(), wd = w.dimensions(), od = out->dimensions();
  if (wd[1] != od[1] || (wd[0] == 0 && id[0] * id[1] > 0))
    return ffi::Error::InvalidArgument("gather_sum: w [F, d] and out [n_rows, d] disagree");
  GatherSum(row.typed_data(), idx.typed_data(), val.typed_data(), w.typed_data(), out->typed_data(), id[0],
            id[1], wd[0], wd[1], od[0]);
  return ffi::Error::Success();
}

ffi::Error GatherDotFfi(ffi::Buffer<ffi::S32, 1> row, ffi::Buffer<ffi::S32, 2> idx, ffi::Buffer<ffi::F32, 2> y,
                        ffi::Buffer<ffi::F32, 2> w, ffi::ResultBuffer<ffi::F32, 2> out) {
  const auto id = idx.dimensions(), yd = y.dimensions(), wd = w.dimensions();
  if (yd[1] != wd[1]) return ffi::Error::InvalidArgument("gather_dot: y and w differ in d");
  GatherDot(row.typed_data(), idx.typed_data(), y.typed_data(), w.typed_data(), out->typed_data(), id[0], id[1],
            yd[0], wd[0], wd[1]);
  return ffi::Error::Success();
}

// scatter_rows (out [F, d]) and scatter_cols (out [d, F]).
template <bool kTransposed>
ffi::Error ScatterFfi(ffi::Buffer<ffi::S32, 1> row, ffi::Buffer<ffi::S32, 2> idx, ffi::Buffer<ffi::F32, 2> val,
                      ffi::Buffer<ffi::F32, 2> y, ffi::ResultBuffer<ffi::F32, 2> out) {
  const auto id = idx.dimensions(), yd = y.dimensions(), od = out->dimensions();
  const int64_t F = od[kTransposed ? 1 : 0], d = od[kTransposed ? 0 : 1];
  if (yd[1] != d) return ffi::Error::InvalidArgument("scatter_rows / scatter_cols: y and out differ in d");
  ScatterRows(row.typed_data(), idx.typed_data(), val.typed_data(), y.typed_data(), out->typed_data(), id[0],
              id[1], yd[0], F, d, kTransposed);
  return ffi::Error::Success();
}

ffi::Error TopkRowsFfi(ffi::Buffer<ffi::F32, 2> acts, ffi::BufferR0<ffi::S32> k, ffi::Buffer<ffi::PRED, 1> mask,
                       ffi::ResultBuffer<ffi::S32, 2> out) {
  const auto ad = acts.dimensions(), od = out->dimensions();
  if (mask.dimensions()[0] != ad[1]) return ffi::Error::InvalidArgument("topk_rows: mask is not [F]");
  TopkRows(acts.typed_data(), mask.typed_data(), k.typed_data()[0], out->typed_data(), ad[0], ad[1], od[1]);
  return ffi::Error::Success();
}

ffi::Error EncodeFfi(ffi::Buffer<ffi::F32, 2> x, ffi::Buffer<ffi::F32, 2> w, ffi::Buffer<ffi::F32, 1> b,
                     ffi::ResultBuffer<ffi::F32, 2> out) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd[1] != wd[0] || b.dimensions()[0] != wd[1])
    return ffi::Error::InvalidArgument("encode: x [R, d], w [d, F] and b [F] disagree");
  Encode(x.typed_data(), w.typed_data(), b.typed_data(), out->typed_data(), xd[0], xd[1], wd[1]);
  return ffi::Error::Success();
}

ffi::Error EncodeHistogramFfi(ffi::Buffer<ffi::F32, 2> x, ffi::Buffer<ffi::F32, 2> w, ffi::Buffer<ffi::F32, 1> b,
                              ffi::ResultBuffer<ffi::F32, 2> out, ffi::ResultBuffer<ffi::S32, 1> hist) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd[1] != wd[0] || b.dimensions()[0] != wd[1] || hist->dimensions()[0] != kBins)
    return ffi::Error::InvalidArgument("encode_histogram: x [R, d], w [d, F], b [F] and hist [65536] disagree");
  EncodeHistogram(x.typed_data(), w.typed_data(), b.typed_data(), out->typed_data(), hist->typed_data(), xd[0],
                  xd[1], wd[1]);
  return ffi::Error::Success();
}

ffi::Error EncodeTopkFfi(ffi::Buffer<ffi::F32, 2> x, ffi::Buffer<ffi::F32, 2> w, ffi::Buffer<ffi::F32, 1> b,
                         ffi::Buffer<ffi::PRED, 1> mask, ffi::BufferR0<ffi::S32> k, ffi::Buffer<ffi::PRED, 1> mask_aux,
                         ffi::BufferR0<ffi::S32> k_aux, ffi::ResultBuffer<ffi::S32, 2> idx,
                         ffi::ResultBuffer<ffi::F32, 2> val, ffi::ResultBuffer<ffi::S32, 2> aux_idx,
                         ffi::ResultBuffer<ffi::F32, 2> aux_val, int32_t screen) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  const int64_t F = wd[1];
  if (xd[1] != wd[0] || b.dimensions()[0] != F || mask.dimensions()[0] != F || mask_aux.dimensions()[0] != F)
    return ffi::Error::InvalidArgument("encode_topk: x [R, d], w [d, F], b, mask and mask_aux [F] disagree");
  const bool screened =
      EncodeTopk(x.typed_data(), w.typed_data(), b.typed_data(), xd[0], xd[1], F, mask.typed_data(),
                 k.typed_data()[0], idx->dimensions()[1], mask_aux.typed_data(), k_aux.typed_data()[0],
                 aux_idx->dimensions()[1], screen, idx->typed_data(), val->typed_data(), aux_idx->typed_data(),
                 aux_val->typed_data());
  ReleaseFreedMemory();
  return ScreenResult("encode_topk", screen, screened);
}

ffi::Error EncodeBatchTopkFfi(ffi::Buffer<ffi::F32, 2> x, ffi::Buffer<ffi::F32, 2> w, ffi::Buffer<ffi::F32, 1> b,
                              ffi::BufferR0<ffi::S32> kb, ffi::Buffer<ffi::PRED, 1> mask_aux,
                              ffi::BufferR0<ffi::S32> k_aux, ffi::ResultBuffer<ffi::S32, 1> row,
                              ffi::ResultBuffer<ffi::S32, 2> idx, ffi::ResultBuffer<ffi::F32, 2> val,
                              ffi::ResultBuffer<ffi::S32, 2> aux_idx, ffi::ResultBuffer<ffi::F32, 2> aux_val,
                              ffi::ResultBufferR0<ffi::F32> smallest, ffi::ResultBufferR0<ffi::S32> passes,
                              int32_t screen) {
  const auto xd = x.dimensions(), wd = w.dimensions(), id = idx->dimensions(), ad = aux_idx->dimensions();
  const int64_t R = xd[0], F = wd[1];
  if (xd[1] != wd[0] || b.dimensions()[0] != F || mask_aux.dimensions()[0] != F || row->dimensions()[0] != id[0] ||
      ad[0] != R || id[1] < 1)
    return ffi::Error::InvalidArgument("encode_batchtopk: x [R, d], w [d, F], b, mask_aux [F], codes disagree");
  const EllOut o{row->typed_data(), idx->typed_data(), val->typed_data(), id[0], id[1]};
  bool screened = false;
  passes->typed_data()[0] = EncodeBatchTopk(x.typed_data(), w.typed_data(), b.typed_data(), R, xd[1], F,
                                            kb.typed_data()[0], mask_aux.typed_data(), k_aux.typed_data()[0], o,
                                            aux_idx->typed_data(), aux_val->typed_data(), ad[1],
                                            smallest->typed_data(), screen, screened);
  ReleaseFreedMemory();
  return ScreenResult("encode_batchtopk", screen, screened);
}

ffi::Error EncodeAboveFfi(ffi::Buffer<ffi::F32, 2> x, ffi::Buffer<ffi::F32, 2> w, ffi::Buffer<ffi::F32, 1> b,
                          ffi::Buffer<ffi::F32, 1> thr, ffi::ResultBuffer<ffi::S32, 1> row,
                          ffi::ResultBuffer<ffi::S32, 2> idx, ffi::ResultBuffer<ffi::F32, 2> val,
                          ffi::ResultBuffer<ffi::S32, 1> counts) {
  const auto xd = x.dimensions(), wd = w.dimensions(), id = idx->dimensions();
  const int64_t R = xd[0], F = wd[1];
  if (xd[1] != wd[0] || b.dimensions()[0] != F || thr.dimensions()[0] != F || row->dimensions()[0] != id[0] ||
      counts->dimensions()[0] != R || id[1] < 1)
    return ffi::Error::InvalidArgument("encode_above: x [R, d], w [d, F], b, thr [F] and the codes disagree");
  const EllOut o{row->typed_data(), idx->typed_data(), val->typed_data(), id[0], id[1]};
  EncodeAbove(x.typed_data(), w.typed_data(), b.typed_data(), thr.typed_data(), R, xd[1], F, o,
              counts->typed_data());
  ReleaseFreedMemory();
  return ffi::Error::Success();
}

ffi::Error HistogramFfi(ffi::Buffer<ffi::F32> acts, ffi::BufferR0<ffi::S32> prefix,
                        ffi::ResultBuffer<ffi::S32, 1> out, int32_t level) {
  Histogram(acts.typed_data(), (int64_t)acts.element_count(), prefix.typed_data()[0], level, out->typed_data());
  return ffi::Error::Success();
}

ffi::Error RowCountsFfi(ffi::Buffer<ffi::F32, 2> acts, ffi::Buffer<ffi::F32, 1> thr,
                        ffi::ResultBuffer<ffi::S32, 1> above, ffi::ResultBuffer<ffi::S32, 1> equal) {
  const auto ad = acts.dimensions();
  RowCounts(acts.typed_data(), thr.typed_data(), above->typed_data(), equal->typed_data(), ad[0], ad[1]);
  return ffi::Error::Success();
}

ffi::Error CompactFfi(ffi::Buffer<ffi::F32, 2> acts, ffi::Buffer<ffi::F32, 1> thr, ffi::Buffer<ffi::S32, 1> quota,
                      ffi::Buffer<ffi::S32, 1> chunk_start, ffi::ResultBuffer<ffi::S32, 1> row,
                      ffi::ResultBuffer<ffi::S32, 2> idx) {
  const auto ad = acts.dimensions(), id = idx->dimensions();
  Compact(acts.typed_data(), thr.typed_data(), quota.typed_data(), chunk_start.typed_data(), row->typed_data(),
          idx->typed_data(), ad[0], ad[1], id[0], id[1]);
  return ffi::Error::Success();
}

// Adam's hyper-parameters of one SAE, as jaxsae.kernels.reference.adam lays them out.
struct AdamHyper {
  float step_size, b1, one_minus_b1, b2, one_minus_b2, bc1, bc2, eps, g_norm, max_norm;
};
constexpr int64_t kAdamHyper = 10;

// optax's clip_by_global_norm (when kClip) -> scale_by_adam -> scale_by_schedule -> apply_updates on one
// element, in optax's float32 operation order.
template <bool kClip>
inline void AdamElement(float& p, float& m, float& v, float g, const AdamHyper& h) {
  if (kClip) g = (g / h.g_norm) * h.max_norm;
  m = h.one_minus_b1 * g + h.b1 * m;
  v = h.one_minus_b2 * (g * g) + h.b2 * v;
  p = p + h.step_size * ((m / h.bc1) / (std::sqrt(v / h.bc2) + h.eps));
}

// One row of W_dec [F, d]: the gradient's component along the (unit) row removed, Adam, the row
// renormalised (jaxsae.step.project_out_parallel, optax, jaxsae.sae.unit_rows).
template <bool kClip>
void AdamRow(float* __restrict p, float* __restrict m, float* __restrict v, const float* __restrict g, int64_t d,
             const AdamHyper& h) {
  const float dot = Dot1(g, p, d);
#pragma omp simd
  for (int64_t j = 0; j < d; ++j) AdamElement<kClip>(p[j], m[j], v[j], g[j] - dot * p[j], h);
  const float norm = std::max(std::sqrt(Dot1(p, p, d)), 1e-12f);
#pragma omp simd
  for (int64_t j = 0; j < d; ++j) p[j] = p[j] / norm;
}

// Adam on n contiguous elements (vectorised: the four arrays never overlap).
template <bool kClip>
void AdamSpan(float* __restrict p, float* __restrict m, float* __restrict v, const float* __restrict g, int64_t n,
              const AdamHyper& h) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) AdamElement<kClip>(p[j], m[j], v[j], g[j], h);
}

// Adam in place over S SAEs' [R, C] slices; flags [S, 2] = (update is finite, clip). An SAE whose update
// is not finite keeps its values. `rows`: W_dec's row projection and renormalisation.
void Adam(float* p, float* m, float* v, const float* g, const float* hyper, const int32_t* flags, int64_t S,
          int64_t R, int64_t C, bool rows) {
  for (int64_t s = 0; s < S; ++s) {
    if (!flags[2 * s]) continue;
    AdamHyper h;
    std::memcpy(&h, hyper + s * kAdamHyper, sizeof(h));
    const bool clip = flags[2 * s + 1] != 0;
    const int64_t off = s * R * C;
    float *ps = p + off, *ms = m + off, *vs = v + off;
    const float* gs = g + off;
    if (rows) {
#pragma omp parallel for schedule(static)
      for (int64_t r = 0; r < R; ++r) {
        const int64_t o = r * C;
        clip ? AdamRow<true>(ps + o, ms + o, vs + o, gs + o, C, h) : AdamRow<false>(ps + o, ms + o, vs + o, gs + o, C, h);
      }
    } else {
      const int64_t n = R * C;
#pragma omp parallel
      {
        int64_t i0, i1;
        Split(n, i0, i1);
        auto span = clip ? AdamSpan<true> : AdamSpan<false>;
        span(ps + i0, ms + i0, vs + i0, gs + i0, i1 - i0, h);
      }
    }
  }
}

using F32Cube = ffi::Buffer<ffi::F32, 3>;
// The gradient of W_dec ([F, d], rows) or W_enc ([d, F], transposed) scattered from two code sets (the
// codes and aux-k's) and applied by Adam tile by tile: the gradient is never held whole. Per SAE s of S:
// param, mu, nu [S, ...]; codes [S, C, K]; set a reads y_a [S, B, d], set b y_b [S, B, d].
void ScatterAdam(float* p, float* m, float* v, const Codes* a, const Codes* b, const float* y_a, const float* y_b,
                 int64_t B, const float* hyper, const int32_t* flags, int64_t S, int64_t F, int64_t d,
                 bool transposed) {
  for (int64_t s = 0; s < S; ++s) {
    if (!flags[2 * s]) continue;
    AdamHyper h;
    std::memcpy(&h, hyper + s * kAdamHyper, sizeof(h));
    const Codes sets[2] = {a[s], b[s]};
    const int64_t off = s * F * d;
    float *ps = p + off, *ms = m + off, *vs = v + off;
    const RowSource ys{y_a + s * B * d, y_b + s * B * d, B};
    const LatentSums ls = BuildSums(sets, 2, B, F, ys, d);
    if (transposed) {
      ForLatentTiles(ls, ys, F, d, kColumnTile, 4, true, [&](int64_t fa, int64_t n, const float* buf) {
        for (int64_t x = 0; x < d; ++x) {
          const int64_t o = x * F + fa;
          AdamSpan<false>(ps + o, ms + o, vs + o, buf + x * n, n, h);
        }
      });
    } else {
      ForLatentTiles(ls, ys, F, d, 1, 4, false, [&](int64_t f, int64_t, const float* buf) {
        AdamRow<false>(ps + f * d, ms + f * d, vs + f * d, buf, d, h);
      });
    }
  }
}


using I32Cube = ffi::Buffer<ffi::S32, 3>;

// Unaliased outputs (XLA could not reuse the inputs) start as copies of the inputs.
void CopyUnaliased(const F32Cube& p, const F32Cube& m, const F32Cube& v, ffi::ResultBuffer<ffi::F32, 3>& p_out,
                   ffi::ResultBuffer<ffi::F32, 3>& m_out, ffi::ResultBuffer<ffi::F32, 3>& v_out) {
  const std::pair<const float*, float*> pairs[] = {{p.typed_data(), p_out->typed_data()},
                                                   {m.typed_data(), m_out->typed_data()},
                                                   {v.typed_data(), v_out->typed_data()}};
  for (auto [in, out] : pairs)
    if (in != out) std::memcpy(out, in, p.element_count() * sizeof(float));
}

// (param, mu, nu [S, ., .], row_a [S, Ca], idx_a, val_a [S, Ca, Ka], row_b, idx_b, val_b, y_a, y_b [S, B, d],
// hyper [S, 10], flags [S, 2]) -> (param, mu, nu), meant to alias the inputs; set a reads y_a, set b y_b
// (the same buffer may be passed twice).
template <bool kTransposed>
ffi::Error ScatterAdamFfi(F32Cube p, F32Cube m, F32Cube v, ffi::Buffer<ffi::S32, 2> row_a, I32Cube idx_a,
                          F32Cube val_a, ffi::Buffer<ffi::S32, 2> row_b, I32Cube idx_b, F32Cube val_b, F32Cube y_a,
                          F32Cube y_b, ffi::Buffer<ffi::F32, 2> hyper, ffi::Buffer<ffi::S32, 2> flags,
                          ffi::ResultBuffer<ffi::F32, 3> p_out, ffi::ResultBuffer<ffi::F32, 3> m_out,
                          ffi::ResultBuffer<ffi::F32, 3> v_out) {
  const auto pd = p.dimensions(), yd = y_a.dimensions(), yb = y_b.dimensions(), ia = idx_a.dimensions(),
             ib = idx_b.dimensions();
  const int64_t S = pd[0], F = pd[kTransposed ? 2 : 1], d = pd[kTransposed ? 1 : 2];
  const int64_t B = yd[1];
  if (yd[0] != S || yd[2] != d || yb[0] != S || yb[1] != B || yb[2] != d || ia[0] != S || ib[0] != S ||
      row_a.dimensions()[1] != ia[1] || row_b.dimensions()[1] != ib[1] ||
      val_a.element_count() != idx_a.element_count() || val_b.element_count() != idx_b.element_count() ||
      hyper.dimensions()[0] != S || flags.dimensions()[0] != S || B <= 0)
    return ffi::Error::InvalidArgument("scatter_adam: param, codes, y_a, y_b [S, B, d], hyper and flags disagree");
  for (int64_t s = 0; s < S; ++s)
    if (flags.typed_data()[2 * s + 1]) return ffi::Error::InvalidArgument("scatter_adam: clipping needs the gradient");
  CopyUnaliased(p, m, v, p_out, m_out, v_out);
  std::vector<Codes> a(S), b(S);
  for (int64_t s = 0; s < S; ++s) {
    a[s] = Codes{row_a.typed_data() + s * ia[1], idx_a.typed_data() + s * ia[1] * ia[2],
                 val_a.typed_data() + s * ia[1] * ia[2], ia[1], ia[2], 0};
    b[s] = Codes{row_b.typed_data() + s * ib[1], idx_b.typed_data() + s * ib[1] * ib[2],
                 val_b.typed_data() + s * ib[1] * ib[2], ib[1], ib[2], B};
  }
  ScatterAdam(p_out->typed_data(), m_out->typed_data(), v_out->typed_data(), a.data(), b.data(), y_a.typed_data(),
              y_b.typed_data(), B, hyper.typed_data(), flags.typed_data(), S, F, d, kTransposed);
  return ffi::Error::Success();
}

// (param, mu, nu, grad [S, R, C], hyper [S, 10], flags [S, 2]) -> (param, mu, nu), meant to alias the inputs.
template <bool kRows>
ffi::Error AdamFfi(F32Cube p, F32Cube m, F32Cube v, F32Cube g, ffi::Buffer<ffi::F32, 2> hyper,
                   ffi::Buffer<ffi::S32, 2> flags, ffi::ResultBuffer<ffi::F32, 3> p_out,
                   ffi::ResultBuffer<ffi::F32, 3> m_out, ffi::ResultBuffer<ffi::F32, 3> v_out) {
  const auto pd = p.dimensions();
  const int64_t S = pd[0], n = p.element_count();
  if (m.element_count() != n || v.element_count() != n || g.element_count() != n ||
      hyper.dimensions()[0] != S || hyper.dimensions()[1] != kAdamHyper || flags.dimensions()[0] != S)
    return ffi::Error::InvalidArgument("adam: param, mu, nu, grad [S, R, C], hyper [S, 10], flags [S, 2] disagree");
  CopyUnaliased(p, m, v, p_out, m_out, v_out);
  Adam(p_out->typed_data(), m_out->typed_data(), v_out->typed_data(), g.typed_data(), hyper.typed_data(),
       flags.typed_data(), S, pd[1], pd[2], kRows);
  return ffi::Error::Success();
}

}  // namespace

// Aliases: template commas would split the arguments of the binding macros.
using I32Vec = ffi::Buffer<ffi::S32, 1>;
using I32Mat = ffi::Buffer<ffi::S32, 2>;
using F32Vec = ffi::Buffer<ffi::F32, 1>;
using F32Mat = ffi::Buffer<ffi::F32, 2>;
using BoolVec = ffi::Buffer<ffi::PRED, 1>;

extern "C" void jaxsae_set_tile(int64_t tile) { g_tile = tile > 0 ? tile : 1 << 30; }

// Latents per column group of the screen (> 0), or 0 for the default by kScreenGroupBytes (tests).
extern "C" void jaxsae_set_screen_group(int64_t cols) { g_screen_group = cols > 0 ? cols : 0; }

// 1 when the library was built with the bfloat16 screen (the CPU has AVX512-BF16).
extern "C" int32_t jaxsae_can_screen() { return JAXSAE_SCREEN; }

// gather_sum, gather_dot, scatter_rows, scatter_cols: (row, idx, a float matrix, another) -> a float matrix.
auto SparseProductBinding() {
  return ffi::Ffi::Bind().Arg<I32Vec>().Arg<I32Mat>().Arg<F32Mat>().Arg<F32Mat>().Ret<F32Mat>();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsaeGatherSum, GatherSumFfi,
                              SparseProductBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsaeGatherDot, GatherDotFfi,
                              SparseProductBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsaeScatterRows, ScatterFfi<false>,
                              SparseProductBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsaeScatterCols, ScatterFfi<true>,
                              SparseProductBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsaeTopkRows, TopkRowsFfi,
                              ffi::Ffi::Bind()
                                  .Arg<F32Mat>()
                                  .Arg<ffi::BufferR0<ffi::S32>>()
                                  .Arg<BoolVec>()
                                  .Ret<I32Mat>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsaeEncode, EncodeFfi,
                              ffi::Ffi::Bind().Arg<F32Mat>().Arg<F32Mat>().Arg<F32Vec>().Ret<F32Mat>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsaeEncodeHistogram, EncodeHistogramFfi,
                              ffi::Ffi::Bind().Arg<F32Mat>().Arg<F32Mat>().Arg<F32Vec>().Ret<F32Mat>().Ret<I32Vec>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsaeEncodeTopk, EncodeTopkFfi,
                              ffi::Ffi::Bind()
                                  .Arg<F32Mat>()
                                  .Arg<F32Mat>()
                                  .Arg<F32Vec>()
                                  .Arg<BoolVec>()
                                  .Arg<ffi::BufferR0<ffi::S32>>()
                                  .Arg<BoolVec>()
                                  .Arg<ffi::BufferR0<ffi::S32>>()
                                  .Ret<I32Mat>()
                                  .Ret<F32Mat>()
                                  .Ret<I32Mat>()
                                  .Ret<F32Mat>()
                                  .Attr<int32_t>("screen"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsaeEncodeBatchTopk, EncodeBatchTopkFfi,
                              ffi::Ffi::Bind()
                                  .Arg<F32Mat>()
                                  .Arg<F32Mat>()
                                  .Arg<F32Vec>()
                                  .Arg<ffi::BufferR0<ffi::S32>>()
                                  .Arg<BoolVec>()
                                  .Arg<ffi::BufferR0<ffi::S32>>()
                                  .Ret<I32Vec>()
                                  .Ret<I32Mat>()
                                  .Ret<F32Mat>()
                                  .Ret<I32Mat>()
                                  .Ret<F32Mat>()
                                  .Ret<ffi::BufferR0<ffi::F32>>()
                                  .Ret<ffi::BufferR0<ffi::S32>>()
                                  .Attr<int32_t>("screen"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsaeEncodeAbove, EncodeAboveFfi,
                              ffi::Ffi::Bind()
                                  .Arg<F32Mat>()
                                  .Arg<F32Mat>()
                                  .Arg<F32Vec>()
                                  .Arg<F32Vec>()
                                  .Ret<I32Vec>()
                                  .Ret<I32Mat>()
                                  .Ret<F32Mat>()
                                  .Ret<I32Vec>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsaePositiveHistogram, HistogramFfi,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::BufferR0<ffi::S32>>()
                                  .Ret<I32Vec>()
                                  .Attr<int32_t>("level"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsaeRowCounts, RowCountsFfi,
                              ffi::Ffi::Bind()
                                  .Arg<F32Mat>()
                                  .Arg<F32Vec>()
                                  .Ret<I32Vec>()
                                  .Ret<I32Vec>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsaeCompact, CompactFfi,
                              ffi::Ffi::Bind()
                                  .Arg<F32Mat>()
                                  .Arg<F32Vec>()
                                  .Arg<I32Vec>()
                                  .Arg<I32Vec>()
                                  .Ret<I32Vec>()
                                  .Ret<I32Mat>());

ffi::Error SumSquaresFfi(ffi::Buffer<ffi::F32, 2> a, ffi::Buffer<ffi::F32, 1> mean, ffi::ResultBufferR0<ffi::F32> out) {
  const int64_t R = a.dimensions()[0], d = a.dimensions()[1];
  if (mean.dimensions()[0] != d) return ffi::Error::InvalidArgument("sum_squares: mean must have a's row length");
  *out->typed_data() = SumSquares(a.typed_data(), mean.typed_data(), R, d);
  return ffi::Error::Success();
}

auto SumSquaresBinding() { return ffi::Ffi::Bind().Arg<F32Mat>().Arg<ffi::Buffer<ffi::F32, 1>>().Ret<ffi::BufferR0<ffi::F32>>(); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsaeSumSquares, SumSquaresFfi, SumSquaresBinding());

// (centred, decoded, aux_hat [b or 0, d]) -> (e, a, sums [d + 2]); e and a meant to alias decoded and aux_hat.
ffi::Error ReconstructionErrorsFfi(F32Mat centred, F32Mat decoded, F32Mat aux_hat, ffi::ResultBuffer<ffi::F32, 2> e,
                                   ffi::ResultBuffer<ffi::F32, 2> a, ffi::ResultBuffer<ffi::F32, 1> sums) {
  const int64_t R = centred.dimensions()[0], d = centred.dimensions()[1];
  const bool aux = aux_hat.dimensions()[0] > 0;
  if (decoded.dimensions()[0] != R || decoded.dimensions()[1] != d || (aux && aux_hat.dimensions()[0] != R) ||
      aux_hat.dimensions()[1] != d || sums->dimensions()[0] != d + 2)
    return ffi::Error::InvalidArgument("reconstruction_errors: centred, decoded and aux_hat must be [b, d]");
  ReconstructionErrors(centred.typed_data(), decoded.typed_data(), aux_hat.typed_data(), e->typed_data(),
                       a->typed_data(), R, d, aux, sums->typed_data());
  return ffi::Error::Success();
}

// (a [R, d], s [], v [d]) -> s · a + v, meant to alias a.
ffi::Error ScaleShiftFfi(F32Mat a, ffi::BufferR0<ffi::F32> s, ffi::Buffer<ffi::F32, 1> v,
                         ffi::ResultBuffer<ffi::F32, 2> out) {
  const int64_t R = a.dimensions()[0], d = a.dimensions()[1];
  if (v.dimensions()[0] != d) return ffi::Error::InvalidArgument("scale_shift: v must have a's row length");
  ScaleShift(a.typed_data(), *s.typed_data(), v.typed_data(), out->typed_data(), R, d);
  return ffi::Error::Success();
}

auto ReconstructionErrorsBinding() {
  return ffi::Ffi::Bind().Arg<F32Mat>().Arg<F32Mat>().Arg<F32Mat>().Ret<F32Mat>().Ret<F32Mat>().Ret<ffi::Buffer<ffi::F32, 1>>();
}
auto ScaleShiftBinding() {
  return ffi::Ffi::Bind().Arg<F32Mat>().Arg<ffi::BufferR0<ffi::F32>>().Arg<ffi::Buffer<ffi::F32, 1>>().Ret<F32Mat>();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsaeReconstructionErrors, ReconstructionErrorsFfi, ReconstructionErrorsBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsaeScaleShift, ScaleShiftFfi, ScaleShiftBinding());

// keep: the identity, its result aliased to its operand (see cpu.keep). XLA passes one buffer as both;
// the copy covers a caller that did not alias them.
ffi::Error KeepFfi(ffi::AnyBuffer in, ffi::Result<ffi::AnyBuffer> out) {
  if (out->untyped_data() != in.untyped_data()) std::memcpy(out->untyped_data(), in.untyped_data(), in.size_bytes());
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsaeKeep, KeepFfi, ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());

// (param, mu, nu) as three arguments, or as the three results written over them.
template <typename B>
auto ParamMuNuArgs(B b) {
  return std::move(b).template Arg<F32Cube>().template Arg<F32Cube>().template Arg<F32Cube>();
}
template <typename B>
auto ParamMuNuRets(B b) {
  return std::move(b).template Ret<F32Cube>().template Ret<F32Cube>().template Ret<F32Cube>();
}
// Adam's hyper-parameters [S, 10] and flags [S, 2].
template <typename B>
auto AdamScalarArgs(B b) {
  return std::move(b).template Arg<F32Mat>().template Arg<I32Mat>();
}
// One set of codes [S, ...]: row, idx, val.
template <typename B>
auto CodesArgs(B b) {
  return std::move(b).template Arg<I32Mat>().template Arg<I32Cube>().template Arg<F32Cube>();
}

// adam (elementwise) and adam_rows (W_dec: row projection and renormalisation): + grad.
auto AdamBinding() { return ParamMuNuRets(AdamScalarArgs(ParamMuNuArgs(ffi::Ffi::Bind()).Arg<F32Cube>())); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsaeAdam, AdamFfi<false>, AdamBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsaeAdamRows, AdamFfi<true>, AdamBinding());

// scatter_adam_rows (W_dec [S, F, d]) and scatter_adam_cols (W_enc [S, d, F]): + two code sets, y_a, y_b.
auto ScatterAdamBinding() {
  return ParamMuNuRets(
      AdamScalarArgs(CodesArgs(CodesArgs(ParamMuNuArgs(ffi::Ffi::Bind()))).Arg<F32Cube>().Arg<F32Cube>()));
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsaeScatterAdamRows, ScatterAdamFfi<false>, ScatterAdamBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsaeScatterAdamCols, ScatterAdamFfi<true>, ScatterAdamBinding());
