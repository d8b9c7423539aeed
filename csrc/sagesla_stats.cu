// SageSLA's key-side statistics for sm_90 (the pre-pass of csrc/sagesla_attn.cu): the K mean (the
// smoothing vector), V's per-channel absmax / 448 (the FP8 scale) and, for the linear branch, Σφ(K) and
// ((φ(K)ᵀV)·Wᵀ)ᵀ in fp16 over its absmax, the layout the attention epilogue stages. φ = softmax over the head dim.
//
// Grid (chunks, B·H), 256 threads. A CTA streams its chunk's 64-token tiles of K and V through a cp.async ring
// (rows padded to 272 bytes: eight consecutive rows start in distinct bank groups, so ldmatrix is conflict-free),
// turns each K tile into φ(K) in place (a warp per token: max and sum by shuffles) and accumulates φ(K)ᵀV with
// mma.sync m16n8k16 (bf16 in, fp32 out); ldmatrix.trans takes both operands from the natural [token, channel]
// tiles. The Triton version of this pass spent its time in layout shuffles through shared memory at one CTA per
// SM (255 registers). Partials go to a workspace. Two more launches reduce them, each in a fixed order, so the
// result is deterministic:
//  - vector_sums_kernel (a CTA per (b, h)): the K mean, V's scale and Σφ(K), which the pooling pass needs next;
//  - kv_reduce_kernel (a CTA per group of chunks and (b, h)), on a second stream that only the attention kernel
//    waits for: each CTA sums its group's φ(K)ᵀV partials; the last to finish (an atomic ticket) sums the group
//    sums, folds proj_l's W in fp32 and normalizes. As the statistics kernel's tail this serial work cost 46 µs at
//    Wan 1.3B (90 with one CTA summing all ~22 partials of a head); beside the pooling pass it runs in 34 µs (H200)
//    while the call's path loses it (docs/notes/attention.md, session 8).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "hopper.cuh"

namespace {

using hopper::smem_addr;

constexpr int kHeadDim = 128;
constexpr int kTile = 64;  // tokens per ring stage
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kStages = 3;
constexpr int kRowBytes = kHeadDim * 2 + 16;
constexpr int kTileBytes = kTile * kRowBytes;
constexpr int kStageBytes = 2 * kTileBytes;  // K then V
constexpr int kSmemBytes = kStages * kStageBytes;
constexpr int kFoldStride = kHeadDim + 4;  // floats per row of the staged Wᵀ in the fold
constexpr int kHalfStride = kHeadDim / 2 + 4;  // floats per row of the staged half of φ(K)ᵀV in the fold
// a partial: φ(K)ᵀV transposed ([d_v][d_k]), then Σk, max|v|, Σφ(K)
constexpr int kPartFloats = kHeadDim * kHeadDim + 3 * kHeadDim;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kFp8Max = 448.0f;
static_assert(kHeadDim * kHeadDim / 8 == 8 * kThreads, "the fold gives each thread 8 float4 of a half of φ(K)ᵀV");
static_assert(kHeadDim * (kFoldStride + kHalfStride) * 4 <= kSmemBytes, "the fold stages Wᵀ and a half of φ(K)ᵀV");

struct Params {
  const __nv_bfloat16* k;
  const __nv_bfloat16* v;
  long long k_sb, k_sl, k_sh, v_sb, v_sl, v_sh;  // strides in elements (batch, token, head)
  int seq, heads, tiles_per_chunk, chunks, group_size, groups;
  float* partials;     // [B·H, chunks + groups, kPartFloats]: the chunks' partials, then the groups' sums
  unsigned* tickets;   // [B·H]: groups summed, zero before kv_reduce_kernel
  const float* proj_weight;  // W [D_out, D_in] fp32 (kLinear)
  float* k_mean;             // [B·H, D]
  float* v_scale;            // [B·H, D]
  float* kz;                 // [B·H, D] (kLinear)
  __half* kv_proj_t;         // [B·H, D_out, D_in] (kLinear)
  float* kv_proj_scale;      // [B·H] (kLinear)
};

// 16 bytes global → shared; `valid` false zero-fills (the ragged last tile).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row)));
}

__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

template <typename Op>
__device__ __forceinline__ float warp_all_reduce(float x, Op op) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x = op(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

__device__ __forceinline__ void unpack4(uint2 raw, float (&x)[4]) {
  const float2 lo = __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&raw.x));
  const float2 hi = __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&raw.y));
  x[0] = lo.x, x[1] = lo.y, x[2] = hi.x, x[3] = hi.y;
}

// Tile `tile` (64 tokens) of K and V of (b, h) into one ring stage, 16 bytes per copy, 4 + 4 per thread.
__device__ __forceinline__ void load_tile(const Params& p, uint8_t* stage, int b, int h, int tile, int tid) {
#pragma unroll
  for (int j = 0; j < kTile * kHeadDim / 8 / kThreads; ++j) {
    const int piece = tid + j * kThreads;
    const int row = piece / (kHeadDim / 8), col = piece % (kHeadDim / 8);
    const int token = tile * kTile + row;
    const bool valid = token < p.seq;
    const long long t = valid ? token : 0;
    cp_async_16(stage + row * kRowBytes + col * 16, p.k + b * p.k_sb + t * p.k_sl + h * p.k_sh + col * 8, valid);
    cp_async_16(stage + kTileBytes + row * kRowBytes + col * 16, p.v + b * p.v_sb + t * p.v_sl + h * p.v_sh + col * 8,
                valid);
  }
}

// Sum `count` consecutive partials at src into dst (max for max|v|): 8 float4 per thread over two partials per
// step, 16 loads in flight per thread. kv_reduce_kernel reads only the φ(K)ᵀV part of the result; the three
// vectors ride along (0.6 % of the bytes) as they did when this sum ended the statistics kernel.
__device__ void sum_partials(const float* src, int count, float* dst, int tid) {
  constexpr int kFloat4s = kPartFloats / 4, kPerThread = 8;
  constexpr int kMaxFirst = (kHeadDim * kHeadDim + kHeadDim) / 4, kMaxEnd = kMaxFirst + kHeadDim / 4;
  const float4* in = reinterpret_cast<const float4*>(src);
  const float4 zero = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  for (int e0 = tid; e0 < kFloat4s; e0 += kPerThread * kThreads) {
    float4 acc[kPerThread];
#pragma unroll
    for (int u = 0; u < kPerThread; ++u) acc[u] = zero;
    for (int c = 0; c < count; c += 2) {
      const bool pair = c + 1 < count;
      float4 x[kPerThread], y[kPerThread];
#pragma unroll
      for (int u = 0; u < kPerThread; ++u) {
        const int e = e0 + u * kThreads;
        x[u] = e < kFloat4s ? __ldcg(in + static_cast<long long>(c) * kFloat4s + e) : zero;
        y[u] = e < kFloat4s && pair ? __ldcg(in + static_cast<long long>(c + 1) * kFloat4s + e) : zero;
      }
#pragma unroll
      for (int u = 0; u < kPerThread; ++u) {
        const int e = e0 + u * kThreads;
        if (e >= kMaxFirst && e < kMaxEnd) {  // |v| ≥ 0, so the zero of a missing partner is neutral
          acc[u] = make_float4(fmaxf(acc[u].x, fmaxf(x[u].x, y[u].x)), fmaxf(acc[u].y, fmaxf(x[u].y, y[u].y)),
                               fmaxf(acc[u].z, fmaxf(x[u].z, y[u].z)), fmaxf(acc[u].w, fmaxf(x[u].w, y[u].w)));
        } else {
          acc[u] = make_float4(acc[u].x + (x[u].x + y[u].x), acc[u].y + (x[u].y + y[u].y),
                               acc[u].z + (x[u].z + y[u].z), acc[u].w + (x[u].w + y[u].w));
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kPerThread; ++u) {
      const int e = e0 + u * kThreads;
      if (e < kFloat4s) __stcg(reinterpret_cast<float4*>(dst) + e, acc[u]);
    }
  }
}

// The last CTA of a (b, h) in kv_reduce_kernel: sum the `count` group sums at parts in order, fold W, normalize.
__device__ void fold(const Params& p, uint8_t* smem, int bh, int tid, const float* parts, int count) {
  // ((φ(K)ᵀV)·Wᵀ)ᵀ[o][i] = Σ_j W[o][j] (φ(K)ᵀV)[i][j] in plain fp32 FMAs from shared memory, one half of the
  // columns i per pass: Wᵀ (staged once) and that half of φ(K)ᵀV fit the ring's shared memory together. Loading W
  // from global memory inside the loop put an L2 round trip on every step (the fold was most of the kernel's tail).
  float* w_t = reinterpret_cast<float*>(smem);   // [j][o], row stride kFoldStride
  float* kv_half = w_t + kHeadDim * kFoldStride;  // [j][i - 64·pass], row stride kHalfStride
  for (int f = tid; f < kHeadDim * kHeadDim / 4; f += kThreads) {
    // lanes take consecutive rows o of one 4-column slice of W: the transposed stores hit distinct banks
    const int o = f % kHeadDim, j4 = f / kHeadDim;
    const float4 w4 = __ldg(reinterpret_cast<const float4*>(p.proj_weight + o * kHeadDim) + j4);
    w_t[(4 * j4) * kFoldStride + o] = w4.x;
    w_t[(4 * j4 + 1) * kFoldStride + o] = w4.y;
    w_t[(4 * j4 + 2) * kFoldStride + o] = w4.z;
    w_t[(4 * j4 + 3) * kFoldStride + o] = w4.w;
  }
  // the thread owns rows o0 … o0 + 3 and, per pass, columns 4·g … +4 and 32 + 4·g … +4 of the half (g = tid % 8):
  // a warp's loads of a row are 8 distinct contiguous float4 (one wavefront) and 4 broadcast float4 of Wᵀ
  const int o0 = (tid >> 3) * 4, g = tid & 7;
  float acc[2][4][8];  // [pass][row][column]; both passes stay until the absmax of the whole product is known
  float amax = 0.0f;
#pragma unroll
  for (int pass = 0; pass < 2; ++pass) {
    // this half of φ(K)ᵀV = Σ of the group sums (stored transposed: [j][i]); 8 float4 per thread, two sums per
    // step, 16 loads in flight per thread
    float4 sum[8];
#pragma unroll
    for (int q = 0; q < 8; ++q) sum[q] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    for (int c = 0; c < count; c += 2) {
      const bool pair = c + 1 < count;
      float4 x[8], y[8];
#pragma unroll
      for (int q = 0; q < 8; ++q) {
        const int f = q * kThreads + tid, j = f / 16, i4 = f % 16;
        const float4* src = reinterpret_cast<const float4*>(parts) + j * (kHeadDim / 4) + pass * 16 + i4;
        x[q] = __ldcg(src + static_cast<long long>(c) * (kPartFloats / 4));
        y[q] = pair ? __ldcg(src + static_cast<long long>(c + 1) * (kPartFloats / 4))
                    : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      }
#pragma unroll
      for (int q = 0; q < 8; ++q) {
        sum[q].x += x[q].x + y[q].x, sum[q].y += x[q].y + y[q].y;
        sum[q].z += x[q].z + y[q].z, sum[q].w += x[q].w + y[q].w;
      }
    }
    __syncthreads();  // the previous pass is done reading kv_half (and, on the first, w_t is complete)
#pragma unroll
    for (int q = 0; q < 8; ++q) {
      const int f = q * kThreads + tid, j = f / 16, i4 = f % 16;
      *reinterpret_cast<float4*>(kv_half + j * kHalfStride + 4 * i4) = sum[q];
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[pass][r][i] = 0.0f;
#pragma unroll 4
    for (int j = 0; j < kHeadDim; ++j) {
      const float4 w4 = *reinterpret_cast<const float4*>(w_t + j * kFoldStride + o0);
      const float4 lo = *reinterpret_cast<const float4*>(kv_half + j * kHalfStride + 4 * g);
      const float4 hi = *reinterpret_cast<const float4*>(kv_half + j * kHalfStride + 32 + 4 * g);
      const float w[4] = {w4.x, w4.y, w4.z, w4.w};
      const float x[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[pass][r][i] = fmaf(w[r], x[i], acc[pass][r][i]);
    }
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(acc[pass][r][i]));
  }
  // fp16 over the absmax of the whole product: it grows with L, fp16 alone would overflow
  amax = warp_all_reduce(amax, [](float a, float b) { return fmaxf(a, b); });
  __syncthreads();  // everyone is done reading shared memory before its first words are reused
  float* warp_max = w_t;
  if ((tid & 31) == 0) warp_max[tid / 32] = amax;
  __syncthreads();
  float scale = 0.0f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) scale = fmaxf(scale, warp_max[w]);
  scale = fmaxf(scale, 1e-30f);  // an all-zero product stays 0
  const float inv = 1.0f / scale;
#pragma unroll
  for (int pass = 0; pass < 2; ++pass)
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      __half* out = p.kv_proj_t + (static_cast<long long>(bh) * kHeadDim + o0 + r) * kHeadDim + 64 * pass + 4 * g;
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        __align__(8) __half h4[4];
#pragma unroll
        for (int v = 0; v < 4; ++v) h4[v] = __float2half_rn(acc[pass][r][4 * u + v] * inv);
        *reinterpret_cast<uint2*>(out + 32 * u) = *reinterpret_cast<const uint2*>(h4);
      }
    }
  if (tid == 0) p.kv_proj_scale[bh] = scale;
}

template <bool kLinear>
__global__ void __launch_bounds__(kThreads, 2) key_statistics_kernel(const Params p) {
  extern __shared__ __align__(128) uint8_t smem[];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int chunk = blockIdx.x, bh = blockIdx.y, b = bh / p.heads, h = bh % p.heads;
  const int n_tiles = (p.seq + kTile - 1) / kTile;
  const int first = chunk * p.tiles_per_chunk;
  const int count = min(first + p.tiles_per_chunk, n_tiles) - first;

  // sums over this thread's tokens of channels 4·lane … 4·lane + 3
  float k_sum[4] = {}, v_max[4] = {}, kz[4] = {};
  // φ(K)ᵀV: warp w owns key channels 32·(w % 4) … +32 (two m16 blocks) × value channels 64·(w / 4) … +64 (8 n8)
  float acc[2][8][4] = {};
  const int m_base = (warp & 3) * 32, n_base = (warp >> 2) * 64;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < count) load_tile(p, smem + s * kStageBytes, b, h, first + s, tid);
    cp_async_commit();
  }
  for (int i = 0; i < count; ++i) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // tile i has landed for every thread, and the stage of tile i - 1 is free
    if (i + kStages - 1 < count) load_tile(p, smem + ((i + kStages - 1) % kStages) * kStageBytes, b, h,
                                           first + i + kStages - 1, tid);
    cp_async_commit();
    uint8_t* k_tile = smem + (i % kStages) * kStageBytes;
    const uint8_t* v_tile = k_tile + kTileBytes;
    const int token0 = (first + i) * kTile;
#pragma unroll
    for (int r = 0; r < kTile / kWarps; ++r) {
      const int row = warp * (kTile / kWarps) + r;
      uint2* k_ptr = reinterpret_cast<uint2*>(k_tile + row * kRowBytes + lane * 8);
      float k[4], v[4];
      unpack4(*k_ptr, k);
      unpack4(*reinterpret_cast<const uint2*>(v_tile + row * kRowBytes + lane * 8), v);
#pragma unroll
      for (int j = 0; j < 4; ++j) k_sum[j] += k[j], v_max[j] = fmaxf(v_max[j], fabsf(v[j]));
      if (kLinear) {
        float m = fmaxf(fmaxf(k[0], k[1]), fmaxf(k[2], k[3]));
        m = warp_all_reduce(m, [](float a, float b) { return fmaxf(a, b); });
        float e[4], s = 0.0f;
#pragma unroll
        for (int j = 0; j < 4; ++j) e[j] = fast_exp2((k[j] - m) * kLog2e), s += e[j];
        s = warp_all_reduce(s, [](float a, float b) { return a + b; });
        // s ≥ 1 (the max term is 1): the approximate reciprocal needs no special cases; padded tokens are no keys
        const float inv = token0 + row < p.seq ? __fdividef(1.0f, s) : 0.0f;
        __align__(8) __nv_bfloat16 phi[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float x = e[j] * inv;
          kz[j] += x;
          phi[j] = __float2bfloat16_rn(x);
        }
        *k_ptr = *reinterpret_cast<const uint2*>(phi);
      }
    }
    if (kLinear) {
      __syncthreads();  // φ(K) of every token is in place
#pragma unroll
      for (int kk = 0; kk < kTile; kk += 16) {
        uint32_t a[2][4], bfrag[8][2];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
          // A = φ(K)ᵀ (m = key channel, k = token): matrices (m 0-7 | 8-15) × (k 0-7 | 8-15) in a0 … a3 order
          const int t = kk + (lane & 7) + ((lane >> 4) & 1) * 8, d = m_base + mi * 16 + ((lane >> 3) & 1) * 8;
          ldmatrix_x4_trans(a[mi], k_tile + t * kRowBytes + d * 2);
        }
#pragma unroll
        for (int nj = 0; nj < 4; ++nj) {
          // B = V (k = token, n = value channel): two n8 blocks × (k 0-7 | 8-15)
          const int t = kk + (lane & 7) + ((lane >> 3) & 1) * 8, d = n_base + nj * 16 + ((lane >> 4) & 1) * 8;
          uint32_t r[4];
          ldmatrix_x4_trans(r, v_tile + t * kRowBytes + d * 2);
          bfrag[2 * nj][0] = r[0], bfrag[2 * nj][1] = r[1], bfrag[2 * nj + 1][0] = r[2], bfrag[2 * nj + 1][1] = r[3];
        }
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
          for (int ni = 0; ni < 8; ++ni) mma_bf16(acc[mi][ni], a[mi], bfrag[ni][0], bfrag[ni][1]);
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the ring is idle: its shared memory holds the cross-warp sums below

  float* parts = p.partials + static_cast<long long>(bh) * (p.chunks + p.groups) * kPartFloats;
  float* part = parts + static_cast<long long>(chunk) * kPartFloats;
  if (kLinear) {
    // accumulator (m16 × n8): c0, c1 at (row g, columns 2c, 2c+1), c2, c3 at row g + 8; stored transposed
    const int g = lane >> 2, c = lane & 3;
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int ni = 0; ni < 8; ++ni) {
        const int row = m_base + mi * 16 + g, col = n_base + ni * 8 + 2 * c;
        part[col * kHeadDim + row] = acc[mi][ni][0];
        part[(col + 1) * kHeadDim + row] = acc[mi][ni][1];
        part[col * kHeadDim + row + 8] = acc[mi][ni][2];
        part[(col + 1) * kHeadDim + row + 8] = acc[mi][ni][3];
      }
  }
  float* sums = reinterpret_cast<float*>(smem);  // [3][kWarps][D]
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    sums[(0 * kWarps + warp) * kHeadDim + 4 * lane + j] = k_sum[j];
    sums[(1 * kWarps + warp) * kHeadDim + 4 * lane + j] = v_max[j];
    sums[(2 * kWarps + warp) * kHeadDim + 4 * lane + j] = kz[j];
  }
  __syncthreads();
  if (tid < kHeadDim) {
    float ks = 0.0f, vm = 0.0f, zs = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      ks += sums[(0 * kWarps + w) * kHeadDim + tid];
      vm = fmaxf(vm, sums[(1 * kWarps + w) * kHeadDim + tid]);
      zs += sums[(2 * kWarps + w) * kHeadDim + tid];
    }
    part[kHeadDim * kHeadDim + tid] = ks;
    part[kHeadDim * kHeadDim + kHeadDim + tid] = vm;
    part[kHeadDim * kHeadDim + 2 * kHeadDim + tid] = zs;
  }
}

// K mean, V scale and Σφ(K) of a (b, h): its chunks' partial vectors summed in chunk order. 128 threads.
template <bool kLinear>
__global__ void __launch_bounds__(kHeadDim) vector_sums_kernel(const Params p) {
  const int bh = blockIdx.x, d = threadIdx.x;
  const float* part = p.partials + static_cast<long long>(bh) * (p.chunks + p.groups) * kPartFloats +
                      kHeadDim * kHeadDim + d;
  float k_sum = 0.0f, v_max = 0.0f, kz = 0.0f;
#pragma unroll 4
  for (int c = 0; c < p.chunks; ++c, part += kPartFloats) {
    k_sum += __ldcg(part);
    v_max = fmaxf(v_max, __ldcg(part + kHeadDim));
    if (kLinear) kz += __ldcg(part + 2 * kHeadDim);
  }
  p.k_mean[bh * kHeadDim + d] = k_sum / p.seq;
  p.v_scale[bh * kHeadDim + d] = v_max / kFp8Max;
  if (kLinear) p.kz[bh * kHeadDim + d] = kz;
}

// ((φ(K)ᵀV)·Wᵀ)ᵀ of a (b, h) from its chunks' partials: grid (groups, B·H). Each CTA sums its group of chunks;
// the last to finish (classic threadfence reduction) sums the group sums and folds W.
__global__ void __launch_bounds__(kThreads, 1) kv_reduce_kernel(const Params p) {
  extern __shared__ __align__(128) uint8_t smem[];
  const int tid = threadIdx.x, group = blockIdx.x, bh = blockIdx.y;
  float* parts = p.partials + static_cast<long long>(bh) * (p.chunks + p.groups) * kPartFloats;
  float* group_sums = parts + static_cast<long long>(p.chunks) * kPartFloats;
  const int in_group = min(p.group_size, p.chunks - group * p.group_size);
  sum_partials(parts + static_cast<long long>(group) * p.group_size * kPartFloats, in_group,
               group_sums + static_cast<long long>(group) * kPartFloats, tid);
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (tid == 0) last = atomicAdd(p.tickets + bh, 1u) == static_cast<unsigned>(p.groups - 1);
  __syncthreads();
  if (!last) return;
  __threadfence();
  fold(p, smem, bh, tid, group_sums, p.groups);
}

template <bool kLinear>
cudaError_t launch(const Params& p, int batch_heads, cudaStream_t stream, cudaStream_t reduce_stream) {
  const auto kernel = key_statistics_kernel<kLinear>;
  static bool configured = false;
  if (!configured) {
    for (const void* f : {reinterpret_cast<const void*>(kernel), reinterpret_cast<const void*>(kv_reduce_kernel)}) {
      const cudaError_t err = cudaFuncSetAttribute(f, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
      if (err != cudaSuccess) return err;
    }
    configured = true;
  }
  kernel<<<dim3(p.chunks, batch_heads), kThreads, kSmemBytes, stream>>>(p);
  if (kLinear) {
    if (reduce_stream != stream) {  // fork: the reduction starts when the partials are written
      static cudaEvent_t partials_written[64] = {};  // per device: an event belongs to one
      int device = 0;
      cudaError_t err = cudaGetDevice(&device);
      if (err == cudaSuccess && device >= 64) err = cudaErrorInvalidDevice;
      if (err == cudaSuccess && partials_written[device] == nullptr) {
        err = cudaEventCreateWithFlags(&partials_written[device], cudaEventDisableTiming);
      }
      if (err == cudaSuccess) err = cudaEventRecord(partials_written[device], stream);
      if (err == cudaSuccess) err = cudaStreamWaitEvent(reduce_stream, partials_written[device], 0);
      if (err != cudaSuccess) return err;
    }
    kv_reduce_kernel<<<dim3(p.groups, batch_heads), kThreads, kSmemBytes, reduce_stream>>>(p);
  }
  vector_sums_kernel<kLinear><<<batch_heads, kHeadDim, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

// k, v: bf16 [B, L, H, 128], head dim contiguous, 16-byte aligned rows. chunks · tiles_per_chunk covers the
// ceil(L / 64) tiles and every chunk has at least one; the chunks are summed in groups of group_size.
// partials: fp32 [B·H, chunks + ceil(chunks / group_size), D² + 3·D] scratch; tickets: uint32 [B·H], zero on
// entry. k_mean and v_scale are written on `stream`; with proj_weight non-null also kz, and kv_proj_t and
// kv_proj_scale on `reduce_stream` (which may be `stream`) once the statistics kernel is done: the caller joins
// that stream before reading them. Returns a cudaError_t code.
extern "C" int sagesla_key_statistics(const void* k, const void* v, long long k_sb, long long k_sl, long long k_sh,
                                      long long v_sb, long long v_sl, long long v_sh, int batch_heads, int heads,
                                      int seq, int tiles_per_chunk, int chunks, int group_size, float* partials,
                                      unsigned* tickets, const float* proj_weight, float* k_mean, float* v_scale,
                                      float* kz, void* kv_proj_t, float* kv_proj_scale, void* stream,
                                      void* reduce_stream) {
  const int n_tiles = (seq + kTile - 1) / kTile;
  if (seq <= 0 || chunks <= 0 || tiles_per_chunk <= 0 || (chunks - 1) * tiles_per_chunk >= n_tiles ||
      chunks * tiles_per_chunk < n_tiles || group_size <= 0) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  const Params p{static_cast<const __nv_bfloat16*>(k), static_cast<const __nv_bfloat16*>(v), k_sb, k_sl, k_sh,
                 v_sb, v_sl, v_sh, seq, heads, tiles_per_chunk, chunks, group_size,
                 (chunks + group_size - 1) / group_size, partials, tickets, proj_weight, k_mean, v_scale, kz,
                 static_cast<__half*>(kv_proj_t), kv_proj_scale};
  const cudaStream_t s = static_cast<cudaStream_t>(stream), r = static_cast<cudaStream_t>(reduce_stream);
  return static_cast<int>(proj_weight != nullptr ? launch<true>(p, batch_heads, s, r)
                                                 : launch<false>(p, batch_heads, s, r));
}
