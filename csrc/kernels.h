// difflm fused kernels: plain C/C++ declarations shared by the CPU code (cpu_kernels.cpp), the CUDA
// code (cuda_kernels.cu) and the torch binding (binding.cpp). No torch headers here, so nvcc -c
// compiles the .cu file on a machine without torch or a GPU.
//
// Conventions: one "row" is one position (b, l) of a (B, L, N) score tensor, rows are contiguous;
// bf16 travels as raw uint16_t bits; token ids are int64; uniforms and per-sequence times float64.
#pragma once
#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define DIFFLM_HD __host__ __device__ __forceinline__
#else
#define DIFFLM_HD inline
#endif

namespace difflm {

enum Graph { ABSORB = 0, UNIFORM = 1 };
enum Dtype { F32 = 0, BF16 = 1 };
enum Step { EULER = 0, TWEEDIE = 1 };

// K(a) = a (log a - 1) with K(0) = 0 (docs/sedd.md)
DIFFLM_HD double K(double a) { return a > 0.0 ? a * (log(a) - 1.0) : 0.0; }

// Per-sequence constants of the score-entropy loss (docs/sedd.md), from sigma_bar in fp64.
struct SEConsts {
  double r;       // absorbing: 1/expm1(sigma_bar); uniform: e/(e+N) with e = expm1(sigma_bar)
  double inv_e;   // 1/expm1(sigma_bar): 0 where expm1 overflows, so r -> 1, its limit, not inf/inf
  double k_same;  // constant term of D when x = x0 (uniform) or x = MASK (absorbing)
  double k_diff;  // uniform, x != x0
  float shift;    // log s_y = log_score_y - shift, in fp32 (0 without one): a bf16 head's large offset kept exact
};

DIFFLM_HD SEConsts se_consts(double sigma_bar, int graph, int64_t N, float shift) {
  SEConsts c;
  c.shift = shift;
  c.inv_e = 1.0 / expm1(sigma_bar);
  if (graph == ABSORB) {
    c.r = c.inv_e;
    c.k_same = K(c.r);
    c.k_diff = 0.0;
  } else {
    double n = (double)N;
    c.r = 1.0 / (1.0 + n * c.inv_e);
    c.k_same = (n - 1.0) / n * K(c.r);
    c.k_diff = (K(1.0 + n * c.inv_e) - (n - 2.0)) / n;  // K(1/r)
  }
  return c;
}

// The linear map of a sampling step, per sequence: a move weight is w_y = clamp0(a s_y + b) * q for
// y != x, with b depending on the row sum S (uniform Tweedie only). See cpu_kernels.cpp.
struct StepConsts {
  double a, q;   // w_y = max(0, (a s_y + bS) q)
  double bS;     // coefficient of S in b = bS * S
  double qx;     // uniform Tweedie: transition into x, (1 - e^-ds)/N + e^-ds
  float shift;   // log s_y = log_score_y - shift, in fp32 (0 without one), as in SEConsts
};

DIFFLM_HD StepConsts step_consts(double t, int step, int graph, int64_t N, float shift) {
  // t: rate_dt = sigma(t) dt for Euler, dsigma for Tweedie
  StepConsts c;
  c.shift = shift;
  c.bS = 0.0;
  c.qx = 0.0;
  if (step == EULER) {
    c.a = t;
    c.q = graph == ABSORB ? 1.0 : 1.0 / (double)N;
  } else if (graph == ABSORB) {
    c.a = expm1(t);  // (e^ds - 1) s_y
    c.q = 1.0;
  } else {
    double n = (double)N;
    c.a = exp(t);          // staggered score: e^ds s_y + (1 - e^ds) S / N
    c.bS = -expm1(t) / n;
    c.q = -expm1(-t) / n;  // transition y -> x: (1 - e^-ds) / N
    c.qx = c.q + exp(-t);
  }
  return c;
}

// The screen of a sampling step (cpu_kernels.cpp and cuda_kernels.cu): a row usually stays, and
// proving that needs no fp64 exponentials. The stay/move threshold p = M / (M + w_x) grows with
// S = sum_{y != x} s_y: in the Euler form (step == EULER, which a masked absorbing row has for both
// steps) M = a q S and w_x = 1 - M; for uniform Tweedie b = bS (S + 1) <= 0, so M <= q a S and
// w_x = (a + b) qx shrinks as S grows. A u0 at or above the threshold of an upper bound Sb >= S
// stays exactly as the fp64 oracle would. SCREEN is the relative margin put on fp32 bounds, far
// above their rounding (~1e-5); a NaN or inf bound settles nothing (u0 >= NaN is false).
constexpr double SCREEN = 1e-4;

DIFFLM_HD bool stays_below(double Sb, double u0, int step, const StepConsts& c) {
  if (c.bS > 0.0) return false;  // never, for ds >= 0 (Euler: bS = 0); then S bounds nothing
  const double Mhi = c.a * c.q * Sb;
  double wlo = step == EULER ? 1.0 - Mhi : (c.a + c.bS * (Sb + 1.0)) * c.qx;
  wlo = wlo > 0.0 ? wlo : 0.0;
  return u0 >= Mhi / (Mhi + wlo);
}

// Uniform Tweedie, second bound: M = sum_{y != x} max(0, (a s_y + b) q) summed over fp32 exps (M,
// with S their fp32 sum, each within SCREEN); max(0, .) is 1-Lipschitz, so the errors carry over.
DIFFLM_HD bool tweedie_stays(double M, double S, double u0, int64_t N, const StepConsts& c) {
  const double b = c.bS * (S + 1.0);
  const double db = fabs(c.bS) * (S + 1.0) * SCREEN;  // bound on the error of b
  const double Mhi = M + c.q * (c.a * S * SCREEN + (double)N * db) + M * SCREEN;
  double wlo = (c.a + b - db) * c.qx;
  wlo = wlo > 0.0 ? wlo : 0.0;
  return u0 >= Mhi / (Mhi + wlo);  // NaN (0 / 0) is not settled here
}

// ---- CPU (cpu_kernels.cpp); nthreads: OpenMP threads (torch's intra-op count)
// score entropy: the loss (B, L) into loss when given; the gradient into grad when given, scaled by
// grad_loss (B, L) when given (else by 1: both in one pass, as score_entropy_with_grad); shift (B,) fp32
// or null: log s = log_score - shift[b]
void cpu_score_entropy(const void* log_score, int dtype, const int64_t* xt, const int64_t* x0,
                       const double* sigma_bar, const float* shift, int graph, int64_t B, int64_t L, int64_t N,
                       float* loss, const float* grad_loss, void* grad, int nthreads);
// SEDD steps: shift (B,) fp32 or null, as above
void cpu_sedd_step(const void* log_score, int dtype, const int64_t* xt, const double* t, const float* shift,
                   const double* u, int step, int graph, bool final_step, int64_t B, int64_t L, int64_t N,
                   int64_t* out, int nthreads);
void cpu_mdlm_step(const void* logits, int dtype, const int64_t* xt, const double* p_unmask, const double* u,
                   int64_t mask_id, int64_t B, int64_t L, int64_t N, int64_t* out, int nthreads);


// ---- nearest_embedding (Diffusion-LM's clamp): the table packed once (cpu_nearest_pack: P = ceil(V / 16)
// panels of 16 rows, [P][d][16] floats, and a bias of P * 16 floats), then the argmax per query row
enum Nearest { NEAREST_COS = 0, NEAREST_L2 = 1 };
void cpu_nearest_pack(const float* E, int64_t V, int64_t d, int metric, float* packed, float* bias);
void cpu_nearest_embedding(const float* x, int64_t N, int64_t d, const float* packed, const float* bias, int64_t V,
                           int64_t* out, int nthreads);

// ---- the screened clamp (nearest_embedding_screened, binding.cpp): screen (nq, V) bf16 holds the bf16 GEMM's
// x_q . t_v, and s_v = screen + c_v is within e_v = h_q |t_v| + 2^-22 |c_v| of the fp32 score x_q . t_v + c_v
// (the second term: adding c_v rounds). Query q keeps the rows with s_v + e_v >= max_u (s_u - e_u), scores
// them in fp32 and returns the best, ties to the lowest index; -1 when none or more than NEAREST_CAP qualify
// (the fp32 search decides those).
constexpr int NEAREST_CAP = 256;
struct NearestTable {
  const float* t;   // (V, d): the table the fp32 search scores
  const float* ct;  // (V, 2): c_v, |t_v| (L2); nullptr: c_v = 0, |t_v| counted as 1 (cosine)
  int64_t V, d;
};
// s_v -+ e_v (sign -1: the lower bound, +1: the upper) from screen score s, c = c_v and tn = |t_v| (cosine:
// c = 0, tn = 1, which leaves s -+ h exactly)
DIFFLM_HD float nearest_bound(float s, float h, float c, float tn, float sign) {
  return s + c + sign * (h * tn + fabsf(c) * 0x1p-22f);
}
void cpu_nearest_select(const uint16_t* screen, int64_t nq, const float* x, const float* h, NearestTable tab,
                        int64_t* out, int nthreads);

// ---- rotary positions (common.apply_rotary): qkv (B, L, 3, H, D) -> out (B, L, 3, H, D), contiguous, in qkv's
// dtype: queries and keys at position l turned as x cos + swap(x) sin, where swap exchanges the two halves of
// the last dimension, values copied. transpose (its backward): g cos + swap(g sin) for queries and keys, with
// both products rounded to the dtype first, as autograd through the PyTorch expression rounds them. Both
// exactly as PyTorch's separate mul and add round, never fused (FMA). x: strides (in elements) of its first
// four dimensions in xs, the last contiguous; cos, sin (L, D) fp32.
struct Strides4 { int64_t b, l, j, h; };
void cpu_rotary(const void* x, int dtype, Strides4 xs, const float* cos, const float* sin, bool transpose, int64_t B,
                int64_t L, int64_t H, int64_t D, void* out, int nthreads);

}  // namespace difflm

// ---- CUDA launchers (cuda_kernels.cu); stream is a cudaStream_t; return a cudaError_t as int. consts:
// device scratch for B SEConsts (score entropy) or StepConsts (the SEDD steps), filled by the launcher
extern "C" {
int difflm_launch_score_entropy(const void* log_score, int dtype, const int64_t* xt, const int64_t* x0,
                                const double* sigma_bar, const float* shift, int graph, int64_t B, int64_t L, int64_t N,
                                float* loss, const float* grad_loss, void* grad, void* consts, void* stream);
int difflm_launch_sedd_step(const void* log_score, int dtype, const int64_t* xt, const double* t,
                            const float* shift, const double* u, int step, int graph, int final_step, int64_t B,
                            int64_t L, int64_t N, int64_t* out, void* consts, void* stream);
int difflm_launch_mdlm_step(const void* logits, int dtype, const int64_t* xt, const double* p_unmask,
                            const double* u, int64_t mask_id, int64_t B, int64_t L, int64_t N, int64_t* out,
                            void* stream);
// nearest_embedding: normalised table (V, d) + bias (V,) into table/bias (work buffers), then the search
int difflm_launch_nearest_embedding(const float* x, int64_t N, int64_t d, const float* E, int64_t V, int metric,
                                    float* table, float* bias, int64_t* out, void* stream);
int difflm_launch_nearest_select(const uint16_t* screen, int64_t nq, const float* x, const float* h,
                                 difflm::NearestTable tab, int64_t* out, void* stream);
int difflm_launch_rotary(const void* x, int dtype, difflm::Strides4 xs, const float* cos, const float* sin,
                         int transpose, int64_t B, int64_t L, int64_t H, int64_t D, void* out, void* stream);
}
