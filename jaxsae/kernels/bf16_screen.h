// The encoder's screen (included by cpu_kernels.cc): pre ≈ x̃·w̃ + b with x and w rounded to bfloat16 and
// the products summed in float32 by AVX512-BF16 (vdpbf16ps: twice the multiply-adds of a float32 FMA per
// instruction; measured here at 2.2-2.4x OpenBLAS's sgemm at d 768, F 6144-24576), and a bound per row
// on |approx − exact|. The selections then need the float32 values of only the entries that the bound
// cannot rule out (see "Screened selections" in cpu_kernels.cc), so their results are float32's.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define JAXSAE_SCREEN 1
#else
#define JAXSAE_SCREEN 0
#endif

namespace screen {

constexpr int64_t kRows = 8;            // micro-tile: 8 rows × kCols latents in 24 accumulators
constexpr int64_t kVecs = 3;            // 16-float vectors per micro-tile row
constexpr int64_t kCols = 16 * kVecs;   // latents per panel of the packed weights
constexpr int64_t kBlock = 16;          // latents per block maximum

// w [d, F] (row stride ld) in bfloat16, as panels [panels][pairs][kCols][2]: latent c of a panel holds
// (w[2p, c], w[2p + 1, c]) at pair p (vdpbf16ps's operand layout; zero past d and F), and the largest
// column norms of w, w̃ and w − w̃, which bound the screen's error (norm NaN when w is not finite).
struct Weights {
  int64_t d = 0, F = 0, pairs = 0, panels = 0;
  std::unique_ptr<uint16_t[]> w;  // every element written by Pack: no zero-filling pass first
  float norm = 0, rounded_norm = 0, error_norm = 0;
};

#if JAXSAE_SCREEN
// v rounded to bfloat16 as the screen's GEMM reads it (vcvtneps2bf16: nearest even, denormals to 0), the
// 16 bfloat16s in the low halves of `bits`' lanes; adds v², ṽ² and (v − ṽ)² to s, sr and se per lane.
inline __m512 RoundBf16(__m512 v, __m512i* bits, __m512* s, __m512* sr, __m512* se) {
  *bits = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v));
  const __m512 r = _mm512_castsi512_ps(_mm512_slli_epi32(*bits, 16)), e = _mm512_sub_ps(v, r);
  *s = _mm512_fmadd_ps(v, v, *s);
  *sr = _mm512_fmadd_ps(r, r, *sr);
  *se = _mm512_fmadd_ps(e, e, *se);
  return r;
}

// 16 latents of one pair of rows of w (w0, w1; w1 null past d) as 16 bf16 pairs, and their column
// sums of squares of w, of w̃ and of w − w̃ added to s, sr, se.
inline __m512i PackPairs(const float* w0, const float* w1, __m512* s, __m512* sr, __m512* se) {
  __m512i h0, h1;
  RoundBf16(_mm512_loadu_ps(w0), &h0, s, sr, se);
  RoundBf16(w1 ? _mm512_loadu_ps(w1) : _mm512_setzero_ps(), &h1, s, sr, se);
  return _mm512_or_si512(h0, _mm512_slli_epi32(h1, 16));
}

// The weights w [d, F] (row stride ld: F columns of a wider matrix) packed for the screen, in parallel
// over panels; the column sums of squares in float32 (relative error about d·2⁻²⁴, within the bound's 1%
// to spare).
inline Weights Pack(const float* w, int64_t d, int64_t F, int64_t ld) {
  Weights p;
  p.d = d;
  p.F = F;
  p.pairs = (d + 1) / 2;
  p.panels = (F + kCols - 1) / kCols;
  p.w.reset(new uint16_t[p.panels * p.pairs * kCols * 2]);
  float norm = 0, rounded = 0, error = 0;
  bool finite = true;  // max() would drop a NaN column norm
#pragma omp parallel for schedule(static) reduction(max : norm, rounded, error) reduction(&& : finite)
  for (int64_t q = 0; q < p.panels; ++q) {
    const int64_t f0 = q * kCols, nc = std::min(kCols, F - f0);
    alignas(64) float col[kCols], tail[2][kCols];
    __m512 s[kVecs], sr[kVecs], se[kVecs];
    for (int j = 0; j < kVecs; ++j) s[j] = sr[j] = se[j] = _mm512_setzero_ps();
    for (int64_t i = 0; i < p.pairs; ++i) {
      const float *w0 = w + 2 * i * ld + f0, *w1 = 2 * i + 1 < d ? w0 + ld : nullptr;
      if (nc < kCols) {  // the last panel: through zero-padded copies
        std::fill(&tail[0][0], &tail[0][0] + 2 * kCols, 0.0f);
        std::copy(w0, w0 + nc, tail[0]);
        if (w1) std::copy(w1, w1 + nc, tail[1]);
        w0 = tail[0];
        w1 = w1 ? tail[1] : nullptr;
      }
      uint16_t* o = p.w.get() + (q * p.pairs + i) * kCols * 2;
      for (int j = 0; j < kVecs; ++j)
        _mm512_storeu_si512(o + 32 * j, PackPairs(w0 + 16 * j, w1 ? w1 + 16 * j : nullptr, &s[j], &sr[j], &se[j]));
    }
    for (int j = 0; j < kVecs; ++j) {
      _mm512_store_ps(col + 16 * j, s[j]);
      for (int c = 0; c < 16; ++c) finite = finite && std::isfinite(col[16 * j + c]);
      norm = std::max(norm, _mm512_reduce_max_ps(s[j]));
      rounded = std::max(rounded, _mm512_reduce_max_ps(sr[j]));
      error = std::max(error, _mm512_reduce_max_ps(se[j]));
    }
  }
  p.norm = finite ? std::sqrt(norm) : NAN;
  p.rounded_norm = std::sqrt(rounded);
  p.error_norm = std::sqrt(error);
  return p;
}
#endif

// Rows of x in bfloat16 pairs (as the weights' pairs), padded with zero rows to a multiple of kRows, and
// per row the bound beta on |approx − exact| of every entry, where exact is any float32 sum of
// x[r]·w[:, f] + b[f] (|error| <= γ‖x‖‖w‖ plus the bias's rounding): the rounding term ‖x − x̃‖‖w‖ +
// ‖x̃‖‖w − w̃‖ (Cauchy-Schwarz), both sums' float32 accumulation (γ = (d + 2)·2⁻²⁴ of ‖x̃‖‖w̃‖ and
// ‖x‖‖w‖), both bias additions and flushed denormals, with 1% to spare for the bound's own rounding.
// A row with a NaN or infinite bound cannot be screened. The sums of squares are float32 (relative error
// about d·2⁻²⁴, within the 1%).
struct Rows {
  std::vector<uint32_t> x;  // [rows rounded up to kRows][pairs]
  std::vector<float> beta;  // [rows]
};

#if JAXSAE_SCREEN
inline void Round(const float* x, int64_t n, const Weights& p, float b_max, Rows& out) {
  const int64_t padded = (n + kRows - 1) / kRows * kRows, d = p.d;
  out.x.assign(padded * p.pairs, 0);
  out.beta.resize(n);
  const double gamma = (double)(d + 2) * std::ldexp(1.0, -24);
  for (int64_t r = 0; r < n; ++r) {
    // The pairs of a row are its bfloat16s in order: 16 at a time, the tail masked.
    uint16_t* o = reinterpret_cast<uint16_t*>(out.x.data() + r * p.pairs);
    __m512 s = _mm512_setzero_ps(), sr = s, se = s;
    for (int64_t i = 0; i < d; i += 16) {
      const __mmask16 m = d - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (d - i)) - 1);
      __m512i bits;
      RoundBf16(_mm512_maskz_loadu_ps(m, x + r * d + i), &bits, &s, &sr, &se);
      _mm256_mask_storeu_epi16(o + i, m, _mm512_cvtepi32_epi16(bits));
    }
    const double xn = std::sqrt(_mm512_reduce_add_ps(s)), xrn = std::sqrt(_mm512_reduce_add_ps(sr));
    const double xen = std::sqrt(_mm512_reduce_add_ps(se));
    const double rounding = xen * p.norm + xrn * p.error_norm;
    const double summing = gamma * (xrn * p.rounded_norm + xn * p.norm);
    const double bias = std::ldexp(1.0, -22) * (xn * p.norm + xrn * p.rounded_norm + b_max);
    out.beta[r] = (float)(1.01 * (rounding + summing + bias) + 1e-30 * (double)d);
  }
}

// c[0:8, 0:kCols] (row stride ldc) = a[0:8] (bf16 pairs, row stride pairs) · one panel, + b[0:kCols].
inline void MicroTile(const uint32_t* a, int64_t pairs, const uint16_t* panel, const float* b, float* c,
                      int64_t ldc) {
  __m512 acc[kRows][kVecs];
  for (int i = 0; i < kRows; ++i)
    for (int j = 0; j < kVecs; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh w[kVecs];
    for (int j = 0; j < kVecs; ++j) w[j] = (__m512bh)_mm512_loadu_si512(panel + (p * kCols + 16 * j) * 2);
    for (int i = 0; i < kRows; ++i) {
      const __m512bh xi = (__m512bh)_mm512_set1_epi32((int)a[i * pairs + p]);
      for (int j = 0; j < kVecs; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xi, w[j]);
    }
  }
  for (int i = 0; i < kRows; ++i)
    for (int j = 0; j < kVecs; ++j)
      _mm512_storeu_ps(c + i * ldc + 16 * j, _mm512_add_ps(acc[i][j], _mm512_loadu_ps(b + 16 * j)));
}

// The maximum of each block of kBlock latents of the tile rows c [rows, cols] (stride ldc), into
// block_max [rows][F / kBlock rounded up] from block b0 on, while the tile is in L1.
inline void BlockMaxima(const float* c, int64_t ldc, int64_t rows, int64_t cols, int64_t b0, int64_t n_blocks,
                        float* block_max) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j * kBlock < cols; ++j) {
      const float* v = c + i * ldc + j * kBlock;
      float m = v[0];
      for (int64_t q = 1; q < std::min(kBlock, cols - j * kBlock); ++q) m = std::max(m, v[q]);
      block_max[i * n_blocks + b0 + j] = m;
    }
}

// buf [n, F] = x̃ · w̃ + b for the rows of `rows` (n of them), and each row's block maxima block_max
// [n][ceil(F / kBlock)]: panels outer, so that each panel of the weights is read from cache by every row
// group. Partial tiles (the last rows, the last latents) go through a scratch tile.
inline void Approx(const Rows& rows, int64_t n, const Weights& p, const float* b, float* buf, float* block_max) {
  static_assert(kCols % kBlock == 0, "a panel holds whole blocks");
  const int64_t F = p.F, n_blocks = (F + kBlock - 1) / kBlock;
  alignas(64) float tile[kRows * kCols];
  alignas(64) float bias[kCols];
  for (int64_t q = 0; q < p.panels; ++q) {
    const int64_t f0 = q * kCols, nc = std::min(kCols, F - f0);
    const uint16_t* panel = p.w.get() + q * p.pairs * kCols * 2;
    std::fill(bias, bias + kCols, 0.0f);
    std::copy(b + f0, b + f0 + nc, bias);
    for (int64_t r0 = 0; r0 < n; r0 += kRows) {
      const uint32_t* a = rows.x.data() + r0 * p.pairs;
      float* bm = block_max + r0 * n_blocks;
      if (r0 + kRows <= n && nc == kCols) {
        MicroTile(a, p.pairs, panel, bias, buf + r0 * F + f0, F);
        BlockMaxima(buf + r0 * F + f0, F, kRows, kCols, f0 / kBlock, n_blocks, bm);
        continue;
      }
      MicroTile(a, p.pairs, panel, bias, tile, kCols);
      const int64_t valid = std::min(kRows, n - r0);
      for (int64_t i = 0; i < valid; ++i)
        std::copy(tile + i * kCols, tile + i * kCols + nc, buf + (r0 + i) * F + f0);
      BlockMaxima(tile, kCols, valid, nc, f0 / kBlock, n_blocks, bm);
    }
  }
}
#endif

}  // namespace screen
