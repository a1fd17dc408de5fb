// CPU implementations of the difflm ops: plain C++ with OpenMP, one row (position) per iteration.
//
// Every row is streamed once for its sums (forward) or once for its gradient (backward); a sampling step keeps the row's scores
// in a per-thread scratch buffer (fits in L2 up to N ~ 250k) for its early-exit inverse-CDF scan.
// The row functions are compiled for AVX-512, AVX2 and plain x86-64 (target_clones) and the loader
// picks the best one for the CPU, so the build needs no -march flag.
#include <float.h>
#include <math.h>
#include <string.h>

#include <algorithm>
#include <vector>

#include "kernels.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define DIFFLM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DIFFLM_CLONES
#endif
#define DIFFLM_INLINE inline __attribute__((always_inline))
#if defined(__GNUC__) && !defined(__clang__)
#define DIFFLM_REASSOC __attribute__((optimize("associative-math", "no-signed-zeros", "no-trapping-math")))
#define DIFFLM_FINITE __attribute__((optimize("finite-math-only", "no-signed-zeros")))
#else
#define DIFFLM_REASSOC
#define DIFFLM_FINITE
#endif

namespace difflm {
namespace {

DIFFLM_INLINE float from_bits(uint32_t b) { float f; memcpy(&f, &b, 4); return f; }
DIFFLM_INLINE uint32_t to_bits(float f) { uint32_t b; memcpy(&b, &f, 4); return b; }

DIFFLM_INLINE float load(const float* p, int64_t i) { return p[i]; }
DIFFLM_INLINE float load(const uint16_t* p, int64_t i) { return from_bits((uint32_t)p[i] << 16); }
DIFFLM_INLINE void store(float* p, int64_t i, float v) { p[i] = v; }
DIFFLM_INLINE void store(uint16_t* p, int64_t i, float v) {
  // round to nearest even, NaN stays NaN (as c10::BFloat16)
  uint32_t b = to_bits(v);
  uint16_t r = (uint16_t)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
  p[i] = v != v ? (uint16_t)0x7FC0 : r;
}

// exp in fp32 within ~1 ulp (Cephes polynomial), branch-free so loops vectorise; denormals, +-inf
// and NaN as libm. 2^n is applied in two halves so neither factor leaves the normal range.
// FAST: a degree-5 Taylor polynomial instead, within 3e-6 relative and two FMAs cheaper: enough for
// the uniform steps' fp32 screen, which only needs its sums to 1e-4.
template <bool FAST = false>
DIFFLM_INLINE float exp_f32(float x) {
  float xc = x < -104.0f ? -104.0f : x;
  xc = xc > 89.0f ? 89.0f : xc;
  const float shift = 12582912.0f;  // 1.5 * 2^23: rounds x / ln2 to an integer in the low bits
  float kd = fmaf(xc, 1.44269504088896341f, shift);
  const int ni = (int)(to_bits(kd) - to_bits(shift));
  const float n = kd - shift;
  float r = fmaf(n, -0.693359375f, xc);
  r = fmaf(n, 2.12194440e-4f, r);
  float p;
  if (FAST) {
    p = fmaf(1.0f / 120.0f, r, 1.0f / 24.0f);
    p = fmaf(p, r, 1.0f / 6.0f);
    p = fmaf(p, r, 0.5f);
  } else {
    p = fmaf(1.9875691500E-4f, r, 1.3981999507E-3f);
    p = fmaf(p, r, 8.3334519073E-3f);
    p = fmaf(p, r, 4.1665795894E-2f);
    p = fmaf(p, r, 1.6666665459E-1f);
    p = fmaf(p, r, 5.0000001201E-1f);
  }
  float y = fmaf(p * r, r, r) + 1.0f;
  const int n1 = ni >> 1, n2 = ni - n1;
  y = y * from_bits((uint32_t)(n1 + 127) << 23) * from_bits((uint32_t)(n2 + 127) << 23);
  return y;  // a NaN x stays NaN through the arithmetic
}

DIFFLM_INLINE double from_bits64(uint64_t b) { double f; memcpy(&f, &b, 8); return f; }
DIFFLM_INLINE uint64_t to_bits64(double f) { uint64_t b; memcpy(&b, &f, 8); return b; }

// exp in fp64 within ~1 ulp (degree-13 Taylor on |r| <= ln2/2), branch-free and vectorisable with
// 64-bit integer lanes; the SEDD oracle exponentiates its log-scores in fp64, so the sampling
// kernels do too and their CDFs agree with it to ~1e-16.
DIFFLM_INLINE double exp_f64(double x) {
  double xc = x < -746.0 ? -746.0 : x;
  xc = xc > 710.0 ? 710.0 : xc;
  const double shift = 6755399441055744.0;  // 1.5 * 2^52: rounds x / ln2 to an integer in the low bits
  double kd = fma(xc, 1.4426950408889634074, shift);
  const int64_t k = (int64_t)(to_bits64(kd) - to_bits64(shift));
  kd -= shift;
  double r = fma(kd, -6.93147180369123816490e-01, xc);
  r = fma(kd, -1.90821492927058770002e-10, r);
  double p = 1.0 / 6227020800.0;  // 1/13!
  p = fma(p, r, 1.0 / 479001600.0);
  p = fma(p, r, 1.0 / 39916800.0);
  p = fma(p, r, 1.0 / 3628800.0);
  p = fma(p, r, 1.0 / 362880.0);
  p = fma(p, r, 1.0 / 40320.0);
  p = fma(p, r, 1.0 / 5040.0);
  p = fma(p, r, 1.0 / 720.0);
  p = fma(p, r, 1.0 / 120.0);
  p = fma(p, r, 1.0 / 24.0);
  p = fma(p, r, 1.0 / 6.0);
  p = fma(p, r, 0.5);
  p = fma(p, r, 1.0);
  p = fma(p, r, 1.0);
  const int64_t k1 = k >> 1, k2 = k - k1;
  const double y = p * from_bits64((uint64_t)(k1 + 1023) << 52) * from_bits64((uint64_t)(k2 + 1023) << 52);
  return x != x ? x : y;
}

// ------------------------------------------------------------------------------------------------
// score entropy, one streaming pass per row: the loss (reads only), the gradient scaled by the
// upstream gradient w (backward: reads the row, writes its gradient once), or both at once with
// w = 1 (training on the CPU, where the exps cost more than the bytes: see score_entropy_with_grad)

// Row sums in SE_LANES fp32 lanes within blocks of SE_BLOCK (the oracle sums in fp32 too), the lanes
// added in a fixed order and the blocks in fp64 so long rows (N ~ 50k) lose nothing: the same sum
// whichever clone runs and whether the gradient is written too (the vector width would set the
// order of an omp simd reduction). The skipped entry y = skip (x_t, or MASK) is read as log s = 0
// by a select and its exp(0) = 1 taken off after, so the loop has no split and vectorises over the
// whole row. A stored value is the log-score plus shift. The gradient is (s - rho) * coef, 0 at y = skip.
constexpr int64_t SE_BLOCK = 1024;
constexpr int SE_LANES = 16;

template <bool LOSS, bool GRAD, bool TAIL, class T>
DIFFLM_INLINE void se_lanes(const T* h, T* g, int64_t y0, int64_t hi, int64_t skip, float shift, float rho,
                            float coef, float* s_acc, float* h_acc) {
#pragma omp simd
  for (int j = 0; j < SE_LANES; ++j) {
    const int64_t y = y0 + j;
    const bool in = !TAIL || y < hi;
    const float hy = (!in || y == skip) ? 0.0f : load(h, y) - shift;
    const float s = in ? exp_f32(hy) : 0.0f;
    if (GRAD && in) store(g, y, y == skip ? 0.0f : (s - rho) * coef);
    if (LOSS) s_acc[j] += s, h_acc[j] += hy;
  }
}

template <bool LOSS, bool GRAD, class T>
DIFFLM_INLINE void se_sums(const T* h, T* g, int64_t N, int64_t skip, float shift, float rho, float coef, double& S,
                           double& H) {
  S = 0.0;
  H = 0.0;
  for (int64_t lo = 0; lo < N; lo += SE_BLOCK) {
    const int64_t hi = std::min(N, lo + SE_BLOCK);
    float s_acc[SE_LANES] = {}, h_acc[SE_LANES] = {};
    int64_t y0 = lo;
    for (; y0 + SE_LANES <= hi; y0 += SE_LANES)
      se_lanes<LOSS, GRAD, false>(h, g, y0, hi, skip, shift, rho, coef, s_acc, h_acc);
    if (y0 < hi) se_lanes<LOSS, GRAD, true>(h, g, y0, hi, skip, shift, rho, coef, s_acc, h_acc);
    float s_blk = 0.0f, h_blk = 0.0f;
    for (int j = 0; j < SE_LANES; ++j) s_blk += s_acc[j], h_blk += h_acc[j];
    S += (double)s_blk;
    H += (double)h_blk;
  }
  S -= 1.0;  // the skipped entry counted exp(0) = 1
}

template <bool LOSS, bool GRAD, class T>
DIFFLM_INLINE float se_row(const T* h, T* g, int64_t N, int64_t x, int64_t x0, int graph, const SEConsts& c, float w) {
  double S, H;  // sums over y != skip of s_y and log s_y
  if (graph == ABSORB) {
    const int64_t M = N - 1;
    if (x != M) {  // an unmasked position: zero loss, zero gradient, no reads
      if (GRAD) memset(g, 0, N * sizeof(T));
      return 0.0f;
    }
    se_sums<LOSS, GRAD>(h, g, N, M, c.shift, 0.0f, w, S, H);  // d/dlog s_y = s_y for y != x0
    const float h0 = load(h, x0) - c.shift;
    if (GRAD) store(g, x0, (float)(((double)exp_f32(h0) - c.r) * (double)w));
    return LOSS ? (float)(S - c.r * (double)h0 + c.k_same) : 0.0f;  // sum_{y != M} s_y - r log s_{x0} + K(r)
  }
  const bool same = x == x0;
  const float rho = same ? (float)c.r : 1.0f;
  se_sums<LOSS, GRAD>(h, g, N, x, c.shift, rho, w / (float)N, S, H);
  const double n = (double)N;
  const float h0 = load(h, x0) - c.shift;
  if (GRAD && !same) store(g, x0, (float)(((double)exp_f32(h0) - 1.0 / c.r) / n * (double)w));
  if (!LOSS) return 0.0f;
  if (same) return (float)(S / n - c.r * H / n + c.k_same);
  return (float)(S / n - H / n - (double)h0 * c.inv_e + c.k_diff);
}

// mode: 1 the loss, 2 the gradient, 3 both
template <class T>
DIFFLM_INLINE float se_row_mode(int mode, const T* h, T* g, int64_t N, int64_t x, int64_t x0, int graph,
                                const SEConsts& c, float w) {
  if (mode == 1) return se_row<true, false>(h, g, N, x, x0, graph, c, w);
  if (mode == 2) return se_row<false, true>(h, g, N, x, x0, graph, c, w);
  return se_row<true, true>(h, g, N, x, x0, graph, c, w);
}
DIFFLM_CLONES float se_row_f32(int mode, const float* h, float* g, int64_t N, int64_t x, int64_t x0, int graph,
                               const SEConsts& c, float w) {
  return se_row_mode(mode, h, g, N, x, x0, graph, c, w);
}
DIFFLM_CLONES float se_row_bf16(int mode, const uint16_t* h, uint16_t* g, int64_t N, int64_t x, int64_t x0, int graph,
                                const SEConsts& c, float w) {
  return se_row_mode(mode, h, g, N, x, x0, graph, c, w);
}

// ------------------------------------------------------------------------------------------------
// sampling: inverse CDF over nonnegative weights w(y), y in [0, n), with fp64 accumulation.
// Returns the first y whose running sum exceeds target (searchsorted right=True); when rounding
// leaves the total just short of target, the last y with positive weight; n_total - 1 when none.
// Blocks of 256 are summed with vector code and only the block holding the answer is walked.

template <class W>
DIFFLM_INLINE int64_t inverse_cdf(const W& w, int64_t n, double target, int64_t n_total) {
  constexpr int64_t BLK = 256;
  double acc = 0.0;
  int64_t last_pos = -1;
  for (int64_t lo = 0; lo < n; lo += BLK) {
    const int64_t hi = std::min(n, lo + BLK);
    double bs = 0.0;
#pragma omp simd reduction(+ : bs)
    for (int64_t y = lo; y < hi; ++y) bs += w(y);
    if (acc + bs > target) {
      for (int64_t y = lo; y < hi; ++y) {
        const double wy = w(y);
        acc += wy;
        if (acc > target) return y;
        if (wy > 0.0) last_pos = y;
      }
      // rounding: the block sum said yes, the walk said no; keep walking from here
      continue;
    }
    if (bs > 0.0) {
      for (int64_t y = hi - 1; y >= lo; --y)
        if (w(y) > 0.0) { last_pos = y; break; }
    }
    acc += bs;
  }
  return last_pos >= 0 ? last_pos : n_total - 1;
}

// fp64 exp of [0, n) of the row less its shift (in fp32) into scratch, 0 at y = skip, returns the fp64
// sum (one loop: a split at skip would leave two short ranges with scalar ends)
template <class T>
DIFFLM_INLINE double exp_row(const T* h, float shift, double* s, int64_t n, int64_t skip) {
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t y = 0; y < n; ++y) {
    const double e = y == skip ? 0.0 : exp_f64((double)(load(h, y) - shift));
    s[y] = e;
    acc += e;
  }
  return acc;
}

// A sum of n floats in vector lanes closed by a shuffle tree, reassociation allowed in this one
// function (fp32 rounding of a sum of <= SE_BLOCK nonnegative terms stays below SCREEN). GCC's
// `omp simd reduction` keeps its lanes in memory and closes them with 16 dependent scalar adds: on
// rows of ~66 entries the screen below was 1.4x slower that way.
DIFFLM_REASSOC DIFFLM_CLONES float sum_f32(const float* s, int64_t n) {
  float acc = 0.0f;
  for (int64_t i = 0; i < n; ++i) acc += s[i];
  return acc;
}

// fp32 exp of the row less its shift into scratch, 0 at y = skip; returns the sum (fp32 lanes per block,
// blocks in fp64)
template <class T>
DIFFLM_INLINE double exp_row_f32(const T* h, float shift, float* s, int64_t N, int64_t skip) {
#pragma omp simd
  for (int64_t y = 0; y < N; ++y) s[y] = y == skip ? 0.0f : exp_f32<true>(load(h, y) - shift);
  double acc = 0.0;
  for (int64_t b = 0; b < N; b += SE_BLOCK) acc += (double)sum_f32(s + b, std::min(N, b + SE_BLOCK) - b);
  return acc;
}

// The largest entry of a row in vector lanes (GCC vectorises a max only when told there are no NaNs;
// a NaN entry is then skipped or propagates, and a row holding one off x stays on every path, as in
// the oracle, so either is fine; h_x is left out, since a NaN there could hide the true maximum).
DIFFLM_FINITE DIFFLM_CLONES float max_f32(const float* h, int64_t n) {
  float m = -FLT_MAX;  // not -inf: the function is compiled as if there were none
  for (int64_t i = 0; i < n; ++i) m = h[i] > m ? h[i] : m;
  return m;
}
DIFFLM_FINITE DIFFLM_CLONES float max_f32(const uint16_t* h, int64_t n) {
  float m = -FLT_MAX;  // not -inf: the function is compiled as if there were none
  for (int64_t i = 0; i < n; ++i) m = load(h, i) > m ? load(h, i) : m;
  return m;
}

// The screen (kernels.h): first Sb = (N - 1) e^{max_{y != x} h_y - shift}, from a max pass with no exp
// (rounding is monotone: the max less the shift is the max of the shifted row), which settles most rows
// of a small step when no score dominates; then the fp32 sum; then, for Tweedie, the clamped M over
// the fp32 exps in scratch.
template <class T>
DIFFLM_INLINE bool screen_stays(const T* h, int64_t N, int64_t x, double u0, int step, const StepConsts& c, float* s) {
  // (an fp32 exp overflows to inf above 88.7, and then neither bound settles anything)
  const float top = std::max(max_f32(h, x), max_f32(h + x + 1, N - x - 1)) - c.shift;
  const double Smax = (double)(N - 1) * (double)exp_f32(top);
  if (stays_below(Smax * (1.0 + SCREEN), u0, step, c)) return true;
  const double S = exp_row_f32(h, c.shift, s, N, x);  // over y != x, relative error far below SCREEN
  if (stays_below(S * (1.0 + SCREEN), u0, step, c)) return true;
  if (step == EULER) return false;  // that bound was M itself
  const double a = c.a, q = c.q, b = c.bS * (S + 1.0);
  double M = 0.0;
#pragma omp simd reduction(+ : M)
  for (int64_t y = 0; y < N; ++y) {
    const double v = (a * (double)s[y] + b) * q;
    M += (v > 0.0 && y != x) ? v : 0.0;  // s[x] = 0 but b may be > 0
  }
  return tweedie_stays(M, S, u0, N, c);
}

// Two-stage SEDD step of one row (Euler or Tweedie, docs/sedd.md): move with probability
// M / (M + w_x), M the sum of the clamped move weights; then the target by inverse CDF.
template <class T>
DIFFLM_INLINE int64_t sedd_row(const T* h, int64_t N, int64_t x, double u0, double u1, int step, int graph,
                               bool final_step, const StepConsts& c, double* s, float* s32) {
  if (graph == ABSORB) {
    const int64_t M = N - 1;
    if (x != M) return x;  // its transition row is a multiple of onehot(x)
    if (!final_step && screen_stays(h, N, x, u0, EULER, c, s32)) return x;  // q = 1 for both steps
    const double S = exp_row(h, c.shift, s, M, M);
    // w_y = a s_y for y != M (Euler: sigma dt s_y; Tweedie: (e^ds - 1) s_y)
    const double Mv = c.a * S;
    double wx = final_step ? 0.0 : 1.0 - Mv;  // the denoiser drops the MASK column
    wx = wx > 0.0 ? wx : 0.0;
    if (!(u0 < Mv / (Mv + wx))) return x;
    return inverse_cdf([&](int64_t y) { return s[y]; }, M, u1 * S, N);
  }
  if (screen_stays(h, N, x, u0, step, c, s32)) return x;
  double S = exp_row(h, c.shift, s, N, x);  // over y != x
  double Mv, wx;
  if (step == EULER) {  // w_y = sigma dt s_y / N
    Mv = c.a * c.q * S;
    wx = 1.0 - Mv;
    wx = wx > 0.0 ? wx : 0.0;
    if (!(u0 < Mv / (Mv + wx))) return x;
    return inverse_cdf([&](int64_t y) { return s[y]; }, N, u1 * S, N);
  }
  // Tweedie: w_y = max(0, (e^ds s_y + (1 - e^ds) S_all / N) (1 - e^-ds) / N), S_all includes s_x = 1
  const double b = c.bS * (S + 1.0), a = c.a, q = c.q;
  auto w = [&](int64_t y) {
    const double v = (a * s[y] + b) * q;
    return (v > 0.0 && y != x) ? v : 0.0;
  };
  Mv = 0.0;
#pragma omp simd reduction(+ : Mv)
  for (int64_t y = 0; y < N; ++y) Mv += w(y);
  wx = (a + b) * c.qx;
  wx = wx > 0.0 ? wx : 0.0;
  if (!(u0 < Mv / (Mv + wx))) return x;
  return inverse_cdf(w, N, u1 * Mv, N);
}

DIFFLM_CLONES int64_t sedd_row_f32(const float* h, int64_t N, int64_t x, double u0, double u1, int step,
                                   int graph, bool final_step, const StepConsts& c, double* s, float* s32) {
  return sedd_row(h, N, x, u0, u1, step, graph, final_step, c, s, s32);
}
DIFFLM_CLONES int64_t sedd_row_bf16(const uint16_t* h, int64_t N, int64_t x, double u0, double u1, int step,
                                    int graph, bool final_step, const StepConsts& c, double* s, float* s32) {
  return sedd_row(h, N, x, u0, u1, step, graph, final_step, c, s, s32);
}

// MDLM ancestral step of one row: reveal iff u0 < p_unmask, then a token from softmax(logits) with
// the MASK column removed, probabilities rounded to fp32 as the PyTorch softmax does.
template <class T>
DIFFLM_INLINE int64_t mdlm_row(const T* h, int64_t N, int64_t x, int64_t mask, double u0, double u1, double p,
                               float* s) {
  if (x != mask || !(u0 < p)) return x;
  float m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (int64_t y = 0; y < N; ++y) {
    const float v = load(h, y);
    m = (y != mask && v > m) ? v : m;
  }
  double Z = 0.0;
#pragma omp simd reduction(+ : Z)
  for (int64_t y = 0; y < N; ++y) {
    const float e = y == mask ? 0.0f : exp_f32(load(h, y) - m);
    s[y] = e;
    Z += (double)e;
  }
  const float zf = (float)Z;
  double total = 0.0;
#pragma omp simd reduction(+ : total)
  for (int64_t y = 0; y < N; ++y) {
    const float pr = s[y] / zf;
    s[y] = pr;
    total += (double)pr;
  }
  return inverse_cdf([&](int64_t y) { return (double)s[y]; }, N, u1 * total, N);
}

DIFFLM_CLONES int64_t mdlm_row_f32(const float* h, int64_t N, int64_t x, int64_t mask, double u0, double u1,
                                   double p, float* s) {
  return mdlm_row(h, N, x, mask, u0, u1, p, s);
}
DIFFLM_CLONES int64_t mdlm_row_bf16(const uint16_t* h, int64_t N, int64_t x, int64_t mask, double u0, double u1,
                                    double p, float* s) {
  return mdlm_row(h, N, x, mask, u0, u1, p, s);
}

// small problems run on one thread: the fork costs more than the work
int threads_for(int64_t rows, int64_t N, int nthreads) {
  return rows * N < (1 << 15) ? 1 : std::max(1, nthreads);
}

int64_t chunk_for(int64_t N) { return std::max<int64_t>(1, std::min<int64_t>(256, 16384 / std::max<int64_t>(N, 1))); }

}  // namespace

void cpu_score_entropy(const void* log_score, int dtype, const int64_t* xt, const int64_t* x0,
                       const double* sigma_bar, const float* shift, int graph, int64_t B, int64_t L, int64_t N,
                       float* loss, const float* grad_loss, void* grad, int nthreads) {
  const int64_t rows = B * L, chunk = chunk_for(N);
  const int mode = (loss ? 1 : 0) + (grad ? 2 : 0);
  std::vector<SEConsts> consts(B);
  for (int64_t b = 0; b < B; ++b) consts[b] = se_consts(sigma_bar[b], graph, N, shift ? shift[b] : 0.0f);
#pragma omp parallel for schedule(dynamic, chunk) num_threads(threads_for(rows, N, nthreads))
  for (int64_t i = 0; i < rows; ++i) {
    const SEConsts& c = consts[i / L];
    const float w = grad_loss ? grad_loss[i] : 1.0f;
    float d;
    if (dtype == BF16)
      d = se_row_bf16(mode, (const uint16_t*)log_score + i * N, grad ? (uint16_t*)grad + i * N : nullptr, N, xt[i],
                      x0[i], graph, c, w);
    else
      d = se_row_f32(mode, (const float*)log_score + i * N, grad ? (float*)grad + i * N : nullptr, N, xt[i], x0[i],
                     graph, c, w);
    if (loss) loss[i] = d;
  }
}

void cpu_sedd_step(const void* log_score, int dtype, const int64_t* xt, const double* t, const float* shift,
                   const double* u, int step, int graph, bool final_step, int64_t B, int64_t L, int64_t N,
                   int64_t* out, int nthreads) {
  const int64_t rows = B * L, chunk = chunk_for(N);
  std::vector<StepConsts> consts(B);  // per sequence: up to four exp/expm1, once rather than per row
  for (int64_t b = 0; b < B; ++b) consts[b] = step_consts(t[b], step, graph, N, shift ? shift[b] : 0.0f);
#pragma omp parallel num_threads(threads_for(rows, N, nthreads))
  {
    std::vector<double> scratch(N);
    std::vector<float> scratch32(N);
#pragma omp for schedule(dynamic, chunk)
    for (int64_t i = 0; i < rows; ++i) {
      const StepConsts& c = consts[i / L];
      if (dtype == BF16)
        out[i] = sedd_row_bf16((const uint16_t*)log_score + i * N, N, xt[i], u[2 * i], u[2 * i + 1], step, graph,
                               final_step, c, scratch.data(), scratch32.data());
      else
        out[i] = sedd_row_f32((const float*)log_score + i * N, N, xt[i], u[2 * i], u[2 * i + 1], step, graph,
                              final_step, c, scratch.data(), scratch32.data());
    }
  }
}

void cpu_mdlm_step(const void* logits, int dtype, const int64_t* xt, const double* p_unmask, const double* u,
                   int64_t mask_id, int64_t B, int64_t L, int64_t N, int64_t* out, int nthreads) {
  const int64_t rows = B * L, chunk = chunk_for(N);
#pragma omp parallel num_threads(threads_for(rows, N, nthreads))
  {
    std::vector<float> scratch(N);
#pragma omp for schedule(dynamic, chunk)
    for (int64_t i = 0; i < rows; ++i) {
      const double p = p_unmask[i / L];
      if (dtype == BF16)
        out[i] = mdlm_row_bf16((const uint16_t*)logits + i * N, N, xt[i], mask_id, u[2 * i], u[2 * i + 1], p,
                               scratch.data());
      else
        out[i] = mdlm_row_f32((const float*)logits + i * N, N, xt[i], mask_id, u[2 * i], u[2 * i + 1], p,
                              scratch.data());
    }
  }
}

// ------------------------------------------------------------------------------------------------
// rotary positions: one pass over the (B, L, 3, H, D) projection where the PyTorch expression takes
// several, forward and backward. Every product and sum is rounded on its own, as PyTorch's mul and
// add round: fp-contract=off keeps the compiler from fusing them into FMAs, so the result equals the
// oracle's bit for bit.

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif
namespace {

DIFFLM_INLINE float as_dtype(const float*, float v) { return v; }
DIFFLM_INLINE float as_dtype(const uint16_t*, float v) {  // rounded to bf16 and back
  uint16_t b;
  store(&b, 0, v);
  return load(&b, 0);
}

// o = x c + xp sp over n values; xp is the other half of the head and sp the sin at xp's positions
// (the forward reads sin at its own position: there sp = s)
template <class T>
DIFFLM_INLINE void rotary_half(const T* x, const T* xp, const float* c, const float* sp, bool transpose, int64_t n,
                               T* o) {
  if (transpose) {  // each product in T first: autograd rounds each path's gradient to x's dtype
    for (int64_t i = 0; i < n; ++i) store(o, i, as_dtype(x, load(x, i) * c[i]) + as_dtype(x, load(xp, i) * sp[i]));
  } else {
    for (int64_t i = 0; i < n; ++i) store(o, i, load(x, i) * c[i] + load(xp, i) * sp[i]);
  }
}

// one head's D values. Forward: y = x cos + swap(x) sin. Transpose: g cos + swap(g sin), whose second
// term at i reads g and sin at the partner of i
template <class T>
DIFFLM_INLINE void rotary_head(const T* x, const float* c, const float* s, bool transpose, int64_t D, T* o) {
  const int64_t h = D / 2;
  rotary_half(x, x + h, c, transpose ? s + h : s, transpose, h, o);
  rotary_half(x + h, x, c + h, transpose ? s : s + h, transpose, h, o + h);
}
DIFFLM_CLONES void rotary_head_f32(const float* x, const float* c, const float* s, bool t, int64_t D, float* o) {
  rotary_head(x, c, s, t, D, o);
}
DIFFLM_CLONES void rotary_head_bf16(const uint16_t* x, const float* c, const float* s, bool t, int64_t D, uint16_t* o) {
  rotary_head(x, c, s, t, D, o);
}

}  // namespace

void cpu_rotary(const void* x, int dtype, Strides4 xs, const float* cos, const float* sin, bool transpose, int64_t B,
                int64_t L, int64_t H, int64_t D, void* out, int nthreads) {
  const int64_t rows = B * L;
  const size_t bytes = dtype == BF16 ? 2 : 4;
#pragma omp parallel for schedule(static) num_threads(threads_for(rows, 3 * H * D, nthreads))
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t b = r / L, l = r % L;
    for (int64_t j = 0; j < 3; ++j) {
      for (int64_t h = 0; h < H; ++h) {
        const int64_t in = b * xs.b + l * xs.l + j * xs.j + h * xs.h, o = ((r * 3 + j) * H + h) * D;
        if (j == 2)  // values: copied as they are
          memcpy((char*)out + o * bytes, (const char*)x + in * bytes, D * bytes);
        else if (dtype == BF16)
          rotary_head_bf16((const uint16_t*)x + in, cos + l * D, sin + l * D, transpose, D, (uint16_t*)out + o);
        else
          rotary_head_f32((const float*)x + in, cos + l * D, sin + l * D, transpose, D, (float*)out + o);
      }
    }
  }
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

}  // namespace difflm

// ------------------------------------------------------------------------------------------------
// nearest_embedding (Diffusion-LM's clamp): for each query row the index of the best table row by
// score = x . Ehat_v + c_v, without an N x V score matrix.
//   cosine: Ehat_v = E_v / max(|E_v|, 1e-12), c_v = 0  (normalising x does not change the argmax)
//   L2:     Ehat_v = E_v, c_v = -|E_v|^2 / 2           (argmax of -|x - E_v|^2 / 2 + |x|^2 / 2)
// The table is packed once into panels of 16 rows, [panel][k][16] (padding rows: c = -inf), so a
// 6 x 16 register tile (12 accumulators of 8 floats) streams one panel per k with two loads and six
// broadcasts: a GEMM micro-kernel whose epilogue keeps, per query row and lane, the best score and
// its index. Rows are processed in chunks of NE_ROWS (per-thread state, in L1), panels in chunks
// that fit in L2. Ties: strict > in increasing index order within a lane, lowest index across lanes.
namespace difflm {
namespace {

typedef float nef8 __attribute__((vector_size(32)));
typedef int32_t nei8 __attribute__((vector_size(32)));
constexpr int64_t NE_LANES = 16, NE_TILE = 6, NE_ROWS = 96;

DIFFLM_INLINE nef8 ne_load(const float* p) { nef8 v; memcpy(&v, p, sizeof v); return v; }
DIFFLM_INLINE nei8 ne_loadi(const int32_t* p) { nei8 v; memcpy(&v, p, sizeof v); return v; }
DIFFLM_INLINE void ne_store(float* p, nef8 v) { memcpy(p, &v, sizeof v); }
DIFFLM_INLINE void ne_storei(int32_t* p, nei8 v) { memcpy(p, &v, sizeof v); }

// R (<= 6) query rows x (stride d) against panels [p0, p1); state best/arg: R x 16 lanes each
template <int R>
DIFFLM_INLINE void ne_tile(const float* x, int64_t d, const float* packed, const float* bias, int64_t p0,
                           int64_t p1, float* best, int32_t* arg) {
  const nei8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
  for (int64_t p = p0; p < p1; ++p) {
    const float* panel = packed + p * d * NE_LANES;
    nef8 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = nef8{};
    for (int64_t k = 0; k < d; ++k) {
      const nef8 e0 = ne_load(panel + k * NE_LANES), e1 = ne_load(panel + k * NE_LANES + 8);
      for (int r = 0; r < R; ++r) {
        const float xv = x[r * d + k];
        acc[r][0] += xv * e0;
        acc[r][1] += xv * e1;
      }
    }
    const nef8 c0 = ne_load(bias + p * NE_LANES), c1 = ne_load(bias + p * NE_LANES + 8);
    const nei8 i0 = lane + (int32_t)(p * NE_LANES), i1 = i0 + 8;
    for (int r = 0; r < R; ++r) {
      float* b = best + r * NE_LANES;
      int32_t* a = arg + r * NE_LANES;
      const nef8 s0 = acc[r][0] + c0, s1 = acc[r][1] + c1;
      const nef8 b0 = ne_load(b), b1 = ne_load(b + 8);
      const nei8 m0 = s0 > b0, m1 = s1 > b1;
      ne_store(b, m0 ? s0 : b0);
      ne_store(b + 8, m1 ? s1 : b1);
      ne_storei(a, m0 ? i0 : ne_loadi(a));
      ne_storei(a + 8, m1 ? i1 : ne_loadi(a + 8));
    }
  }
}

DIFFLM_CLONES void ne_rows(const float* x, int64_t rows, int64_t d, const float* packed, const float* bias, int64_t P,
             int64_t panels_per_chunk, float* best, int32_t* arg, int64_t* out) {
  for (int64_t i = 0; i < rows * NE_LANES; ++i) best[i] = -INFINITY, arg[i] = 0;
  for (int64_t p0 = 0; p0 < P; p0 += panels_per_chunk) {
    const int64_t p1 = std::min(P, p0 + panels_per_chunk);
    for (int64_t r0 = 0; r0 < rows; r0 += NE_TILE) {
      const float* xr = x + r0 * d;
      float* b = best + r0 * NE_LANES;
      int32_t* a = arg + r0 * NE_LANES;
      switch (std::min(NE_TILE, rows - r0)) {
        case 6: ne_tile<6>(xr, d, packed, bias, p0, p1, b, a); break;
        case 5: ne_tile<5>(xr, d, packed, bias, p0, p1, b, a); break;
        case 4: ne_tile<4>(xr, d, packed, bias, p0, p1, b, a); break;
        case 3: ne_tile<3>(xr, d, packed, bias, p0, p1, b, a); break;
        case 2: ne_tile<2>(xr, d, packed, bias, p0, p1, b, a); break;
        default: ne_tile<1>(xr, d, packed, bias, p0, p1, b, a); break;
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {  // lanes -> row: the best score, the lowest index among equals
    float bv = best[r * NE_LANES];
    int32_t ba = arg[r * NE_LANES];
    for (int64_t l = 1; l < NE_LANES; ++l) {
      const float v = best[r * NE_LANES + l];
      const int32_t a = arg[r * NE_LANES + l];
      if (v > bv || (v == bv && a < ba)) bv = v, ba = a;
    }
    out[r] = ba;
  }
}

}  // namespace

void cpu_nearest_pack(const float* E, int64_t V, int64_t d, int metric, float* packed, float* bias) {
  const int64_t P = (V + NE_LANES - 1) / NE_LANES;
  for (int64_t v = 0; v < P * NE_LANES; ++v) {
    const int64_t p = v / NE_LANES, l = v % NE_LANES;
    double sq = 0.0;
    if (v < V)
      for (int64_t k = 0; k < d; ++k) sq += (double)E[v * d + k] * E[v * d + k];
    const double norm = metric == NEAREST_COS ? std::max(sqrt(sq), 1e-12) : 1.0;  // divided, rounded once: a
    for (int64_t k = 0; k < d; ++k)  // row and its copies scaled by powers of two normalise alike, so ties stay ties
      packed[(p * d + k) * NE_LANES + l] = v < V ? (float)(E[v * d + k] / norm) : 0.0f;
    bias[v] = v >= V ? -INFINITY : metric == NEAREST_COS ? 0.0f : (float)(-0.5 * sq);
  }
}

void cpu_nearest_select(const uint16_t* screen, int64_t nq, const float* x, const float* h, NearestTable tab,
                        int64_t* out, int nthreads) {
  const int64_t V = tab.V, d = tab.d;
#pragma omp parallel for schedule(dynamic, 16) num_threads(nthreads)
  for (int64_t q = 0; q < nq; ++q) {
    const uint16_t* row = screen + q * V;
    auto bound = [&](int64_t v, float sign) {
      return tab.ct ? nearest_bound(load(row, v), h[q], tab.ct[2 * v], tab.ct[2 * v + 1], sign)
                    : nearest_bound(load(row, v), h[q], 0.0f, 1.0f, sign);
    };
    float lo = -INFINITY;
    for (int64_t v = 0; v < V; ++v) lo = std::max(lo, bound(v, -1.0f));
    int64_t cand[NEAREST_CAP], n = 0;
    for (int64_t v = 0; v < V && n <= NEAREST_CAP; ++v)
      if (bound(v, 1.0f) >= lo) {
        if (n < NEAREST_CAP) cand[n] = v;
        ++n;
      }
    if (n == 0 || n > NEAREST_CAP) {
      out[q] = -1;
      continue;
    }
    int64_t best = cand[0];
    float best_s = 0.0f;
    for (int64_t k = 0; k < n; ++k) {  // increasing index: strict > keeps the lowest of equal scores
      const float* t = tab.t + cand[k] * d;
      float acc = 0.0f;
      for (int64_t i = 0; i < d; ++i) acc += x[q * d + i] * t[i];
      const float s = tab.ct ? acc + tab.ct[2 * cand[k]] : acc;
      if (k == 0 || s > best_s) best = cand[k], best_s = s;
    }
    out[q] = best;
  }
}

void cpu_nearest_embedding(const float* x, int64_t N, int64_t d, const float* packed, const float* bias, int64_t V,
                           int64_t* out, int nthreads) {
  const int64_t P = (V + NE_LANES - 1) / NE_LANES;
  const int64_t ppc = std::max<int64_t>(1, (int64_t)(256 * 1024) / (NE_LANES * d * 4));  // ~256 KiB of table
  const int64_t chunks = (N + NE_ROWS - 1) / NE_ROWS;
#pragma omp parallel num_threads((int)std::max<int64_t>(1, std::min<int64_t>(nthreads, chunks)))
  {
    std::vector<float> best(NE_ROWS * NE_LANES);
    std::vector<int32_t> arg(NE_ROWS * NE_LANES);
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t r0 = c * NE_ROWS, rows = std::min(NE_ROWS, N - r0);
      ne_rows(x + r0 * d, rows, d, packed, bias, P, ppc, best.data(), arg.data(), out + r0);
    }
  }
}

}  // namespace difflm
