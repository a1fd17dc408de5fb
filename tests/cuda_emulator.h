// A CPU stand-in for the CUDA built-ins that csrc/cuda_kernels.cu uses, so tests/test_cuda_emulated.py can
// run the kernels' own source on a machine without a GPU. Every CUDA thread of a block is a std::thread;
// __syncthreads is a barrier of the block, after which its warps run in turn (below); a warp's shuffles
// and votes exchange values through memory between two barriers of the warp; __shared__ variables are
// statics, which the threads of a block share.
// uint4 and float2 keep CUDA's alignment, so the sanitizer the test builds with reports a vector access
// that would fault on a GPU.
// Blocks run one after another. This checks the kernels' logic (indexing, barriers, reductions, the
// fp32 and fp64 arithmetic), not the hardware: the hardware exp (__expf) is expf here, and nothing is
// learnt about speed.
#pragma once
#include <barrier>
#include <condition_variable>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__
#define __shared__ static
#define __launch_bounds__(n)
#define __expf emulated_expf

typedef void* cudaStream_t;
inline int cudaGetLastError() { return 0; }

struct Dim { unsigned x; };
inline thread_local Dim threadIdx;
inline Dim blockIdx, blockDim, gridDim;

struct alignas(16) uint4 { uint32_t x, y, z, w; };
inline uint4 make_uint4(uint32_t x, uint32_t y, uint32_t z, uint32_t w) { return {x, y, z, w}; }
struct alignas(8) float2 { float x, y; };
inline float2 make_float2(float x, float y) { return {x, y}; }

inline float __uint_as_float(uint32_t b) { float f; memcpy(&f, &b, 4); return f; }
inline uint32_t __float_as_uint(float f) { uint32_t b; memcpy(&b, &f, 4); return b; }
inline float emulated_expf(float v) { return expf(v); }
inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }  // volatile: never fused
inline float __fadd_rn(float a, float b) { volatile float r = a + b; return r; }
inline int __ffs(unsigned x) { return __builtin_ffs((int)x); }
inline int __clz(unsigned x) { return x ? __builtin_clz(x) : 32; }
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }

inline std::barrier<>* block_barrier;
inline std::vector<std::barrier<>*> warp_barriers;
inline uint64_t warp_slots[64][32];  // one 8-byte slot per lane of each warp

// After each __syncthreads the warps of a block run in turn, the highest first: a warp starts its part of
// the new phase once every higher warp has ended it (reached the next __syncthreads, or returned). A warp
// that runs ahead into the next phase, as one on a GPU may, so overwrites shared memory that a lower warp
// has still to read when a barrier is missing, every time rather than by the luck of the threads' timing.
struct BlockOrder {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<std::vector<int>> ended;  // [phase][warp]: the warp's threads that reached the phase's end
  std::vector<int> exited;              // [warp]: its threads that returned
};
inline BlockOrder* block_order;
inline thread_local size_t block_phase;

inline void order_end(std::vector<int>& count, int w) {  // under the lock; wakes the waiters when warp w is done
  if (++count[w] == 32) block_order->cv.notify_all();
}

inline void __syncthreads() {
  BlockOrder& o = *block_order;
  const int w = threadIdx.x / 32, nw = (int)o.exited.size();
  {
    std::lock_guard<std::mutex> g(o.mu);
    if (o.ended.size() <= block_phase) o.ended.resize(block_phase + 1, std::vector<int>(nw));
    order_end(o.ended[block_phase], w);
  }
  block_barrier->arrive_and_wait();
  const size_t ph = ++block_phase;
  std::unique_lock<std::mutex> l(o.mu);
  o.cv.wait(l, [&] {
    for (int v = w + 1; v < nw; ++v)
      if (o.exited[v] + (o.ended.size() > ph ? o.ended[ph][v] : 0) < 32) return false;
    return true;
  });
}
inline void __syncwarp(unsigned = 0xffffffffu) { warp_barriers[threadIdx.x / 32]->arrive_and_wait(); }

// every lane of the warp publishes v, then reads lane src's
template <class T>
T warp_exchange(T v, int src) {
  const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
  uint64_t bits = 0;
  memcpy(&bits, &v, sizeof(T));
  warp_slots[w][lane] = bits;
  warp_barriers[w]->arrive_and_wait();
  T r;
  bits = warp_slots[w][src];
  memcpy(&r, &bits, sizeof(T));
  warp_barriers[w]->arrive_and_wait();  // nobody overwrites a slot before every lane has read
  return r;
}
template <class T> T __shfl_xor_sync(unsigned, T v, int o) { return warp_exchange(v, (threadIdx.x % 32) ^ o); }
template <class T> T __shfl_sync(unsigned, T v, int src) { return warp_exchange(v, src); }
template <class T> T __shfl_up_sync(unsigned, T v, int o) {
  const int lane = threadIdx.x % 32;
  return warp_exchange(v, lane >= o ? lane - o : lane);
}
inline unsigned __ballot_sync(unsigned, int pred) {
  const int w = threadIdx.x / 32;
  warp_slots[w][threadIdx.x % 32] = pred != 0;
  warp_barriers[w]->arrive_and_wait();
  unsigned m = 0;
  for (int lane = 0; lane < 32; ++lane) m |= (unsigned)warp_slots[w][lane] << lane;
  warp_barriers[w]->arrive_and_wait();
  return m;
}

// kernel<<<grid, block, 0, stream>>>(args) is rewritten by the test into emulated_launch(grid, block, [&] {
// kernel(args); }): the block's threads run together, the blocks in turn
inline void emulated_launch(unsigned grid, unsigned block, const std::function<void()>& kernel) {
  blockDim.x = block;
  gridDim.x = grid;
  for (unsigned b = 0; b < grid; ++b) {
    blockIdx.x = b;
    std::barrier<> whole(block);
    block_barrier = &whole;
    BlockOrder order;
    order.exited.assign(block / 32, 0);
    block_order = &order;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    warp_barriers.clear();
    for (unsigned w = 0; w < block / 32; ++w) {
      warps.push_back(std::make_unique<std::barrier<>>(32));
      warp_barriers.push_back(warps.back().get());
    }
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < block; ++t)
      threads.emplace_back([&kernel, &order, t] {
        threadIdx.x = t;
        block_phase = 0;
        kernel();
        std::lock_guard<std::mutex> g(order.mu);
        order_end(order.exited, t / 32);
      });
    for (auto& t : threads) t.join();
  }
}
