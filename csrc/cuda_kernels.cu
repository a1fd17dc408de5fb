// CUDA implementations of the difflm ops. Plain CUDA: no torch headers, so `nvcc -c` checks this
// file on a machine without torch or a GPU; binding.cpp calls the difflm_launch_* functions.
//
// A group of G threads (one warp, or a whole block) owns one row (position). Every thread of a
// group computes bitwise the same row totals (butterfly reductions, then a fixed-order sum over
// warps), so row decisions (masked? move?) never diverge inside a group.
//
// Score entropy streams the row once with 16-byte loads (and stores, in the backward), summing in
// fp32 per thread and in fp64 across threads (a thread holds at most N/G terms). A SEDD step first
// screens the row in that pass, with fp32 exponentials: a row that provably stays (most rows of a
// step, kernels.h) is done. The others, and MDLM's revealed rows, sum the row per warp segment, decide
// "move or stay", and only if they move walk the one segment holding the inverse-CDF target (warp
// scans in fp64); SEDD's exact path exponentiates in fp64, as the PyTorch oracle does. The
// per-sequence constants (fp64 logs and exponentials of sigma) come from a small launch before the
// rows, once per sequence.
#include <cuda_runtime.h>
#include <stdint.h>

#include "kernels.h"

namespace {

using namespace difflm;
constexpr unsigned FULL = 0xffffffffu;

__device__ __forceinline__ float bf16_to_f32(uint32_t b) { return __uint_as_float(b << 16); }
__device__ __forceinline__ uint32_t f32_to_bf16(float v) {
  const uint32_t b = __float_as_uint(v);
  return v != v ? 0x7FC0u : ((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

__device__ __forceinline__ float ld(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float ld(const uint16_t* p, int64_t i) { return bf16_to_f32(p[i]); }
__device__ __forceinline__ void st(float* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void st(uint16_t* p, int64_t i, float v) { p[i] = (uint16_t)f32_to_bf16(v); }

template <class T>
struct Vec {
  static constexpr int N = 16 / sizeof(T);
};

__device__ __forceinline__ void unpack(uint4 q, float* v, const float*) {
  v[0] = __uint_as_float(q.x), v[1] = __uint_as_float(q.y), v[2] = __uint_as_float(q.z), v[3] = __uint_as_float(q.w);
}
__device__ __forceinline__ void unpack(uint4 q, float* v, const uint16_t*) {
  const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) v[2 * j] = bf16_to_f32(w[j] & 0xffffu), v[2 * j + 1] = bf16_to_f32(w[j] >> 16);
}
__device__ __forceinline__ uint4 pack(const float* v, const float*) {
  return make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]), __float_as_uint(v[3]));
}
__device__ __forceinline__ uint4 pack(const float* v, const uint16_t*) {
  uint32_t w[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) w[j] = f32_to_bf16(v[2 * j]) | (f32_to_bf16(v[2 * j + 1]) << 16);
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// Visit y in [0, n) of a row, group-strided, with 16-byte loads (and stores when WRITE) where the
// row is aligned; f(y, value) returns the value to store.
template <class T, int G, bool WRITE, class F>
__device__ __forceinline__ void visit(const T* in, T* out, int64_t n, int tid, F&& f) {
  constexpr int V = Vec<T>::N;
  const uintptr_t mis = (uintptr_t)in & 15;
  int64_t head = (int64_t)(((16 - mis) & 15) / sizeof(T));
  if (WRITE && (((uintptr_t)out & 15) != mis)) head = n;  // mismatched alignment: scalar path
  if (head > n) head = n;
  for (int64_t y = tid; y < head; y += G) {
    const float r = f(y, ld(in, y));
    if (WRITE) st(out, y, r);
  }
  const int64_t nv = (n - head) / V;
  const uint4* vin = reinterpret_cast<const uint4*>(in + head);
  uint4* vout = reinterpret_cast<uint4*>(out + head);
#pragma unroll 4  // four 16-byte loads in flight per thread: one alone leaves HBM idle
  for (int64_t k = tid; k < nv; k += G) {
    float v[V];
    unpack(vin[k], v, in);
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = f(head + k * V + j, v[j]);
    if (WRITE) vout[k] = pack(v, in);
  }
  for (int64_t y = head + nv * V + tid; y < n; y += G) {
    const float r = f(y, ld(in, y));
    if (WRITE) st(out, y, r);
  }
}

template <class V>
__device__ __forceinline__ V warp_sum(V v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL, v, o));
  return v;
}

// group-wide sum, identical in every thread; sm holds G/32 doubles (unused when G == 32)
template <int G>
__device__ __forceinline__ double group_sum(double v, double* sm) {
  v = warp_sum(v);
  if (G == 32) return v;
  const int tid = threadIdx.x % G;
  __syncthreads();
  if ((tid & 31) == 0) sm[tid >> 5] = v;
  __syncthreads();
  double t = 0.0;
#pragma unroll
  for (int k = 0; k < G / 32; ++k) t += sm[k];
  return t;
}

template <int G>
__device__ __forceinline__ float group_max(float v, double* sm) {
  v = warp_max(v);
  if (G == 32) return v;
  const int tid = threadIdx.x % G;
  __syncthreads();
  if ((tid & 31) == 0) sm[tid >> 5] = (double)v;
  __syncthreads();
  float t = -INFINITY;
#pragma unroll
  for (int k = 0; k < G / 32; ++k) t = fmaxf(t, (float)sm[k]);
  return t;
}

// ---- per-sequence constants (kernels.h): their fp64 exponentials and logs once per sequence, in a
// launch of their own, not in every thread of every row, where they held up the row's loads

__global__ void se_consts_kernel(const double* __restrict__ sigma_bar, const float* __restrict__ shift, int graph,
                                 int64_t B, int64_t N, SEConsts* __restrict__ out) {
  const int64_t b = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (b < B) out[b] = se_consts(sigma_bar[b], graph, N, shift ? shift[b] : 0.0f);
}

__global__ void step_consts_kernel(const double* __restrict__ t, const float* __restrict__ shift, int step,
                                   int graph, int64_t B, int64_t N, StepConsts* __restrict__ out) {
  const int64_t b = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (b < B) out[b] = step_consts(t[b], step, graph, N, shift ? shift[b] : 0.0f);
}

unsigned blocks_for(int64_t n, int per_block) { return (unsigned)((n + per_block - 1) / per_block); }

// ---- score entropy: the loss (forward, BWD = false, reads only) or the gradient scaled by the
// upstream gradient w (backward: one read of the row, one write of its gradient). A stored value v is
// the log-score v - shift.

template <class T, int G, int R, bool BWD>
__global__ void __launch_bounds__(G * R)
se_kernel(const T* __restrict__ h_all, const int64_t* __restrict__ xt, const int64_t* __restrict__ x0,
          const SEConsts* __restrict__ consts, int graph, int64_t rows, int64_t L, int64_t N,
          float* __restrict__ loss, const float* __restrict__ grad_loss, T* __restrict__ g_all) {
  __shared__ double sm[R][G / 32];
  const int sub = threadIdx.x / G, tid = threadIdx.x % G;
  const int64_t row = (int64_t)blockIdx.x * R + sub;
  if (row >= rows) return;  // whole groups only
  const T* h = h_all + row * N;
  T* g = BWD ? g_all + row * N : nullptr;
  const float w = BWD ? grad_loss[row] : 1.0f;
  const int64_t x = xt[row], y0 = x0[row];
  const SEConsts& c = consts[row / L];
  const float shift = c.shift;  // in a register: the loops below read it per value
  if (graph == ABSORB) {
    const int64_t M = N - 1;
    if (x != M) {
      if (BWD) visit<T, G, true>(g, g, N, tid, [](int64_t, float) { return 0.0f; });
      else if (tid == 0) loss[row] = 0.0f;
      return;
    }
    float S = 0.0f;
    visit<T, G, BWD>(h, g, M, tid, [&](int64_t, float v) {
      const float s = expf(v - shift);
      if (!BWD) S += s;
      return s * w;
    });
    if (BWD) {
      if (G > 32) __syncthreads(); else __syncwarp();  // the row is written before the two fix-ups
      if (tid == 0) {
        st(g, M, 0.0f);
        st(g, y0, (float)(((double)expf(ld(h, y0) - shift) - c.r) * (double)w));
      }
      return;
    }
    const double St = group_sum<G>((double)S, sm[sub]);
    if (tid == 0) loss[row] = (float)(St - c.r * (double)(ld(h, y0) - shift) + c.k_same);
    return;
  }
  const bool same = x == y0;
  const float rho = same ? (float)c.r : 1.0f, coef = w / (float)N;
  float S = 0.0f, H = 0.0f;
  auto f = [&](int64_t, float v) {
    v -= shift;
    const float s = expf(v);
    if (!BWD) S += s, H += v;
    return (s - rho) * coef;
  };
  visit<T, G, BWD>(h, g, x, tid, f);
  visit<T, G, BWD>(h + x + 1, BWD ? g + x + 1 : nullptr, N - x - 1, tid, f);
  const double n = (double)N;
  if (BWD) {
    if (G > 32) __syncthreads(); else __syncwarp();
    if (tid == 0) {
      st(g, x, 0.0f);
      if (!same) st(g, y0, (float)(((double)expf(ld(h, y0) - shift) - 1.0 / c.r) / n * (double)w));
    }
    return;
  }
  const double St = group_sum<G>((double)S, sm[sub]), Ht = group_sum<G>((double)H, sm[sub]);
  if (tid == 0) {
    const float h0 = ld(h, y0) - shift;
    loss[row] = (float)(same ? St / n - c.r * Ht / n + c.k_same : St / n - Ht / n - (double)h0 * c.inv_e + c.k_diff);
  }
}

// ---- inverse CDF per group: segment sums, then a walk of one segment

template <int G>
struct Segments {
  static constexpr int NW = G / 32;
  int64_t lo, hi;  // this warp's segment
  __device__ Segments(int64_t n, int wid) {
    const int64_t seg = ((n + NW - 1) / NW + 31) / 32 * 32;
    lo = wid * seg < n ? wid * seg : n;
    hi = lo + seg < n ? lo + seg : n;
  }
};

// sum of w over this warp's segment into sm[wid]; returns the row total (same in every thread)
template <int G, class W>
__device__ __forceinline__ double segment_sums(const W& w, int64_t n, int tid, double* sm) {
  const int lane = tid & 31, wid = tid >> 5;
  const Segments<G> s(n, wid);
  double part = 0.0;
  for (int64_t y = s.lo + lane; y < s.hi; y += 32) part += w(y);
  part = warp_sum(part);
  if (G > 32) __syncthreads(); else __syncwarp();  // every reader of the last call's sm is done
  if (lane == 0) sm[wid] = part;
  if (G > 32) __syncthreads(); else __syncwarp();
  double t = 0.0;
  for (int k = 0; k < G / 32; ++k) t += sm[k];
  return t;
}

// the first y with running sum > target (searchsorted right=True), given segment_sums' sm;
// rounding that leaves the total short of target gives the last positive y; none: n_total - 1
template <int G, class W>
__device__ __forceinline__ int64_t walk(const W& w, int64_t n, double target, int64_t n_total, int tid, double* sm,
                                        long long* res) {
  constexpr int NW = G / 32;
  const int lane = tid & 31, wid = tid >> 5;
  int chosen = -1, last_pos = -1;
  double acc = 0.0, before = 0.0, before_last = 0.0;
  for (int k = 0; k < NW; ++k) {
    const double p = sm[k];
    if (chosen < 0 && acc + p > target) chosen = k, before = acc;
    if (p > 0.0) last_pos = k, before_last = acc;
    acc += p;
  }
  if (chosen < 0) chosen = last_pos, before = before_last;
  if (chosen < 0) return n_total - 1;
  if (wid == chosen) {
    const Segments<G> s(n, wid);
    double a = before;
    int64_t found = -1, lastp = -1;
    for (int64_t base = s.lo; base < s.hi; base += 32) {
      const int64_t y = base + lane;
      const double v = y < s.hi ? w(y) : 0.0;
      double inc = v;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const double t = __shfl_up_sync(FULL, inc, o);
        if (lane >= o) inc += t;
      }
      const unsigned hit = __ballot_sync(FULL, a + inc > target);
      if (hit) {
        found = base + __ffs(hit) - 1;
        break;
      }
      const unsigned pos = __ballot_sync(FULL, v > 0.0);
      if (pos) lastp = base + 31 - __clz(pos);
      a += __shfl_sync(FULL, inc, 31);
    }
    if (lane == 0) *res = found >= 0 ? found : (lastp >= 0 ? lastp : n_total - 1);
  }
  if (G > 32) __syncthreads(); else __syncwarp();
  return *res;
}

// ---- SEDD step screen (kernels.h): true when the row provably stays. One 16-byte-load pass of the
// hardware exp (__expf: within (2 + 1.2 |v|) ulp, so 2e-5 relative for |v| < 88, far below SCREEN,
// with the fp32 per-thread sums, (N / G) 2^-24), and a second for uniform Tweedie's clamped M when
// the first bound settles nothing. As in score entropy, a stored value v is the log-score v - shift.

template <class T, int G>
__device__ __forceinline__ bool screen_stays(const T* h, int64_t N, int64_t x, double u0, int step,
                                             const StepConsts& c, int tid, double* sm) {
  const float shift = c.shift;
  float part = 0.0f;
  visit<T, G, false>(h, (T*)nullptr, N, tid, [&](int64_t y, float v) {
    part += y == x ? 0.0f : __expf(v - shift);  // absorbing: x = MASK, the column the row skips
    return 0.0f;
  });
  // __expf flushes results below 2^-126 to 0: N of them add the last term
  const double S = group_sum<G>((double)part, sm) + (double)N * 0x1p-126;
  if (stays_below(S * (1.0 + SCREEN), u0, step, c)) return true;
  if (step == EULER) return false;  // that bound was M itself
  const double a = c.a, q = c.q, b = c.bS * (S + 1.0);
  double M = 0.0;
  visit<T, G, false>(h, (T*)nullptr, N, tid, [&](int64_t y, float v) {
    const double w = (a * (double)expf(v - shift) + b) * q;
    M += (w > 0.0 && y != x) ? w : 0.0;
    return 0.0f;
  });
  return tweedie_stays(group_sum<G>(M, sm), S, u0, N, c);
}

// ---- SEDD Euler / Tweedie step (two-stage: move with probability M / (M + w_x), then inverse CDF)

// A step is two launches. SCREEN: every row is screened (no fp64 path is compiled in, so the kernel
// is lean and many rows stream at once); out = x for a row that stays, -1 for one the second launch
// must decide. Otherwise: the exact fp64 path for the rows the screen left open (out < 0).
template <class T, int G, int R, bool SCREEN>
__global__ void __launch_bounds__(G * R)
sedd_kernel(const T* __restrict__ h_all, const int64_t* __restrict__ xt, const StepConsts* __restrict__ consts,
            const double* __restrict__ u, int step, int graph, int final_step, int64_t rows, int64_t L,
            int64_t N, int64_t* __restrict__ out) {
  __shared__ double sm[R][G / 32];
  __shared__ long long res[R];
  const int sub = threadIdx.x / G, tid = threadIdx.x % G;
  const int64_t row = (int64_t)blockIdx.x * R + sub;
  if (row >= rows || (!SCREEN && out[row] >= 0)) return;
  const T* h = h_all + row * N;
  const int64_t x = xt[row];
  const double u0 = u[2 * row], u1 = u[2 * row + 1];
  const StepConsts& c = consts[row / L];
  const float shift = c.shift;
  if constexpr (SCREEN) {
    // absorbing: a token other than MASK stays; a masked row's step has the Euler form (kernels.h)
    const bool settled = graph == ABSORB
                             ? x != N - 1 || (!final_step && screen_stays<T, G>(h, N, x, u0, EULER, c, tid, sm[sub]))
                             : screen_stays<T, G>(h, N, x, u0, step, c, tid, sm[sub]);
    if (tid == 0) out[row] = settled ? x : -1;
    return;
  }
  auto s = [&](int64_t k) { return exp((double)(ld(h, k) - shift)); };  // the score s_k, in fp64
  auto s_off_x = [&](int64_t k) { return k == x ? 0.0 : s(k); };       // over y != x
  int64_t y = x;
  if (graph == ABSORB) {  // x = MASK, the last column: the first N - 1 are the y != x
    const double S = segment_sums<G>(s, N - 1, tid, sm[sub]);
    const double Mv = c.a * S;
    double wx = final_step ? 0.0 : 1.0 - Mv;
    wx = wx > 0.0 ? wx : 0.0;
    if (u0 < Mv / (Mv + wx)) y = walk<G>(s, N - 1, u1 * S, N, tid, sm[sub], &res[sub]);
  } else if (step == EULER) {
    const double S = segment_sums<G>(s_off_x, N, tid, sm[sub]);
    const double Mv = c.a * c.q * S;
    double wx = 1.0 - Mv;
    wx = wx > 0.0 ? wx : 0.0;
    if (u0 < Mv / (Mv + wx)) y = walk<G>(s_off_x, N, u1 * S, N, tid, sm[sub], &res[sub]);
  } else {
    const double S = segment_sums<G>(s_off_x, N, tid, sm[sub]);
    const double b = c.bS * (S + 1.0), a = c.a, q = c.q;
    auto w = [&](int64_t k) {
      const double v = (a * s(k) + b) * q;
      return (v > 0.0 && k != x) ? v : 0.0;
    };
    const double Mv = segment_sums<G>(w, N, tid, sm[sub]);
    double wx = (a + b) * c.qx;
    wx = wx > 0.0 ? wx : 0.0;
    if (u0 < Mv / (Mv + wx)) y = walk<G>(w, N, u1 * Mv, N, tid, sm[sub], &res[sub]);
  }
  if (tid == 0) out[row] = y;
}

// ---- MDLM ancestral step: reveal iff u0 < p_unmask, token from softmax without the MASK column

template <class T, int G, int R>
__global__ void __launch_bounds__(G * R)
mdlm_kernel(const T* __restrict__ h_all, const int64_t* __restrict__ xt, const double* __restrict__ p,
            const double* __restrict__ u, int64_t mask, int64_t rows, int64_t L, int64_t N,
            int64_t* __restrict__ out) {
  __shared__ double sm[R][G / 32];
  __shared__ long long res[R];
  const int sub = threadIdx.x / G, tid = threadIdx.x % G;
  const int64_t row = (int64_t)blockIdx.x * R + sub;
  if (row >= rows) return;
  const int64_t x = xt[row];
  const double u0 = u[2 * row], u1 = u[2 * row + 1];
  int64_t y = x;
  if (x == mask && u0 < p[row / L]) {
    const T* h = h_all + row * N;
    float m = -INFINITY;
    for (int64_t k = tid; k < N; k += G) m = k == mask ? m : fmaxf(m, ld(h, k));
    m = group_max<G>(m, sm[sub]);
    double Z = 0.0;
    for (int64_t k = tid; k < N; k += G) Z += k == mask ? 0.0 : (double)expf(ld(h, k) - m);
    const float zf = (float)group_sum<G>(Z, sm[sub]);
    auto w = [&](int64_t k) { return k == mask ? 0.0 : (double)(expf(ld(h, k) - m) / zf); };
    const double total = segment_sums<G>(w, N, tid, sm[sub]);
    y = walk<G>(w, N, u1 * total, N, tid, sm[sub], &res[sub]);
  }
  if (tid == 0) out[row] = y;
}

// threads per row: a warp for short rows, a block for long ones; the body sees constexpr G and R
#define DIFFLM_BY_WIDTH(N, ...)                  \
  if ((N) <= 2048) {                             \
    constexpr int G = 32, R = 8;                 \
    __VA_ARGS__;                                  \
  } else if ((N) <= 16384) {                     \
    constexpr int G = 256, R = 1;                \
    __VA_ARGS__;                                  \
  } else {                                       \
    constexpr int G = 512, R = 1;                \
    __VA_ARGS__;                                  \
  }

}  // namespace

extern "C" {

int difflm_launch_score_entropy(const void* log_score, int dtype, const int64_t* xt, const int64_t* x0,
                                const double* sigma_bar, const float* shift, int graph, int64_t B, int64_t L,
                                int64_t N, float* loss, const float* grad_loss, void* grad, void* consts,
                                void* stream) {
  const int64_t rows = B * L;
  cudaStream_t st = (cudaStream_t)stream;
  SEConsts* c = (SEConsts*)consts;  // once per sequence, before the rows
  se_consts_kernel<<<blocks_for(B, 128), 128, 0, st>>>(sigma_bar, shift, graph, B, N, c);
  DIFFLM_BY_WIDTH(N, {
    const unsigned blocks = blocks_for(rows, R);
    if (dtype == BF16) {
      const uint16_t* h = (const uint16_t*)log_score;
      if (grad)
        se_kernel<uint16_t, G, R, true><<<blocks, G * R, 0, st>>>(h, xt, x0, c, graph, rows, L, N, loss,
                                                                   grad_loss, (uint16_t*)grad);
      else
        se_kernel<uint16_t, G, R, false><<<blocks, G * R, 0, st>>>(h, xt, x0, c, graph, rows, L, N, loss,
                                                                    grad_loss, nullptr);
    } else {
      const float* h = (const float*)log_score;
      if (grad)
        se_kernel<float, G, R, true><<<blocks, G * R, 0, st>>>(h, xt, x0, c, graph, rows, L, N, loss,
                                                                grad_loss, (float*)grad);
      else
        se_kernel<float, G, R, false><<<blocks, G * R, 0, st>>>(h, xt, x0, c, graph, rows, L, N, loss,
                                                                 grad_loss, nullptr);
    }
  });
  return (int)cudaGetLastError();
}

int difflm_launch_sedd_step(const void* log_score, int dtype, const int64_t* xt, const double* t, const float* shift,
                            const double* u, int step, int graph, int final_step, int64_t B, int64_t L, int64_t N,
                            int64_t* out, void* consts, void* stream) {
  const int64_t rows = B * L;
  cudaStream_t st = (cudaStream_t)stream;
  StepConsts* c = (StepConsts*)consts;  // once per sequence, before the rows
  step_consts_kernel<<<blocks_for(B, 128), 128, 0, st>>>(t, shift, step, graph, B, N, c);
  DIFFLM_BY_WIDTH(N, {
    const unsigned blocks = blocks_for(rows, R);
    if (dtype == BF16) {
      const uint16_t* h = (const uint16_t*)log_score;
      sedd_kernel<uint16_t, G, R, true><<<blocks, G * R, 0, st>>>(h, xt, c, u, step, graph, final_step, rows, L, N, out);
      sedd_kernel<uint16_t, G, R, false><<<blocks, G * R, 0, st>>>(h, xt, c, u, step, graph, final_step, rows, L, N, out);
    } else {
      const float* h = (const float*)log_score;
      sedd_kernel<float, G, R, true><<<blocks, G * R, 0, st>>>(h, xt, c, u, step, graph, final_step, rows, L, N, out);
      sedd_kernel<float, G, R, false><<<blocks, G * R, 0, st>>>(h, xt, c, u, step, graph, final_step, rows, L, N, out);
    }
  });
  return (int)cudaGetLastError();
}

int difflm_launch_mdlm_step(const void* logits, int dtype, const int64_t* xt, const double* p_unmask,
                            const double* u, int64_t mask_id, int64_t B, int64_t L, int64_t N, int64_t* out,
                            void* stream) {
  const int64_t rows = B * L;
  cudaStream_t st = (cudaStream_t)stream;
  DIFFLM_BY_WIDTH(N, {
    if (dtype == BF16)
      mdlm_kernel<uint16_t, G, R><<<blocks_for(rows, R), G * R, 0, st>>>((const uint16_t*)logits, xt, p_unmask, u,
                                                                          mask_id, rows, L, N, out);
    else
      mdlm_kernel<float, G, R><<<blocks_for(rows, R), G * R, 0, st>>>((const float*)logits, xt, p_unmask, u, mask_id,
                                                                       rows, L, N, out);
  });
  return (int)cudaGetLastError();
}

}  // extern "C"

// ------------------------------------------------------------------------------------------------
// nearest_embedding (Diffusion-LM's clamp): score = x . Ehat_v + c_v as in cpu_kernels.cpp (cosine:
// Ehat = E / max(|E|, 1e-12), c = 0; L2: Ehat = E, c = -|E|^2 / 2). A block owns 64 query rows and
// walks the table in 64-row tiles through shared memory, 16 dimensions at a time (a plain SGEMM
// tiling, 4 x 4 outputs per thread); the epilogue keeps each thread's best score and index per row,
// and 16-lane shuffles reduce them at the end. Ties: the lowest index, as the CPU kernel and argmax.
namespace {

constexpr int NE_BM = 64, NE_BN = 64, NE_BK = 16, NE_THREADS = 256;

__global__ void ne_pack_kernel(const float* __restrict__ E, int64_t V, int64_t d, int metric, float* __restrict__ table,
                               float* __restrict__ bias) {
  const int64_t v = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (v >= V) return;
  double sq = 0.0;
  for (int64_t k = lane; k < d; k += 32) sq += (double)E[v * d + k] * E[v * d + k];
  for (int o = 16; o > 0; o >>= 1) sq += __shfl_xor_sync(FULL, sq, o);
  const double norm = metric == NEAREST_COS ? fmax(sqrt(sq), 1e-12) : 1.0;  // divided, rounded once (cpu_kernels.cpp)
  for (int64_t k = lane; k < d; k += 32) table[v * d + k] = (float)(E[v * d + k] / norm);
  if (lane == 0) bias[v] = metric == NEAREST_COS ? 0.0f : (float)(-0.5 * sq);
}

__global__ void __launch_bounds__(NE_THREADS) ne_search_kernel(const float* __restrict__ x, int64_t N, int64_t d,
                                                               const float* __restrict__ table,
                                                               const float* __restrict__ bias, int64_t V,
                                                               int64_t* __restrict__ out) {
  __shared__ float xs[NE_BK][NE_BM + 1];  // +1 column: a warp's stores (k fastest) conflict 2-way, not 16-way
  __shared__ float es[NE_BK][NE_BN + 1];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t m0 = (int64_t)blockIdx.x * NE_BM;
  float best[4];
  int64_t arg[4];
  for (int i = 0; i < 4; ++i) best[i] = -INFINITY, arg[i] = 0;
  for (int64_t n0 = 0; n0 < V; n0 += NE_BN) {
    float acc[4][4] = {};
    for (int64_t k0 = 0; k0 < d; k0 += NE_BK) {
      for (int e = tid; e < NE_BM * NE_BK; e += NE_THREADS) {
        const int r = e / NE_BK, k = e % NE_BK;
        const int64_t row = m0 + r, col = k0 + k, v = n0 + r;
        xs[k][r] = row < N && col < d ? x[row * d + col] : 0.0f;
        es[k][r] = v < V && col < d ? table[v * d + col] : 0.0f;
      }
      __syncthreads();
#pragma unroll
      for (int k = 0; k < NE_BK; ++k) {
        float a[4], b[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = xs[k][ty * 4 + i], b[i] = es[k][tx + 16 * i];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // increasing index within the thread: strict > keeps the lowest
      const int64_t v = n0 + tx + 16 * j;
      if (v >= V) continue;
      const float c = bias[v];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float s = acc[i][j] + c;
        if (s > best[i]) best[i] = s, arg[i] = v;
      }
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float bv = best[i];
    int64_t ba = arg[i];
    for (int o = 8; o > 0; o >>= 1) {  // within the 16 lanes that share these rows
      const float ov = __shfl_xor_sync(FULL, bv, o);
      const int64_t oa = __shfl_xor_sync(FULL, ba, o);
      if (ov > bv || (ov == bv && oa < ba)) bv = ov, ba = oa;
    }
    const int64_t row = m0 + ty * 4 + i;
    if (tx == 0 && row < N) out[row] = ba;
  }
}

// The screened clamp's decision (kernels.h), a block per query: two passes over its screen row (the best
// lower bound, then the rows whose upper bound reaches it, gathered in shared memory), then a warp per
// candidate scores it in fp32 and thread 0 keeps the best, ties to the lowest index.
constexpr int NS_THREADS = 256;

__global__ void __launch_bounds__(NS_THREADS) ne_select_kernel(const uint16_t* __restrict__ screen,
                                                                const float* __restrict__ x,
                                                                const float* __restrict__ h, NearestTable tab,
                                                                int64_t* __restrict__ out) {
  __shared__ double sm[NS_THREADS / 32];
  __shared__ int cand[NEAREST_CAP];
  __shared__ float score[NEAREST_CAP];
  __shared__ int count;
  const int tid = threadIdx.x, lane = tid % 32, wid = tid / 32;
  const int64_t q = blockIdx.x;
  const uint16_t* row = screen + q * tab.V;
  const float hq = h[q];
  const float2* ct = reinterpret_cast<const float2*>(tab.ct);
  auto bound = [&](int64_t v, float s, float sign) {
    const float2 p = ct ? ct[v] : make_float2(0.0f, 1.0f);
    return nearest_bound(s, hq, p.x, p.y, sign);
  };
  float lo = -INFINITY;
  visit<uint16_t, NS_THREADS, false>(row, (uint16_t*)nullptr, tab.V, tid, [&](int64_t v, float s) {
    lo = fmaxf(lo, bound(v, s, -1.0f));
    return 0.0f;
  });
  lo = group_max<NS_THREADS>(lo, sm);
  if (tid == 0) count = 0;
  __syncthreads();
  visit<uint16_t, NS_THREADS, false>(row, (uint16_t*)nullptr, tab.V, tid, [&](int64_t v, float s) {
    if (bound(v, s, 1.0f) >= lo) {
      const int k = atomicAdd(&count, 1);
      if (k < NEAREST_CAP) cand[k] = (int)v;
    }
    return 0.0f;
  });
  __syncthreads();
  const int n = count;
  if (n == 0 || n > NEAREST_CAP) {  // none (a non-finite screen) or crowded: the fp32 search decides
    if (tid == 0) out[q] = -1;
    return;
  }
  for (int k = wid; k < n; k += NS_THREADS / 32) {
    const float* t = tab.t + (int64_t)cand[k] * tab.d;
    const float* xq = x + q * tab.d;
    float acc = 0.0f;
    for (int64_t i = lane; i < tab.d; i += 32) acc = fmaf(xq[i], t[i], acc);
    acc = warp_sum(acc);
    if (lane == 0) score[k] = ct ? acc + ct[cand[k]].x : acc;
  }
  __syncthreads();
  if (tid == 0) {
    int best = cand[0];
    float best_s = score[0];
    for (int k = 1; k < n; ++k)
      if (score[k] > best_s || (score[k] == best_s && cand[k] < best)) best = cand[k], best_s = score[k];
    out[q] = best;
  }
}

}  // namespace

extern "C" int difflm_launch_nearest_select(const uint16_t* screen, int64_t nq, const float* x, const float* h,
                                            NearestTable tab, int64_t* out, void* stream) {
  ne_select_kernel<<<(unsigned)nq, NS_THREADS, 0, (cudaStream_t)stream>>>(screen, x, h, tab, out);
  return (int)cudaGetLastError();
}

extern "C" int difflm_launch_nearest_embedding(const float* x, int64_t N, int64_t d, const float* E, int64_t V,
                                               int metric, float* table, float* bias, int64_t* out, void* stream) {
  cudaStream_t st = (cudaStream_t)stream;
  ne_pack_kernel<<<(unsigned)((V + 7) / 8), 256, 0, st>>>(E, V, d, metric, table, bias);
  ne_search_kernel<<<(unsigned)((N + NE_BM - 1) / NE_BM), NE_THREADS, 0, st>>>(x, N, d, table, bias, V, out);
  return (int)cudaGetLastError();
}

// ------------------------------------------------------------------------------------------------
// rotary positions (cpu_kernels.cpp): a warp per position (b, l), lanes along the head dimension, so no
// thread divides per value. A lane loads its entries of ROT_U head vectors before it stores any: one
// vector at a time would leave a warp a single load in flight. Products and sums are rounded one by one
// (__fmul_rn, __fadd_rn: never an FMA), so the result is PyTorch's mul and add bit for bit.
namespace {

constexpr int ROT_U = 4;

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(uint16_t v) { return bf16_to_f32(v); }
__device__ __forceinline__ float as_dtype(const float*, float v) { return v; }
__device__ __forceinline__ float as_dtype(const uint16_t*, float v) { return bf16_to_f32(f32_to_bf16(v)); }

template <class T>
__global__ void rotary_kernel(const T* __restrict__ x, Strides4 xs, const float* __restrict__ cos,
                              const float* __restrict__ sin, bool transpose, int64_t B, int64_t L, int64_t H,
                              int64_t D, T* __restrict__ out) {
  const int64_t half = D / 2, vectors = 3 * H, warps = (int64_t)gridDim.x * blockDim.x / 32;
  const int lane = threadIdx.x % 32;
  for (int64_t r = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) / 32; r < B * L; r += warps) {
    const int64_t b = r / L, l = r % L;
    const float *c = cos + l * D, *sn = sin + l * D;
    const T* at = x + b * xs.b + l * xs.l;
    T* o = out + r * vectors * D;  // vector v = j H + h of the output, j = 2 the values
    for (int64_t v0 = 0; v0 < vectors; v0 += ROT_U, o += ROT_U * D) {
      const T* src[ROT_U];
#pragma unroll
      for (int u = 0; u < ROT_U; ++u) {
        const int64_t v = v0 + u < vectors ? v0 + u : v0;  // past the last vector: read again, not stored
        src[u] = at + (v / H) * xs.j + (v % H) * xs.h;
      }
      for (int64_t i = lane; i < D; i += 32) {
        const int64_t p = i < half ? i + half : i - half;  // the partner: x cos + swap(x) sin, g cos + swap(g sin)
        const float ci = c[i], si = sn[transpose ? p : i];
        T xi[ROT_U], xp[ROT_U];
#pragma unroll
        for (int u = 0; u < ROT_U; ++u) xi[u] = src[u][i], xp[u] = src[u][p];
#pragma unroll
        for (int u = 0; u < ROT_U; ++u) {
          if (v0 + u >= vectors) break;
          T* ov = o + u * D;
          if (v0 + u >= 2 * H) {  // values: copied as they are
            ov[i] = xi[u];
            continue;
          }
          const float a = __fmul_rn(to_f32(xi[u]), ci), s = __fmul_rn(to_f32(xp[u]), si);
          st(ov, i, transpose ? __fadd_rn(as_dtype(ov, a), as_dtype(ov, s)) : __fadd_rn(a, s));
        }
      }
    }
  }
}

}  // namespace

extern "C" int difflm_launch_rotary(const void* x, int dtype, Strides4 xs, const float* cos, const float* sin,
                                    int transpose, int64_t B, int64_t L, int64_t H, int64_t D, void* out,
                                    void* stream) {
  const int threads = 256;  // 8 warps, 8 positions at a time
  const int64_t want = (B * L + 7) / 8, most = int64_t(1) << 20;  // the grid-stride loop does the rest
  const unsigned blocks = (unsigned)(want < most ? want : most);
  cudaStream_t st = (cudaStream_t)stream;
  if (dtype == BF16)
    rotary_kernel<uint16_t><<<blocks, threads, 0, st>>>((const uint16_t*)x, xs, cos, sin, transpose != 0, B, L, H, D,
                                                        (uint16_t*)out);
  else
    rotary_kernel<float><<<blocks, threads, 0, st>>>((const float*)x, xs, cos, sin, transpose != 0, B, L, H, D,
                                                     (float*)out);
  return (int)cudaGetLastError();
}
