// The torch binding of the difflm kernels: op schemas (TORCH_LIBRARY namespace difflm), input
// checks with messages that name the argument, and dispatch to the CPU functions or the CUDA
// launchers. Fake (meta) implementations are registered from Python (difflm_ops.py), the autograd of
// score_entropy by sedd.py and of rotary by common.py through it.
//
//   score_entropy(log_score, xt, x0, sigma_bar, graph, shift=None) -> loss (B, L) fp32; log s = log_score - shift
//   score_entropy_backward(grad_loss, log_score, xt, x0, sigma_bar, graph, shift=None) -> grad (B, L, N), input dtype
//   score_entropy_with_grad(log_score, xt, x0, sigma_bar, graph, shift=None) -> (loss, grad of loss.sum()), CPU only:
//     one pass that reads the scores once for both (the CPU training path; on a GPU the bytes cost
//     more than the exps, so the forward only reads and the backward recomputes)
//   sedd_euler_step(log_score, xt, rate_dt, u, graph, shift=None) -> x_s (B, L); log s = log_score - shift
//   sedd_tweedie_step(log_score, xt, dsigma, u, graph, final, shift=None) -> x_s (B, L)
//   mdlm_ancestral_step(logits, xt, p_unmask, u, mask_id) -> x_s (B, L)
//   nearest_embedding(x, E, metric) -> ids (N,): nearest row of E by 'cos' or 'l2' (Diffusion-LM's clamp)
//   nearest_embedding_screened(x, E, metric, chunk_entries) -> ids (N,): the same by a bf16 screen and an fp32
//     decision, a GPU's path for large tables (nearest_embedding takes it there); on the CPU for the tests
//   rotary(qkv, cos, sin, transpose) -> (B, L, 3, H, D) contiguous: common.apply_rotary, or (transpose) its backward
//   cuda_built() -> bool
#include <ATen/ATen.h>
#include <cmath>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <utility>
#include <vector>

#include "kernels.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

#ifdef DIFFLM_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace {

using at::Tensor;

int graph_id(c10::string_view graph) {
  if (graph == "absorb") return difflm::ABSORB;
  if (graph == "uniform") return difflm::UNIFORM;
  TORCH_CHECK(false, "difflm: graph must be 'absorb' or 'uniform', got '", std::string(graph), "'");
}

// scores / logits: (B, L, N), float32 or bfloat16, contiguous
int check_scores(const Tensor& t, const char* name, int64_t min_n) {
  TORCH_CHECK(t.dim() == 3, "difflm: ", name, " must have shape (B, L, N), got ", t.dim(), " dimensions ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, "difflm: ", name,
              " must be float32 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "difflm: ", name, " must be contiguous (call .contiguous() first)");
  TORCH_CHECK(t.size(2) >= min_n, "difflm: ", name, " needs at least ", min_n, " states in its last dimension, got ",
              t.size(2));
  TORCH_CHECK(t.device().is_cpu() || t.device().is_cuda(), "difflm: ", name, " must be on cpu or cuda, got ",
              t.device());
#ifndef DIFFLM_CUDA
  TORCH_CHECK(t.device().is_cpu(), "difflm: ", name, " is on ", t.device(),
              " but the kernels were built without CUDA; use the PyTorch path (DIFFLM_KERNELS=0)");
#endif
  return t.scalar_type() == at::kBFloat16 ? difflm::BF16 : difflm::F32;
}

void check_like(const Tensor& t, const char* name, const Tensor& ref, at::IntArrayRef shape, at::ScalarType dtype,
                const char* shape_text, const char* ref_name = "the scores") {
  TORCH_CHECK(t.device() == ref.device(), "difflm: ", name, " must be on ", ref.device(), " like ", ref_name, ", got ",
              t.device());
  TORCH_CHECK(t.sizes() == shape, "difflm: ", name, " must have shape ", shape_text, " = ", shape, ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "difflm: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "difflm: ", name, " must be contiguous (call .contiguous() first)");
}

// The (min, max) of each tensor, as doubles, all copied to the host together: an op's range checks
// cost one synchronisation on a GPU, not one each. Empty tensors have none (nullopt). Token ids are
// exact as doubles below 2^53, and any id past that is out of range either way.
using Range = std::optional<std::pair<double, double>>;
std::vector<Range> ranges_of(std::initializer_list<Tensor> ts) {
  std::vector<Tensor> parts;
  for (const Tensor& t : ts) {
    if (t.numel() == 0) continue;
    auto mm = at::aminmax(t);
    parts.push_back(std::get<0>(mm).to(at::kDouble).reshape({1}));
    parts.push_back(std::get<1>(mm).to(at::kDouble).reshape({1}));
  }
  const Tensor host = parts.empty() ? Tensor() : at::cat(parts).cpu();
  std::vector<Range> out;
  int64_t k = 0;
  for (const Tensor& t : ts) {
    if (t.numel() == 0) {
      out.push_back(std::nullopt);
    } else {
      out.push_back(std::make_pair(host.data_ptr<double>()[k], host.data_ptr<double>()[k + 1]));
      k += 2;
    }
  }
  return out;
}

void check_ids(const Range& r, const char* name, int64_t hi, const char* what) {
  if (!r) return;
  auto id = [](double v) { return (int64_t)std::clamp(v, -9.2e18, 9.2e18); };  // back to an int64 to print
  TORCH_CHECK(r->first >= 0 && r->second < (double)hi, "difflm: ", name, " holds token ids in [", id(r->first), ", ",
              id(r->second), "] but must lie in [0, ", hi - 1, "] (", what, ")");
}

// A fresh CPU buffer for the gradient, backed by transparent huge pages where the kernel offers
// them (THP "madvise" mode): first-touch costs one page fault per 2 MiB instead of per 4 KiB, which
// on a VM is most of the time of writing a B x L x V gradient.
Tensor empty_grad_like(const Tensor& t) {
  Tensor out = at::empty_like(t);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const size_t bytes = out.nbytes(), page = 4096;
  if (out.is_cpu() && bytes >= (size_t(4) << 20)) {
    const uintptr_t lo = ((uintptr_t)out.data_ptr() + page - 1) & ~(uintptr_t)(page - 1);
    const uintptr_t hi = ((uintptr_t)out.data_ptr() + bytes) & ~(uintptr_t)(page - 1);
    if (hi > lo) madvise((void*)lo, hi - lo, MADV_HUGEPAGE);  // advice only: failure changes nothing
  }
#endif
  return out;
}

#ifdef DIFFLM_CUDA
void cuda_ok(int err, const char* op) {
  TORCH_CHECK(err == 0, "difflm: CUDA kernel ", op, " failed: ", cudaGetErrorString((cudaError_t)err));
}
#define DIFFLM_STREAM(t)                          \
  const c10::cuda::CUDAGuard guard((t).device()); \
  void* stream = (void*)c10::cuda::getCurrentCUDAStream().stream()
#endif

// a shift (B,) fp32, one value per sequence of the scores, or none -> its data (null without one)
const float* shift_data(const std::optional<Tensor>& shift, const Tensor& scores) {
  if (!shift.has_value()) return nullptr;
  check_like(*shift, "shift", scores, {scores.size(0)}, at::kFloat, "(B,)");
  return shift->data_ptr<float>();
}

// checks shared by the forward and the backward; returns the dtype code
int check_score_entropy(const Tensor& log_score, const Tensor& xt, const Tensor& x0, const Tensor& sigma_bar,
                        int g) {
  const int dtype = check_scores(log_score, "log_score", g == difflm::ABSORB ? 2 : 1);
  const int64_t B = log_score.size(0), L = log_score.size(1), N = log_score.size(2);
  check_like(xt, "xt", log_score, {B, L}, at::kLong, "(B, L)");
  check_like(x0, "x0", log_score, {B, L}, at::kLong, "(B, L)");
  TORCH_CHECK(sigma_bar.device() == log_score.device(), "difflm: sigma_bar must be on ", log_score.device(),
              " like the scores, got ", sigma_bar.device());
  TORCH_CHECK(sigma_bar.dim() == 1 && sigma_bar.size(0) == B, "difflm: sigma_bar must have shape (B,) = (", B,
              "), got ", sigma_bar.sizes());
  TORCH_CHECK(sigma_bar.scalar_type() == at::kFloat || sigma_bar.scalar_type() == at::kDouble,
              "difflm: sigma_bar must be float32 or float64, got ", sigma_bar.scalar_type());
  const bool absorb = g == difflm::ABSORB;
  const auto r = ranges_of({absorb ? sigma_bar : sigma_bar.new_empty({0}), xt, x0});
  if (r[0]) {  // r = 1 / expm1(sigma_bar) is a rate only for 0 < sigma_bar < inf; a NaN fails both comparisons
    const auto [lo, hi] = *r[0];
    TORCH_CHECK(lo > 0 && hi < INFINITY, "difflm: sigma_bar must be positive and finite for the absorbing graph, got "
                "values in [", lo, ", ", hi, "]");
  }
  check_ids(r[1], "xt", N, "the states of log_score's last dimension");
  check_ids(r[2], "x0", absorb ? N - 1 : N,
            absorb ? "clean tokens: MASK = N - 1 is not one" : "the states of log_score's last dimension");
  return dtype;
}

// want_loss: the loss (B, L) fp32; want_grad: the gradient (B, L, N) scaled by grad_loss (by 1 when undefined)
std::tuple<Tensor, Tensor> score_entropy_impl(const Tensor& log_score, const Tensor& xt, const Tensor& x0,
                                              const Tensor& sigma_bar, c10::string_view graph,
                                              const std::optional<Tensor>& shift, const Tensor& grad_loss,
                                              bool want_loss, bool want_grad) {
  const int g = graph_id(graph);
  const int dtype = check_score_entropy(log_score, xt, x0, sigma_bar, g);
  const int64_t B = log_score.size(0), L = log_score.size(1), N = log_score.size(2);
  if (grad_loss.defined()) check_like(grad_loss, "grad_loss", log_score, {B, L}, at::kFloat, "(B, L)");
  const float* sh = shift_data(shift, log_score);
  const Tensor sb = sigma_bar.to(at::kDouble).contiguous();
  Tensor loss = want_loss ? at::empty({B, L}, log_score.options().dtype(at::kFloat)) : Tensor();
  Tensor grad = want_grad ? empty_grad_like(log_score) : Tensor();
  if (B * L == 0) return {loss, grad};
  float* lp = want_loss ? loss.data_ptr<float>() : nullptr;
  const float* gl = grad_loss.defined() ? grad_loss.data_ptr<float>() : nullptr;
  void* gp = want_grad ? grad.data_ptr() : nullptr;
  if (log_score.is_cpu()) {
    difflm::cpu_score_entropy(log_score.data_ptr(), dtype, xt.data_ptr<int64_t>(), x0.data_ptr<int64_t>(),
                              sb.data_ptr<double>(), sh, g, B, L, N, lp, gl, gp, at::get_num_threads());
  } else {
#ifdef DIFFLM_CUDA
    DIFFLM_STREAM(log_score);
    const Tensor consts = at::empty({B * (int64_t)sizeof(difflm::SEConsts)}, log_score.options().dtype(at::kByte));
    cuda_ok(difflm_launch_score_entropy(log_score.data_ptr(), dtype, xt.data_ptr<int64_t>(), x0.data_ptr<int64_t>(),
                                        sb.data_ptr<double>(), sh, g, B, L, N, lp, gl, gp, consts.data_ptr(), stream),
            "score_entropy");
#endif
  }
  return {loss, grad};
}

Tensor score_entropy(const Tensor& log_score, const Tensor& xt, const Tensor& x0, const Tensor& sigma_bar,
                     c10::string_view graph, const std::optional<Tensor>& shift) {
  return std::get<0>(score_entropy_impl(log_score, xt, x0, sigma_bar, graph, shift, Tensor(), true, false));
}

Tensor score_entropy_backward(const Tensor& grad_loss, const Tensor& log_score, const Tensor& xt, const Tensor& x0,
                              const Tensor& sigma_bar, c10::string_view graph, const std::optional<Tensor>& shift) {
  TORCH_CHECK(grad_loss.defined(), "difflm: grad_loss must be a (B, L) float32 tensor");
  return std::get<1>(score_entropy_impl(log_score, xt, x0, sigma_bar, graph, shift, grad_loss, false, true));
}

std::tuple<Tensor, Tensor> score_entropy_with_grad(const Tensor& log_score, const Tensor& xt, const Tensor& x0,
                                                   const Tensor& sigma_bar, c10::string_view graph,
                                                   const std::optional<Tensor>& shift) {
  return score_entropy_impl(log_score, xt, x0, sigma_bar, graph, shift, Tensor(), true, true);
}

// shared checks of the sampling steps; returns the dtype code
int check_step(const Tensor& scores, const char* sname, const Tensor& xt, const Tensor& t, const char* tname,
               const Tensor& u, int64_t min_n) {
  const int dtype = check_scores(scores, sname, min_n);
  const int64_t B = scores.size(0), L = scores.size(1), N = scores.size(2);
  check_like(xt, "xt", scores, {B, L}, at::kLong, "(B, L)");
  check_like(t, tname, scores, {B}, at::kDouble, "(B,)");
  check_like(u, "u", scores, {B, L, 2}, at::kDouble, "(B, L, 2)");
  const auto r = ranges_of({xt, t, u});
  check_ids(r[0], "xt", N, "the states of the scores' last dimension");
  if (r[1]) {  // a rate or a probability: a NaN fails both comparisons
    const auto [lo, hi] = *r[1];
    TORCH_CHECK(lo >= 0 && hi < INFINITY, "difflm: ", tname, " must be finite and >= 0, got values in [", lo, ", ",
                hi, "]");
  }
  if (r[2]) {
    const auto [lo, hi] = *r[2];
    TORCH_CHECK(lo >= 0 && hi < 1, "difflm: u must lie in [0, 1) (uniforms), got values in [", lo, ", ", hi, "]");
  }
  return dtype;
}

Tensor sedd_step(const Tensor& log_score, const Tensor& xt, const Tensor& t, const char* tname, const Tensor& u,
                 c10::string_view graph, int step, bool final_step, const std::optional<Tensor>& shift) {
  const int g = graph_id(graph);
  const int dtype = check_step(log_score, "log_score", xt, t, tname, u, g == difflm::ABSORB ? 2 : 1);
  const int64_t B = log_score.size(0), L = log_score.size(1), N = log_score.size(2);
  const float* sh = shift_data(shift, log_score);
  Tensor out = at::empty({B, L}, xt.options());
  if (B * L == 0) return out;
  if (log_score.is_cpu()) {
    difflm::cpu_sedd_step(log_score.data_ptr(), dtype, xt.data_ptr<int64_t>(), t.data_ptr<double>(), sh,
                          u.data_ptr<double>(), step, g, final_step, B, L, N, out.data_ptr<int64_t>(),
                          at::get_num_threads());
  } else {
#ifdef DIFFLM_CUDA
    DIFFLM_STREAM(log_score);
    const Tensor consts = at::empty({B * (int64_t)sizeof(difflm::StepConsts)}, log_score.options().dtype(at::kByte));
    cuda_ok(difflm_launch_sedd_step(log_score.data_ptr(), dtype, xt.data_ptr<int64_t>(), t.data_ptr<double>(), sh,
                                    u.data_ptr<double>(), step, g, final_step ? 1 : 0, B, L, N,
                                    out.data_ptr<int64_t>(), consts.data_ptr(), stream),
            "sedd_step");
#endif
  }
  return out;
}

Tensor sedd_euler_step(const Tensor& log_score, const Tensor& xt, const Tensor& rate_dt, const Tensor& u,
                       c10::string_view graph, const std::optional<Tensor>& shift) {
  return sedd_step(log_score, xt, rate_dt, "rate_dt", u, graph, difflm::EULER, false, shift);
}

Tensor sedd_tweedie_step(const Tensor& log_score, const Tensor& xt, const Tensor& dsigma, const Tensor& u,
                         c10::string_view graph, bool final_step, const std::optional<Tensor>& shift) {
  return sedd_step(log_score, xt, dsigma, "dsigma", u, graph, difflm::TWEEDIE, final_step, shift);
}

Tensor mdlm_ancestral_step(const Tensor& logits, const Tensor& xt, const Tensor& p_unmask, const Tensor& u,
                           int64_t mask_id) {
  const int dtype = check_step(logits, "logits", xt, p_unmask, "p_unmask", u, 1);
  const int64_t B = logits.size(0), L = logits.size(1), N = logits.size(2);
  TORCH_CHECK(mask_id >= 0 && mask_id < N, "difflm: mask_id must lie in [0, ", N - 1, "] (a column of logits), got ",
              mask_id);
  Tensor out = at::empty({B, L}, xt.options());
  if (B * L == 0) return out;
  if (logits.is_cpu()) {
    difflm::cpu_mdlm_step(logits.data_ptr(), dtype, xt.data_ptr<int64_t>(), p_unmask.data_ptr<double>(),
                          u.data_ptr<double>(), mask_id, B, L, N, out.data_ptr<int64_t>(), at::get_num_threads());
  } else {
#ifdef DIFFLM_CUDA
    DIFFLM_STREAM(logits);
    cuda_ok(difflm_launch_mdlm_step(logits.data_ptr(), dtype, xt.data_ptr<int64_t>(), p_unmask.data_ptr<double>(),
                                    u.data_ptr<double>(), mask_id, B, L, N, out.data_ptr<int64_t>(), stream),
            "mdlm_ancestral_step");
#endif
  }
  return out;
}

// ---- nearest_embedding(x (N, d), E (V, d), metric) -> (N,) int64: Diffusion-LM's clamp (cos | l2)

int check_nearest(const Tensor& x, const Tensor& E, c10::string_view metric) {
  TORCH_CHECK(metric == "cos" || metric == "l2", "difflm: metric must be 'cos' or 'l2', got '", std::string(metric),
              "'");
  TORCH_CHECK(x.dim() == 2, "difflm: x must have shape (N, d), got ", x.dim(), " dimensions ", x.sizes());
  TORCH_CHECK(E.dim() == 2, "difflm: E must have shape (V, d), got ", E.dim(), " dimensions ", E.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat, "difflm: x must be float32, got ", x.scalar_type());
  TORCH_CHECK(E.scalar_type() == at::kFloat, "difflm: E must be float32, got ", E.scalar_type());
  TORCH_CHECK(x.is_contiguous(), "difflm: x must be contiguous (call .contiguous() first)");
  TORCH_CHECK(E.is_contiguous(), "difflm: E must be contiguous (call .contiguous() first)");
  TORCH_CHECK(E.device() == x.device(), "difflm: E must be on ", x.device(), " like x, got ", E.device());
  TORCH_CHECK(x.device().is_cpu() || x.device().is_cuda(), "difflm: x must be on cpu or cuda, got ", x.device());
#ifndef DIFFLM_CUDA
  TORCH_CHECK(x.device().is_cpu(), "difflm: x is on ", x.device(),
              " but the kernels were built without CUDA; use the PyTorch path (DIFFLM_KERNELS=0)");
#endif
  const int64_t d = x.size(1), V = E.size(0);
  if (!(at::isfinite(x).all() & at::isfinite(E).all()).item<bool>()) {  // one sync for both on a GPU
    TORCH_CHECK(at::isfinite(x).all().item<bool>(), "difflm: x must be finite (it holds a NaN or an infinity)");
    TORCH_CHECK(false, "difflm: E must be finite (it holds a NaN or an infinity)");
  }
  TORCH_CHECK(E.size(1) == d, "difflm: E must have d = ", d, " columns like x, got shape ", E.sizes());
  TORCH_CHECK(V >= 1, "difflm: E must have at least one row (V >= 1)");
  TORCH_CHECK(d >= 1, "difflm: x and E need at least one dimension (d >= 1)");
  TORCH_CHECK(V < (int64_t(1) << 31) - 16, "difflm: E has ", V, " rows; at most 2^31 - 17 are supported");
  return metric == "cos" ? difflm::NEAREST_COS : difflm::NEAREST_L2;
}

// The fp32 search: one pass over the table per block of queries, no N x V scores; the normalised table
// and its bias are tensors (counted by torch's memory profiler), O(V d)
Tensor nearest_exact(const Tensor& x, const Tensor& E, int m) {
  const int64_t N = x.size(0), d = x.size(1), V = E.size(0);
  Tensor out = at::empty({N}, x.options().dtype(at::kLong));
  if (N == 0) return out;
  const int64_t P = (V + 15) / 16;
  if (x.is_cpu()) {
    Tensor packed = at::empty({P, d, 16}, x.options()), bias = at::empty({P * 16}, x.options());
    difflm::cpu_nearest_pack(E.data_ptr<float>(), V, d, m, packed.data_ptr<float>(), bias.data_ptr<float>());
    difflm::cpu_nearest_embedding(x.data_ptr<float>(), N, d, packed.data_ptr<float>(), bias.data_ptr<float>(), V,
                                  out.data_ptr<int64_t>(), at::get_num_threads());
  } else {
#ifdef DIFFLM_CUDA
    DIFFLM_STREAM(x);
    Tensor table = at::empty({V, d}, x.options()), bias = at::empty({V}, x.options());
    cuda_ok(difflm_launch_nearest_embedding(x.data_ptr<float>(), N, d, E.data_ptr<float>(), V, m,
                                            table.data_ptr<float>(), bias.data_ptr<float>(), out.data_ptr<int64_t>(),
                                            stream),
            "nearest_embedding");
#endif
  }
  return out;
}

// The screened search, a GPU's path for large tables (also on the CPU, where the tests check it): tensor
// cores score every pair from bf16 operands (bf16 out), then one kernel per chunk of queries (kernels.h)
// lets fp32 decide among the few rows that can win. A screen score plus c_v (L2's bias, added in fp32)
// is within e_v = 2^-5 |x_q| |t_v| of the fp32 score x_q . t_v + c_v (t: the normalised table): rounding
// both operands to bf16 moves a product by at most 2^-7 + 2^-16 of itself, which Cauchy-Schwarz sums to
// 2^-7 |x| |t_v|; the bf16 result adds 2^-8 of |x| |t_v| (partial sums add in fp32: difflm_ops.py turns
// torch's bf16 reduced-precision reduction off for the call); the fp32 sums (d + 8) 2^-23; adding c_v
// rounds within 2^-24 |c_v| (kernels.h). So the best row v*, with s_v* >= s_v for all v, has an upper
// bound at least every row's lower bound, and is kept. Queries go in chunks of at most chunk_entries
// screen scores.
Tensor nearest_screened_impl(const Tensor& x, const Tensor& E, int m, int64_t chunk_entries) {
  const int64_t N = x.size(0), d = x.size(1), V = E.size(0);
  const bool l2 = m == difflm::NEAREST_L2;
  const Tensor sq = E.to(at::kDouble).pow(2).sum(1), norm = sq.sqrt();  // (V,) as the fp32 kernels make them
  const Tensor table = l2 ? E : (E.to(at::kDouble) / norm.clamp_min(1e-12).unsqueeze(1)).to(at::kFloat);
  const int64_t K = (d + 7) / 8 * 8;  // a multiple of 8: whole tensor-core rows
  const Tensor table16 = at::constant_pad_nd(table, {0, K - d}).to(at::kBFloat16);  // (V, K)
  // the CPU has no bf16 GEMM: the same products (exact in fp32) and fp32 sums, from fp32 copies
  const Tensor table16_as_f32 = x.is_cuda() ? Tensor() : table16.to(at::kFloat);
  const Tensor ct = l2 ? at::stack({(sq * -0.5).to(at::kFloat), norm.to(at::kFloat)}, 1) : Tensor();  // (V, 2)
  // h (N,) = 2^-5 |x_q|; cosine counts every |t_v| as the largest, kept on the device (no synchronisation)
  const Tensor h = l2 ? x.norm(2, {1}) / 32 : x.norm(2, {1}) / 32 * table.norm(2, {1}).max();
  const difflm::NearestTable tab{table.data_ptr<float>(), l2 ? ct.data_ptr<float>() : nullptr, V, d};
  Tensor out = at::empty({N}, x.options().dtype(at::kLong));
  const int64_t n = std::max<int64_t>(1, chunk_entries / V);
  for (int64_t q0 = 0; q0 < N; q0 += n) {
    const int64_t nq = std::min(n, N - q0);
    const Tensor xq = x.narrow(0, q0, nq), hq = h.narrow(0, q0, nq);
    const Tensor x16 = at::constant_pad_nd(xq, {0, K - d}).to(at::kBFloat16);  // (nq, K)
    Tensor ids = out.narrow(0, q0, nq);
    if (x.is_cpu()) {
      const Tensor screen = at::mm(x16.to(at::kFloat), table16_as_f32.t()).to(at::kBFloat16);  // (nq, V)
      difflm::cpu_nearest_select((const uint16_t*)screen.data_ptr(), nq, xq.data_ptr<float>(), hq.data_ptr<float>(),
                                 tab, ids.data_ptr<int64_t>(), at::get_num_threads());
    } else {
#ifdef DIFFLM_CUDA
      DIFFLM_STREAM(x);
      const Tensor screen = at::mm(x16, table16.t());  // (nq, V) bf16
      cuda_ok(difflm_launch_nearest_select((const uint16_t*)screen.data_ptr(), nq, xq.data_ptr<float>(),
                                           hq.data_ptr<float>(), tab, ids.data_ptr<int64_t>(), stream),
              "nearest_embedding_screened");
#endif
    }
  }
  // crowded queries (id -1): the fp32 search, all chunks' at once (one synchronisation, one launch)
  const Tensor rows = (out < 0).nonzero().squeeze(1);
  if (rows.numel() > 0) out.index_copy_(0, rows, nearest_exact(x.index_select(0, rows), E, m));
  return out;
}

// On a GPU, tables of at least 4096 rows and 32 dimensions take the screen, where a bf16 GEMM and two
// reads of its scores should cost less than the fp32 kernel's FMAs; d stays within the bound's
// assumption, (d + 8) 2^-23 << 2^-7.
Tensor nearest_embedding(const Tensor& x, const Tensor& E, c10::string_view metric) {
  const int m = check_nearest(x, E, metric);
  const int64_t d = x.size(1), V = E.size(0);
  const bool screen = x.is_cuda() && V >= 4096 && d >= 32 && d <= 1024;
  return screen ? nearest_screened_impl(x, E, m, int64_t(1) << 27) : nearest_exact(x, E, m);
}

Tensor nearest_embedding_screened(const Tensor& x, const Tensor& E, c10::string_view metric, int64_t chunk_entries) {
  const int m = check_nearest(x, E, metric);
  TORCH_CHECK(x.size(1) <= 1024, "difflm: the screened search takes d <= 1024, got ", x.size(1));
  TORCH_CHECK(chunk_entries >= 1, "difflm: chunk_entries must be >= 1, got ", chunk_entries);
  return nearest_screened_impl(x, E, m, chunk_entries);
}

// ---- rotary(qkv (B, L, 3, H, D), cos (L, 1, 1, D), sin (L, 1, 1, D), transpose) -> (B, L, 3, H, D), qkv's dtype
Tensor rotary(const Tensor& qkv, const Tensor& cos, const Tensor& sin, bool transpose) {
  TORCH_CHECK(qkv.dim() == 5 && qkv.size(2) == 3, "difflm: qkv must have shape (B, L, 3, H, D), got ", qkv.sizes());
  TORCH_CHECK(qkv.scalar_type() == at::kFloat || qkv.scalar_type() == at::kBFloat16,
              "difflm: qkv must be float32 or bfloat16, got ", qkv.scalar_type());
  TORCH_CHECK(qkv.stride(4) == 1, "difflm: qkv must be contiguous in its last dimension (call .contiguous() first)");
  TORCH_CHECK(qkv.device().is_cpu() || qkv.device().is_cuda(), "difflm: qkv must be on cpu or cuda, got ",
              qkv.device());
#ifndef DIFFLM_CUDA
  TORCH_CHECK(qkv.device().is_cpu(), "difflm: qkv is on ", qkv.device(),
              " but the kernels were built without CUDA; use the PyTorch path (DIFFLM_KERNELS=0)");
#endif
  const int64_t B = qkv.size(0), L = qkv.size(1), H = qkv.size(3), D = qkv.size(4);
  TORCH_CHECK(D % 2 == 0, "difflm: qkv's last dimension (the head size) must be even, got ", D);
  check_like(cos, "cos", qkv, {L, 1, 1, D}, at::kFloat, "(L, 1, 1, D)", "qkv");
  check_like(sin, "sin", qkv, {L, 1, 1, D}, at::kFloat, "(L, 1, 1, D)", "qkv");
  Tensor out = at::empty({B, L, 3, H, D}, qkv.options());
  if (out.numel() == 0) return out;
  const int dtype = qkv.scalar_type() == at::kBFloat16 ? difflm::BF16 : difflm::F32;
  const difflm::Strides4 xs{qkv.stride(0), qkv.stride(1), qkv.stride(2), qkv.stride(3)};
  if (qkv.is_cpu()) {
    difflm::cpu_rotary(qkv.data_ptr(), dtype, xs, cos.data_ptr<float>(), sin.data_ptr<float>(), transpose, B, L, H, D,
                       out.data_ptr(), at::get_num_threads());
  } else {
#ifdef DIFFLM_CUDA
    DIFFLM_STREAM(qkv);
    cuda_ok(difflm_launch_rotary(qkv.data_ptr(), dtype, xs, cos.data_ptr<float>(), sin.data_ptr<float>(), transpose, B,
                                 L, H, D, out.data_ptr(), stream),
            "rotary");
#endif
  }
  return out;
}

bool cuda_built() {
#ifdef DIFFLM_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(difflm, m) {
  m.def("score_entropy(Tensor log_score, Tensor xt, Tensor x0, Tensor sigma_bar, str graph, Tensor? shift=None) "
        "-> Tensor");
  m.def("score_entropy_backward(Tensor grad_loss, Tensor log_score, Tensor xt, Tensor x0, Tensor sigma_bar, "
        "str graph, Tensor? shift=None) -> Tensor");
  m.def("score_entropy_with_grad(Tensor log_score, Tensor xt, Tensor x0, Tensor sigma_bar, str graph, "
        "Tensor? shift=None) -> (Tensor, Tensor)");
  m.def("sedd_euler_step(Tensor log_score, Tensor xt, Tensor rate_dt, Tensor u, str graph, Tensor? shift=None) "
        "-> Tensor");
  m.def("sedd_tweedie_step(Tensor log_score, Tensor xt, Tensor dsigma, Tensor u, str graph, bool final=False, "
        "Tensor? shift=None) -> Tensor");
  m.def("mdlm_ancestral_step(Tensor logits, Tensor xt, Tensor p_unmask, Tensor u, int mask_id) -> Tensor");
  m.def("nearest_embedding(Tensor x, Tensor E, str metric) -> Tensor");
  m.def("nearest_embedding_screened(Tensor x, Tensor E, str metric, int chunk_entries=134217728) -> Tensor");
  m.def("rotary(Tensor qkv, Tensor cos, Tensor sin, bool transpose=False) -> Tensor");
  m.def("cuda_built() -> bool", &cuda_built);
}

TORCH_LIBRARY_IMPL(difflm, CPU, m) {
  m.impl("score_entropy", &score_entropy);
  m.impl("score_entropy_backward", &score_entropy_backward);
  m.impl("score_entropy_with_grad", &score_entropy_with_grad);
  m.impl("sedd_euler_step", &sedd_euler_step);
  m.impl("sedd_tweedie_step", &sedd_tweedie_step);
  m.impl("mdlm_ancestral_step", &mdlm_ancestral_step);
  m.impl("nearest_embedding", &nearest_embedding);
  m.impl("nearest_embedding_screened", &nearest_embedding_screened);
  m.impl("rotary", &rotary);
}

#ifdef DIFFLM_CUDA
TORCH_LIBRARY_IMPL(difflm, CUDA, m) {
  m.impl("score_entropy", &score_entropy);
  m.impl("score_entropy_backward", &score_entropy_backward);
  m.impl("sedd_euler_step", &sedd_euler_step);
  m.impl("sedd_tweedie_step", &sedd_tweedie_step);
  m.impl("mdlm_ancestral_step", &mdlm_ancestral_step);
  m.impl("nearest_embedding", &nearest_embedding);
  m.impl("nearest_embedding_screened", &nearest_embedding_screened);
  m.impl("rotary", &rotary);
}
#endif

#ifdef DIFFLM_PYMODULE
// `DIFFLM_BUILD_EXT=1 pip install -e .` builds this file into an importable module; importing it
// runs the registrations above, which is all kernels.load needs (the ops live in torch.ops).
#include <Python.h>
PyMODINIT_FUNC PyInit_difflm_kernels(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "difflm_kernels", "difflm's fused ops (torch.ops.difflm)", -1,
                            nullptr};
  return PyModule_Create(&def);
}
#endif
