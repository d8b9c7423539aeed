// SageSLA block-sparse attention for Hopper (sm_90a): INT8 Q·Kᵀ and FP8 e4m3 P·V on wgmma, fed by TMA.
//
// The same math as the Triton `_sagesla_fwd_kernel` in engine/ops/sla.py (which stays the fallback), on the
// inputs its pre-pass makes: Q in INT8 per token with 1/sqrt(D)·log2 e folded into the scale, K smoothed and in
// INT8 per 128-key block, V in FP8 per channel, stored transposed [D, L_pad] with its tokens permuted inside every
// 32 (see below), and the LUT of kept key blocks per query block (64 or 128 rows). Per kept block: S = Q·Kᵀ (int32, exact),
// s = S·scale_q·scale_k in log2 units, base-2 online softmax with P shifted into [0, 448], then P·V from a fresh
// fp32 accumulator added into the output (SageAttention2's two-level accumulation). The linear branch,
// proj_l(φ(Q)(φ(K)ᵀV)/(φ(Q)·Σφ(K) + eps)), is added in the epilogue from the raw q and the pre-pass's
// (φ(K)ᵀV)·Wᵀ, one more wgmma per query block; the raw q comes through the K/Vᵀ ring as one more stage and the
// per-row / per-head scales with Q (bulk copies), so the epilogue waits on no global load.
//
// Why CUDA: a plain Triton kernel ties cuDNN (docs/notes/attention.md) because each warpgroup waits for its
// Q·Kᵀ, then runs the softmax while the tensor cores idle, then waits for its P·V. Here
//  - a producer thread streams K and Vᵀ tiles with TMA into a ring of shared-memory stages (mbarriers), so no
//    consumer ever issues a load;
//  - two consumer warpgroups per SM, so one's softmax runs beside the other's wgmma; with 128-row query blocks
//    both read one K/Vᵀ stream (64 rows each), which halves the L2 traffic that bounds the 64-row layout;
//  - within a consumer, Q·Kᵀ of the next block is issued before waiting for P·V of this one, so the output update
//    overlaps a matrix product (FlashAttention-3's intra-warpgroup pipelining). Its inter-warpgroup ping-pong
//    (named barriers passing the turn to issue) measured slower with 64-row blocks and no faster with 128-row
//    ones, and was dropped (docs/notes/attention.md, sessions 4 and 6).
// P goes from the accumulator registers straight into the FP8 wgmma's A registers. The two layouts order a
// thread's keys differently inside each 32-key slab; instead of shuffling P, the pre-pass stores Vᵀ's tokens in
// the A layout's order (sla.py `PERMUTE_V`): key 16h + 8u + 2q + v sits at column 16h + 4q + 2u + v.
//
// Host entry `sagesla_attention` (extern "C", loaded with ctypes by engine/ops/sagesla_cuda.py) returns a
// cudaError_t code. Head dim 128, query blocks of 64 or 128 rows, key blocks of 128 only.

#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <stdint.h>

#include "hopper.cuh"

namespace {

using namespace hopper;

constexpr int kHeadDim = 128;
constexpr int kRowsPerConsumer = 64;  // one consumer warpgroup's query rows: one wgmma M
constexpr int kBlockK = 128;          // keys per kept block: one wgmma N (Q·Kᵀ) and four k32 steps (P·V)
constexpr int kConsumers = 2;         // warpgroups 1 and 2; warpgroup 0 holds the producer threads
constexpr int kThreads = 128 * (1 + kConsumers);
constexpr int kTileBytes = kBlockK * kHeadDim;  // a K tile (int8) or a Vᵀ tile (e4m3)
constexpr int kStageBytes = 2 * kTileBytes;
constexpr int kLinearHalfBytes = kHeadDim * 64 * 2;  // 128 rows of 64 fp16 columns
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLinearEps = 1e-5f;  // sla.py LINEAR_EPS
constexpr float kPShift = 8.807f;  // log2(448): the row maximum of P lands on e4m3's largest finite value
constexpr float kMagic = 12582912.0f;  // 1.5·2^23; its bits plus an int32 |x| < 2^22 are the float magic + x
constexpr int kMagicBits = 0x4B400000;

// Two ways to split a CTA. Query blocks of 64 rows (TurboDiffusion's sm90 map, kShared = false): each consumer
// has its own query block, LUT and K/Vᵀ stream (two pipes). Query blocks of 128 rows (kShared): both consumers
// take 64 rows of one block and read one stream, half the L2 → shared-memory traffic per product — the
// 64-row kernel streams about 6 TB/s from L2 on the H100 (docs/notes/attention.md), which is what bounds it.
// kLinear: the linear branch in the epilogue, from (φ(K)ᵀV)·Wᵀ staged per work item (costs a ring stage).
template <bool kShared, bool kLinear>
struct Layout {
  static constexpr int kPipes = kShared ? 1 : kConsumers;
  static constexpr int kConsumersPerPipe = kConsumers / kPipes;
  static constexpr int kBlockQ = kRowsPerConsumer * kConsumersPerPipe;  // query rows per work item
  static constexpr int kStages = (kShared ? 6 : 3) - (kLinear ? 1 : 0);  // as many as fit in 227 KB
  static constexpr int kQBytes = kBlockQ * kHeadDim;  // int8
  static constexpr int kLinearBytes = kLinear ? kHeadDim * kHeadDim * 2 : 0;  // fp16 ((φ(K)ᵀV)·Wᵀ)ᵀ
  // a work item's scales, staged with its Q: q_scale per row, v_scale, and with kLinear Σφ(K) and proj_l's bias;
  // two buffers by item parity, since the epilogue still reads one while the next item's Q arrives
  static constexpr int kVectorFloats = kBlockQ + (kLinear ? 3 : 1) * kHeadDim;
  // a multiple of 1024 bytes: the second pipe's tiles must start on a 128-byte-swizzle atom like the first's
  static constexpr int kPipeBytes = (kQBytes + kStages * kStageBytes + kLinearBytes + 2 * kVectorFloats * 4 + 1023) /
                                    1024 * 1024;
  static constexpr int kSmemBytes = kPipes * kPipeBytes + 1024 /* alignment */ + 512 /* barriers, stage info */;
  static_assert(kSmemBytes <= 227 * 1024, "over the H100's shared memory per block");
};

struct Params {
  int total;  // work items: query blocks over all (b, h), t = bh·Mq + mq
  int heads, seq, n_qblocks, n_kblocks, n_sel, dense;
  const long long* lut;   // [B·H, Mq, n_sel] kept key-block ids (unused when dense)
  // q_scale, v_scale, kz and proj_bias are bulk-copied per work item: 16-byte aligned, as are their rows
  const float* q_scale;   // [B·H, Mq·block_q] per token, 1/sqrt(D)·log2 e folded in
  const float* k_scale;   // [B·H, Nk]
  const float* v_scale;   // [B·H, D]
  __nv_bfloat16* out;     // [B, L, H, D] with element strides below
  long long out_sb, out_sl, out_sh;
  // linear branch (kLinear; the raw q comes through its tensor map): Σφ(K) [B·H, D], the absmax that divides the
  // staged fp16 (φ(K)ᵀV)·Wᵀ [B·H], proj_l's bias [D]
  const float* kz;
  const float* kv_proj_scale;
  const float* proj_bias;
};

// A Q tile, a K/Vᵀ ring and their barriers; the producer also passes each stage's block id and scale. With the
// linear branch the ring also carries each item's raw q (bf16, 128-byte swizzled 64-channel halves: exactly one
// stage for 128 rows), streamed after the item's key blocks so the epilogue reads it from shared memory.
struct Pipe {
  uint8_t* q;
  float* vectors;  // [2][kVectorFloats]: q_scale [kBlockQ], v_scale, (kz, proj_bias) [kHeadDim]
  uint8_t* stages;
  uint64_t* q_full;
  uint64_t* q_empty;
  uint64_t* kv_full;   // [kStages]
  uint64_t* kv_empty;  // [kStages]
  int* stage_block;    // [kStages]
  float* stage_scale;  // [kStages]
  uint8_t* linear;     // kLinear: ((φ(K)ᵀV)·Wᵀ)ᵀ fp16 [D_out, D_in] as two 64-column halves, 128-byte swizzled
  uint64_t* linear_full;
  uint64_t* linear_empty;
};

template <bool kShared, bool kLinear>
__device__ __forceinline__ Pipe pipe_of(uint8_t* smem, int index) {
  using L = Layout<kShared, kLinear>;
  constexpr int kBarriers = 4 + 2 * L::kStages;
  Pipe p;
  p.q = smem + index * L::kPipeBytes;
  p.stages = p.q + L::kQBytes;
  p.linear = p.stages + L::kStages * kStageBytes;
  p.vectors = reinterpret_cast<float*>(p.linear + L::kLinearBytes);
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem + L::kPipes * L::kPipeBytes) + index * kBarriers;
  p.q_full = bars;
  p.q_empty = bars + 1;
  p.linear_full = bars + 2;
  p.linear_empty = bars + 3;
  p.kv_full = bars + 4;
  p.kv_empty = bars + 4 + L::kStages;
  int* info = reinterpret_cast<int*>(reinterpret_cast<uint64_t*>(smem + L::kPipes * L::kPipeBytes) +
                                     L::kPipes * kBarriers);
  p.stage_block = info + index * 2 * L::kStages;
  p.stage_scale = reinterpret_cast<float*>(p.stage_block + L::kStages);
  return p;
}

__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ uint32_t pack_e4m3x4(float x0, float x1, float x2, float x3) {
  const uint32_t lo = __nv_cvt_float2_to_fp8x2(make_float2(x0, x1), __NV_SATFINITE, __NV_E4M3);
  const uint32_t hi = __nv_cvt_float2_to_fp8x2(make_float2(x2, x3), __NV_SATFINITE, __NV_E4M3);
  return lo | (hi << 16);
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// One kept block's softmax step on the Q·Kᵀ accumulator `s` (int32) for this thread's two rows: P in the FP8
// A-operand layout (pa[4·slab + r]) and each row's rescale factor of the running output. Accumulator layout:
// s[4c + 2r + e] is row row0 + 8r, key 8c + 2·(lane % 4) + e.
// The row maximum is taken on the integers (the row scale is positive), so each score costs an integer add (the
// exact int32 → fp32 conversion by the bits of 1.5·2^23: no I2F, which shares the quarter-rate unit with ex2), one
// FFMA that also subtracts the running maximum, and the ex2. kMasked (only the ragged last block, which the
// producer always streams last) drops the keys at and past `valid_keys`.
template <bool kMasked>
__device__ __forceinline__ void softmax_step(int32_t (&s)[64], uint32_t (&pa)[16], float row_scale0,
                                             float row_scale1, int valid_keys, float (&m)[2], float (&l)[2],
                                             float (&alpha)[2], int lane) {
  const int key0 = 2 * (lane % 4);
  int block_max[2] = {INT32_MIN, INT32_MIN};
#pragma unroll
  for (int j = 0; j < 64; ++j) {
    const bool keep = !kMasked || 8 * (j / 4) + key0 + (j & 1) < valid_keys;
    if (keep) block_max[(j >> 1) & 1] = max(block_max[(j >> 1) & 1], s[j]);
  }
  const float row_scale[2] = {row_scale0, row_scale1};
  float bias[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    int mx = max(block_max[r], __shfl_xor_sync(0xffffffffu, block_max[r], 1));
    mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float offset = -kMagic * row_scale[r];
    const float m_new = fmaxf(m[r], fmaf(__int_as_float(mx + kMagicBits), row_scale[r], offset));
    alpha[r] = exp2_approx(m[r] - m_new);
    m[r] = m_new;
    bias[r] = offset - (m_new - kPShift);
  }
  float* x = reinterpret_cast<float*>(s);
  float row_sum[2] = {0.0f, 0.0f};
#pragma unroll
  for (int j = 0; j < 64; ++j) {
    const int r = (j >> 1) & 1;
    x[j] = exp2_approx(fmaf(__int_as_float(s[j] + kMagicBits), row_scale[r], bias[r]));
    if (kMasked && 8 * (j / 4) + key0 + (j & 1) >= valid_keys) x[j] = 0.0f;
    row_sum[r] += x[j];
  }
  l[0] = l[0] * alpha[0] + row_sum[0];
  l[1] = l[1] * alpha[1] + row_sum[1];
#pragma unroll
  for (int slab = 0; slab < 4; ++slab) {
    const int c = 4 * slab;  // accumulator column groups 4·slab .. 4·slab + 3 hold this slab's 32 keys
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      pa[4 * slab + r] = pack_e4m3x4(x[4 * c + 2 * r], x[4 * c + 2 * r + 1], x[4 * (c + 1) + 2 * r],
                                     x[4 * (c + 1) + 2 * r + 1]);
      pa[4 * slab + 2 + r] = pack_e4m3x4(x[4 * (c + 2) + 2 * r], x[4 * (c + 2) + 2 * r + 1],
                                         x[4 * (c + 3) + 2 * r], x[4 * (c + 3) + 2 * r + 1]);
    }
  }
}

__device__ __forceinline__ void issue_qk(int32_t (&s)[64], uint32_t q_addr, uint32_t k_addr) {
  const uint64_t desc_q = smem_desc(q_addr), desc_k = smem_desc(k_addr);
#pragma unroll
  for (int k = 0; k < kHeadDim / 32; ++k) wgmma_m64n128k32(s, desc_q + 2 * k, desc_k + 2 * k, k > 0);
  wgmma_commit();
}

__device__ __forceinline__ void issue_pv(float (&o)[64], const uint32_t (&pa)[16], uint32_t v_addr) {
  const uint64_t desc_v = smem_desc(v_addr);
#pragma unroll
  for (int slab = 0; slab < 4; ++slab) {
    const uint32_t a[4] = {pa[4 * slab], pa[4 * slab + 1], pa[4 * slab + 2], pa[4 * slab + 3]};
    wgmma_m64n128k32_rs(o, a, desc_v + 2 * slab, slab > 0);
  }
  wgmma_commit();
}

// One kept block: softmax of its scores in s, P·V into o. With kNext, the next block's Q·Kᵀ is issued before
// waiting for this P·V, so the output update below overlaps it (two instances instead of a branch around the
// issue: ptxas serializes wgmma issued on a path it cannot prove uniform, and a barrier wait between issue and
// wait counts as one). Without kNext the block may be the ragged one, which the producer streams last.
template <bool kShared, bool kLinear, bool kNext>
__device__ __forceinline__ void block_step(const Params& p, const Pipe& pipe, int32_t (&s)[64], uint32_t (&pa)[16],
                                           float (&o)[64], float (&o_block)[64], float (&m)[2], float (&l)[2],
                                           float q_scale0, float q_scale1, int tail_keys, uint32_t q_addr, int it,
                                           int lane) {
  constexpr int kStages = Layout<kShared, kLinear>::kStages;
  const int stage = it % kStages;
  const float k_scale = pipe.stage_scale[stage];
  float alpha[2];
  if constexpr (kNext) {
    softmax_step<false>(s, pa, q_scale0 * k_scale, q_scale1 * k_scale, kBlockK, m, l, alpha, lane);
  } else {
    if (pipe.stage_block[stage] == p.n_kblocks - 1 && tail_keys < kBlockK) {
      softmax_step<true>(s, pa, q_scale0 * k_scale, q_scale1 * k_scale, tail_keys, m, l, alpha, lane);
    } else {
      softmax_step<false>(s, pa, q_scale0 * k_scale, q_scale1 * k_scale, kBlockK, m, l, alpha, lane);
    }
  }
  const int next = (it + 1) % kStages;
  if constexpr (kNext) mbar_wait(&pipe.kv_full[next], ((it + 1) / kStages) & 1);
  wgmma_fence();
  issue_pv(o_block, pa, smem_addr(pipe.stages + stage * kStageBytes + kTileBytes));
  if constexpr (kNext) issue_qk(s, q_addr, smem_addr(pipe.stages + next * kStageBytes));
  if constexpr (kNext) {
    wgmma_wait<1>();  // this block's P·V is done; the next block's Q·Kᵀ may still run
  } else {
    wgmma_wait<0>();
  }
  if (lane == 0) mbar_arrive(&pipe.kv_empty[stage]);
#pragma unroll
  for (int j = 0; j < 64; ++j) o[j] = fmaf(o[j], alpha[(j >> 1) & 1], o_block[j]);
  if constexpr (kNext) wgmma_wait<0>();
}

// Work items of a pipe: t = first + k·stride (one pipe per CTA when shared, else one per consumer).
template <bool kShared>
__device__ __forceinline__ int first_item(int pipe) {
  return (kShared ? 1 : kConsumers) * blockIdx.x + pipe;
}

template <bool kShared>
__device__ __forceinline__ int item_stride() {
  return (kShared ? 1 : kConsumers) * gridDim.x;
}

// proj_l(o_l) for this thread's rows first_row + {0, 8} and columns 8c + 2·(lane % 4) + {0, 1}, as the Triton
// kernel's `if LINEAR:` epilogue: φ(q)·(φ(K)ᵀV)·Wᵀ / (φ(q)·Σφ(K) + eps) + b, φ = softmax over the head dim. The
// product runs on wgmma with A = exp(q - max) in fp16 straight from registers (the m16n8k16 A layout is the
// accumulator layout) and the staged ((φ(K)ᵀV)·Wᵀ)ᵀ as B; the softmax denominator Σexp folds into the final scale:
// φ·X / (φ·z + eps) = e·X / (e·z + eps·Σe).
template <bool kShared, bool kLinear>
__device__ __forceinline__ void linear_branch(const Params& p, const Pipe& pipe, float (&acc)[64],
                                              float (&linear)[2][32], const float* vectors, int bh, int row0,
                                              int round, int it, int lane) {
  using L = Layout<kShared, kLinear>;
  const int col0 = 2 * (lane % 4);
  uint32_t a[8][4];  // fp16 pairs of exp(q - max): k16 slab j holds columns 16j .. 16j + 15
  float row_sum[2], row_dot[2];
  const float* kz = vectors + L::kBlockQ + kHeadDim;
  const int stage = it % L::kStages;
  const uint8_t* raw_q = pipe.stages + stage * kStageBytes;  // [half][kBlockQ rows][128 bytes], swizzled
  mbar_wait(&pipe.kv_full[stage], (it / L::kStages) & 1);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + 8 * r;  // rows past the sequence are zeros (TMA fill): computed, never stored
    float2 x[16];
#pragma unroll
    for (int c = 0; c < 16; ++c) {  // columns 8c + col0 + {0, 1}: half c / 8, 16-byte chunk c % 8 of the row
      const int offset = (c / 8) * L::kBlockQ * 128 + row * 128 + (((c % 8) ^ (row % 8)) * 16) + col0 * 2;
      x[c] = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(raw_q + offset));
    }
    float mx = -INFINITY;
#pragma unroll
    for (int c = 0; c < 16; ++c) mx = fmaxf(mx, fmaxf(x[c].x, x[c].y));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    float sum = 0.0f, dot = 0.0f;
#pragma unroll
    for (int c = 0; c < 16; ++c) {
      const float e0 = exp2_approx((x[c].x - mx) * kLog2e), e1 = exp2_approx((x[c].y - mx) * kLog2e);
      const float2 z = *reinterpret_cast<const float2*>(kz + 8 * c + col0);
      sum += e0 + e1;
      dot = fmaf(e0, z.x, fmaf(e1, z.y, dot));
      const __half2 pair = __floats2half2_rn(e0, e1);
      a[c / 2][2 * (c % 2) + r] = *reinterpret_cast<const uint32_t*>(&pair);
    }
    row_sum[r] = quad_sum(sum);
    row_dot[r] = quad_sum(dot);
  }
  __syncwarp();
  if (lane == 0) mbar_arrive(&pipe.kv_empty[stage]);
  mbar_wait(pipe.linear_full, round & 1);
  wgmma_fence();
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const uint32_t base = smem_addr(pipe.linear + (j / 4) * kLinearHalfBytes);
    wgmma_m64n128k16_f16_rs(acc, a[j], smem_desc(base) + 2 * (j % 4), j > 0);
  }
  wgmma_commit();
  wgmma_wait<0>();
  if (lane == 0) mbar_arrive(pipe.linear_empty);
  const float scale = p.kv_proj_scale[bh];
  const float* proj_bias = vectors + L::kBlockQ + 2 * kHeadDim;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float row_scale = __fdividef(scale, row_dot[r] + kLinearEps * row_sum[r]);
#pragma unroll
    for (int c = 0; c < 16; ++c) {
      const float2 bias = *reinterpret_cast<const float2*>(proj_bias + 8 * c + col0);
      linear[r][2 * c] = fmaf(acc[4 * c + 2 * r], row_scale, bias.x);
      linear[r][2 * c + 1] = fmaf(acc[4 * c + 2 * r + 1], row_scale, bias.y);
    }
  }
}

template <bool kShared, bool kLinear>
__device__ void consume(const Params& p, const Pipe& pipe, int consumer) {
  using L = Layout<kShared, kLinear>;
  const int pipe_index = kShared ? 0 : consumer;
  const int row_offset = kShared ? consumer * kRowsPerConsumer : 0;  // this consumer's rows in the query block
  const int warp = (threadIdx.x / 32) % 4;
  const int lane = threadIdx.x % 32;
  const int row0 = row_offset + warp * 16 + lane / 4;  // and row0 + 8
  const uint32_t q_addr = smem_addr(pipe.q + row_offset * kHeadDim);
  const int tail_keys = p.seq - (p.n_kblocks - 1) * kBlockK;
  int it = 0;
  int round = 0;
  for (int t = first_item<kShared>(pipe_index); t < p.total; t += item_stride<kShared>(), ++round) {
    const int bh = t / p.n_qblocks;
    const int mq = t - bh * p.n_qblocks;
    float o[64], o_block[64];
#pragma unroll
    for (int j = 0; j < 64; ++j) o[j] = 0.0f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
    int32_t s[64];
    uint32_t pa[16];

    mbar_wait(pipe.q_full, round & 1);
    const float* vectors = pipe.vectors + (round & 1) * L::kVectorFloats;
    const float q_scale0 = vectors[row0];
    const float q_scale1 = vectors[row0 + 8];
    mbar_wait(&pipe.kv_full[it % L::kStages], (it / L::kStages) & 1);
    wgmma_fence();
    issue_qk(s, q_addr, smem_addr(pipe.stages + (it % L::kStages) * kStageBytes));
    wgmma_wait<0>();
    if (p.n_sel == 1 && lane == 0) mbar_arrive(pipe.q_empty);
    for (int i = 0; i + 1 < p.n_sel; ++i, ++it) {
      block_step<kShared, kLinear, true>(p, pipe, s, pa, o, o_block, m, l, q_scale0, q_scale1, tail_keys, q_addr, it,
                                         lane);
      if (i + 2 == p.n_sel && lane == 0) mbar_arrive(pipe.q_empty);  // the last Q·Kᵀ is done with Q
    }
    block_step<kShared, kLinear, false>(p, pipe, s, pa, o, o_block, m, l, q_scale0, q_scale1, tail_keys, q_addr, it,
                                        lane);
    ++it;

    // Epilogue: o / l · v_scale (+ the linear branch), bf16.
    const int b = bh / p.heads, h = bh - b * p.heads;
    const int col0 = 2 * (lane % 4);  // this thread's columns: 8c + col0 + {0, 1}, c = 0..15
    float linear[2][32];  // the linear branch at this thread's outputs
    if constexpr (kLinear) {
      linear_branch<kShared, kLinear>(p, pipe, o_block, linear, vectors, bh, row0, round, it, lane);
      ++it;  // the raw q stage
    }
    // Every load before the first store: the compiler cannot prove out apart from the inputs, and a load behind
    // a store waits for it (interleaved reads of out once cost 3.3 instead of 0.8 ms at Wan 1.3B).
    const float* v_scale = vectors + L::kBlockQ;
    float2 channel_scale[16];
#pragma unroll
    for (int c = 0; c < 16; ++c) channel_scale[c] = *reinterpret_cast<const float2*>(v_scale + 8 * c + col0);
    __nv_bfloat16* out = p.out + b * p.out_sb + h * p.out_sh;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = mq * L::kBlockQ + row0 + 8 * r;
      const float inv_l = __fdividef(1.0f, quad_sum(l[r]));
      if (row >= p.seq) continue;
      __nv_bfloat162* dst = reinterpret_cast<__nv_bfloat162*>(out + row * p.out_sl + col0);  // + 4c: column 8c
#pragma unroll
      for (int c = 0; c < 16; ++c) {
        const float y0 = o[4 * c + 2 * r] * inv_l * channel_scale[c].x + (kLinear ? linear[r][2 * c] : 0.0f);
        const float y1 = o[4 * c + 2 * r + 1] * inv_l * channel_scale[c].y + (kLinear ? linear[r][2 * c + 1] : 0.0f);
        dst[4 * c] = __floats2bfloat162_rn(y0, y1);
      }
    }
  }
}

// Streams Q and the kept K/Vᵀ tiles of a pipe's query blocks. The ragged last key block, when kept, always goes
// last, so the consumers mask only their final step.
template <bool kShared, bool kLinear>
__device__ void produce(const Params& p, const Pipe& pipe, int pipe_index, const CUtensorMap* map_q,
                        const CUtensorMap* map_k, const CUtensorMap* map_v, const CUtensorMap* map_linear,
                        const CUtensorMap* map_raw_q) {
  using L = Layout<kShared, kLinear>;
  const int padded_keys = p.n_kblocks * kBlockK;
  const int ragged = p.seq % kBlockK != 0 ? p.n_kblocks - 1 : -1;
  int it = 0;
  int round = 0;
  for (int t = first_item<kShared>(pipe_index); t < p.total; t += item_stride<kShared>(), ++round) {
    const int bh = t / p.n_qblocks;
    mbar_wait(pipe.q_empty, (round & 1) ^ 1);  // a fresh barrier's "previous phase" counts as complete
    mbar_expect_tx(pipe.q_full, L::kQBytes + L::kVectorFloats * 4);
    for (int half = 0; half < L::kBlockQ / kRowsPerConsumer; ++half) {  // the Q map's box is 64 rows
      tma_load_2d(pipe.q + half * kRowsPerConsumer * kHeadDim, map_q, 0, t * L::kBlockQ + half * kRowsPerConsumer,
                  pipe.q_full);
    }
    // free: the item two back that used it finished its epilogue before the consumers released the last Q
    float* vectors = pipe.vectors + (round & 1) * L::kVectorFloats;
    bulk_load(vectors, p.q_scale + static_cast<long long>(t) * L::kBlockQ, L::kBlockQ * 4, pipe.q_full);
    bulk_load(vectors + L::kBlockQ, p.v_scale + static_cast<long long>(bh) * kHeadDim, kHeadDim * 4, pipe.q_full);
    if constexpr (kLinear) {
      bulk_load(vectors + L::kBlockQ + kHeadDim, p.kz + static_cast<long long>(bh) * kHeadDim, kHeadDim * 4,
                pipe.q_full);
      bulk_load(vectors + L::kBlockQ + 2 * kHeadDim, p.proj_bias, kHeadDim * 4, pipe.q_full);
    }
    const auto load = [&](int block) {
      const float k_scale = p.k_scale[static_cast<long long>(bh) * p.n_kblocks + block];
      const int stage = it % L::kStages;
      mbar_wait(&pipe.kv_empty[stage], ((it / L::kStages) & 1) ^ 1);
      // plain shared stores, published by the arrive (release) below and read after the consumer's wait (acquire)
      pipe.stage_block[stage] = block;
      pipe.stage_scale[stage] = k_scale;
      mbar_expect_tx(&pipe.kv_full[stage], kStageBytes);
      uint8_t* dst = pipe.stages + stage * kStageBytes;
      tma_load_2d(dst, map_k, 0, bh * padded_keys + block * kBlockK, &pipe.kv_full[stage]);
      tma_load_2d(dst + kTileBytes, map_v, block * kBlockK, bh * kHeadDim, &pipe.kv_full[stage]);
      ++it;
    };
    const long long* lut = p.lut + static_cast<long long>(t) * p.n_sel;
    bool ragged_kept = false;
    for (int i = 0; i < p.n_sel; ++i) {
      const int block = p.dense ? i : static_cast<int>(lut[i]);
      if (block == ragged) {
        ragged_kept = true;
      } else {
        load(block);
      }
    }
    if (ragged_kept) load(ragged);
    if constexpr (kLinear) {
      // the item's raw q (for φ(q)) as one more ring stage: two 64-channel halves of kBlockQ rows
      const int stage = it % L::kStages;
      mbar_wait(&pipe.kv_empty[stage], ((it / L::kStages) & 1) ^ 1);
      mbar_expect_tx(&pipe.kv_full[stage], L::kBlockQ * kHeadDim * 2);
      uint8_t* dst = pipe.stages + stage * kStageBytes;
      const int b = bh / p.heads, h = bh - b * p.heads, first_row = (t - bh * p.n_qblocks) * L::kBlockQ;
      for (int half = 0; half < 2; ++half) {
        for (int rows = 0; rows < L::kBlockQ; rows += 64) {
          tma_load_4d(dst + half * L::kBlockQ * 128 + rows * 128, map_raw_q, half * 64, h, first_row + rows, b,
                      &pipe.kv_full[stage]);
        }
      }
      ++it;
      // after this item's K/Vᵀ: the buffer is free once the previous item's epilogue is done with it
      mbar_wait(pipe.linear_empty, (round & 1) ^ 1);
      mbar_expect_tx(pipe.linear_full, L::kLinearBytes);
      for (int half = 0; half < 2; ++half) {  // 64 columns (128 bytes) per box: one swizzle row
        tma_load_2d(pipe.linear + half * kLinearHalfBytes, map_linear, half * 64, bh * kHeadDim, pipe.linear_full);
      }
    }
  }
}

template <bool kShared, bool kLinear>
__global__ void __launch_bounds__(kThreads, 1)
    sagesla_attention_kernel(const __grid_constant__ CUtensorMap map_q, const __grid_constant__ CUtensorMap map_k,
                             const __grid_constant__ CUtensorMap map_v, const __grid_constant__ CUtensorMap map_linear,
                             const __grid_constant__ CUtensorMap map_raw_q, const Params p) {
  using L = Layout<kShared, kLinear>;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  const int warpgroup = threadIdx.x / 128;
  if (threadIdx.x == 0) {
    for (int index = 0; index < L::kPipes; ++index) {
      const Pipe pipe = pipe_of<kShared, kLinear>(smem, index);
      const int readers = 4 * L::kConsumersPerPipe;  // one arrive per consumer warp
      mbar_init(pipe.q_full, 1);
      mbar_init(pipe.q_empty, readers);
      mbar_init(pipe.linear_full, 1);
      mbar_init(pipe.linear_empty, readers);
      for (int s = 0; s < L::kStages; ++s) {
        mbar_init(&pipe.kv_full[s], 1);
        mbar_init(&pipe.kv_empty[s], readers);
      }
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (warpgroup == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 24;");
    const int warp = threadIdx.x / 32;
    if (warp < L::kPipes && threadIdx.x % 32 == 0) {
      if (warp == 0) {
        prefetch_tensormap(&map_q);
        prefetch_tensormap(&map_k);
        prefetch_tensormap(&map_v);
        if (kLinear) prefetch_tensormap(&map_linear);
        if (kLinear) prefetch_tensormap(&map_raw_q);
      }
      produce<kShared, kLinear>(p, pipe_of<kShared, kLinear>(smem, warp), warp, &map_q, &map_k, &map_v, &map_linear,
                                &map_raw_q);
    }
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 240;");
    const int consumer = warpgroup - 1;
    consume<kShared, kLinear>(p, pipe_of<kShared, kLinear>(smem, kShared ? 0 : consumer), consumer);
  }
}

template <bool kShared, bool kLinear>
cudaError_t launch(const CUtensorMap& map_q, const CUtensorMap& map_k, const CUtensorMap& map_v,
                   const CUtensorMap& map_linear, const CUtensorMap& map_raw_q, const Params& p, int num_sms,
                   cudaStream_t stream) {
  using L = Layout<kShared, kLinear>;
  const auto kernel = sagesla_attention_kernel<kShared, kLinear>;
  static bool configured = false;
  if (!configured) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, L::kSmemBytes);
    if (err != cudaSuccess) return err;
    configured = true;
  }
  const int ctas = (p.total + L::kPipes - 1) / L::kPipes;
  kernel<<<ctas < num_sms ? ctas : num_sms, kThreads, L::kSmemBytes, stream>>>(map_q, map_k, map_v, map_linear,
                                                                                  map_raw_q, p);
  return cudaGetLastError();
}

}  // namespace

// block_q: 64 (two pipes) or 128 (one shared pipe). kv_proj_t (fp16 [B·H, D, D], ((φ(K)ᵀV)·Wᵀ)ᵀ over its
// absmax) non-null: the linear branch is added in the epilogue, with q, kz, kv_proj_scale and proj_bias as in
// Params. Returns a cudaError_t code.
extern "C" int sagesla_attention(const void* q8, const float* q_scale, const void* k8, const float* k_scale,
                                 const void* v8t, const float* v_scale, const long long* lut, int batch_heads,
                                 int heads, int seq, int block_q, int n_sel, int dense, void* out, long long out_sb,
                                 long long out_sl, long long out_sh, const void* kv_proj_t, const void* q,
                                 long long q_sb, long long q_sl, long long q_sh, const float* kz,
                                 const float* kv_proj_scale, const float* proj_bias, int num_sms, void* stream) {
  if (block_q != 64 && block_q != 128) return static_cast<int>(cudaErrorInvalidValue);
  const int n_qblocks = (seq + block_q - 1) / block_q;
  const int n_kblocks = (seq + kBlockK - 1) / kBlockK;
  const long long padded_keys = static_cast<long long>(n_kblocks) * kBlockK;
  const bool linear = kv_proj_t != nullptr;
  CUtensorMap map_q, map_k, map_v, map_linear{}, map_raw_q{};
  if (!make_8bit_map(&map_q, q8, static_cast<long long>(batch_heads) * n_qblocks * block_q, kHeadDim, kHeadDim,
                     kHeadDim, kRowsPerConsumer) ||
      !make_8bit_map(&map_k, k8, batch_heads * padded_keys, kHeadDim, kHeadDim, kHeadDim, kBlockK) ||
      !make_8bit_map(&map_v, v8t, static_cast<long long>(batch_heads) * kHeadDim, padded_keys, padded_keys,
                     kBlockK, kHeadDim) ||
      (linear && !make_2d_map(&map_linear, CU_TENSOR_MAP_DATA_TYPE_FLOAT16, kv_proj_t,
                              static_cast<long long>(batch_heads) * kHeadDim, kHeadDim, kHeadDim * 2, 64, kHeadDim)) ||
      (linear && !make_tokens_map(&map_raw_q, q, batch_heads / heads, seq, heads, kHeadDim, q_sb, q_sl, q_sh, 64,
                                  64))) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  const Params p{batch_heads * n_qblocks, heads, seq, n_qblocks, n_kblocks, n_sel, dense,
                 lut, q_scale, k_scale, v_scale, static_cast<__nv_bfloat16*>(out), out_sb, out_sl, out_sh,
                 kz, kv_proj_scale, proj_bias};
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  cudaError_t status;
  if (block_q == 128) {
    status = linear ? launch<true, true>(map_q, map_k, map_v, map_linear, map_raw_q, p, num_sms, s)
                    : launch<true, false>(map_q, map_k, map_v, map_linear, map_raw_q, p, num_sms, s);
  } else {
    status = linear ? launch<false, true>(map_q, map_k, map_v, map_linear, map_raw_q, p, num_sms, s)
                    : launch<false, false>(map_q, map_k, map_v, map_linear, map_raw_q, p, num_sms, s);
  }
  return static_cast<int>(status);
}
