// W8A8 GEMM with TurboDiffusion's 128×128 block scales for Hopper (sm_90a): TMA + wgmma, warp-specialized.
//
// y[m, n] = Σ_kb sA[m/128, kb]·sB[n/128, kb]·Σ_{k∈kb} a[m, k]·b[n, k] (+ bias[n]), a [M, K], b [N, K], both int8
// or both float8 e4m3 (the weight requantized from the INT8 checkpoint, int8_linear.py `requantize_int8_to_fp8`).
// Each 128-wide K tile's product (exact in int32 for int8; fp32 from the tensor core for e4m3) is promoted into an
// fp32 accumulator. The Triton kernel waits for a tile's wgmma and then promotes while the tensor cores idle; here
// two consumer warpgroups share each SM (DeepGEMM's scheme), so one's promotion can overlap the other's wgmma, and
// one producer thread feeds a ring of shared-memory stages with the bulk tensor copy engine (TMA). The grid is
// persistent: the producer loads the next tile while the consumers run the epilogue. Measured on the H100 it ties
// the Triton kernel with int8 operands at large K and loses at K = 1536 (docs/notes/linear.md), hence opt-in.
//
// CTA tile 128×256: a 128-row activation scale block × two 128-column weight scale blocks, so each promotion
// factor is one scalar. Consumer warpgroup w owns rows [64w, 64w+64) and runs two m64n128k32 wgmma chains per K
// tile (one per column half) through one partial register set: 128 fp32 + 64 partial accumulator registers.
// With kPingPong the two consumers take turns issuing (named barriers pass the turn once a chain is issued): left
// alone they issue together, finish together and promote together, and the tensor cores idle meanwhile.
// Epilogues: bf16 store (+ bias), the Wan residual update (fp32 residual += gate · bf16(y)), and bias + GELU(tanh)
// + the 128×128 int8 quantizer of the next GEMM's input (each column half of a tile is one quantization block).
//
// Host entry `w8a8_gemm` (extern "C", loaded with ctypes by engine/ops/w8a8_cuda.py) returns a cudaError_t code.

#include <cuda_bf16.h>
#include <stdint.h>

#include <type_traits>

#include "hopper.cuh"

namespace {

constexpr int kBlockM = 128;
constexpr int kBlockN = 256;
constexpr int kHalfN = 128;   // one weight scale block, one wgmma chain
constexpr int kBlockK = 128;  // = the scale block: the promotion factor changes every 128 channels
constexpr int kStages = 4;
constexpr int kTileBytes = kBlockM * kBlockK;         // a 128×128 int8 box: the A tile, half the B tile
constexpr int kStageBytes = kTileBytes + 2 * kTileBytes;  // A, B rows [0, 128), B rows [128, 256)
constexpr int kThreads = 384;  // warpgroup 0: producer; 1 and 2: consumers
constexpr int kConsumerWarps = 8;
constexpr int kSmemBytes = kStages * kStageBytes + 1024 /* alignment */ + 512 /* barriers, reduction */;

enum Epilogue : int { kStoreBf16 = 0, kResidual = 1, kGeluQuant = 2 };
enum BiasKind : int { kNoBias = 0, kBiasBf16 = 1, kBiasFp32 = 2 };

struct Params {
  int M, N, K;
  const float* a_scale;
  long long a_scale_s0, a_scale_s1;
  const float* b_scale;
  long long b_scale_s0, b_scale_s1;
  const void* bias;
  int bias_kind;
  void* out;  // bf16 [M, N] | fp32 residual [M, N] | int8 [M, N]
  long long ld_out;
  const float* gate;  // kResidual: fp32 [G, N]
  long long ld_gate;
  int rows_per_gate;
  float* q_scale;  // kGeluQuant: fp32 [ceil(M/128), ceil(N/128)]
  long long q_scale_s0, q_scale_s1;
  int group_m;
};

using namespace hopper;

// Named barriers among the 256 consumer threads (id 0 is __syncthreads; 1 is the GELU epilogue's reduction).
constexpr int kTurnBarrier = 2;  // 2 + c: consumer c's turn on the tensor cores

// ---- Tile order --------------------------------------------------------------------------------------------

// Grouped order: group_m row tiles sweep all column tiles together, so the CTAs in flight share A rows and B
// columns in L2.
__device__ __forceinline__ void tile_coords(int tile, int tiles_m, int tiles_n, int group_m, int& tm, int& tn) {
  const int per_group = group_m * tiles_n;
  const int first_m = (tile / per_group) * group_m;
  const int rows = min(tiles_m - first_m, group_m);
  const int in_group = tile % per_group;
  tm = first_m + in_group % rows;
  tn = in_group / rows;
}

// ---- Epilogue math (matches engine/ops/int8_linear.py's Triton epilogues) -----------------------------------

__device__ __forceinline__ float round_to_bf16(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }

__device__ __forceinline__ float gelu_tanh_bf16(float h) {
  // nn.GELU(approximate="tanh") on a bf16 input, result rounded to bf16 as torch stores it.
  const float inner = 0.7978845608028654f * (h + 0.044715f * h * h * h);
  const float z = fmaxf(2.0f * inner, -80.0f);
  return round_to_bf16(h * (1.0f / (1.0f + __expf(-z))));
}

__device__ __forceinline__ float load_bias(const Params& p, int col) {
  if (p.bias_kind == kBiasBf16) return __bfloat162float(static_cast<const __nv_bfloat16*>(p.bias)[col]);
  if (p.bias_kind == kBiasFp32) return static_cast<const float*>(p.bias)[col];
  return 0.0f;
}

// ---- Kernel ----------------------------------------------------------------------------------------------------

// Consumer warpgroup `consumer` (0 or 1): rows [64·consumer, 64·consumer + 64) of every tile, then its epilogue.
template <int kEpilogue, bool kPingPong, bool kFp8>
__device__ __forceinline__ void consume(const Params& p, uint8_t* smem, uint64_t* full, uint64_t* empty,
                                        float* reduction, int consumer) {
  const int tiles_m = (p.M + kBlockM - 1) / kBlockM;
  const int tiles_n = (p.N + kBlockN - 1) / kBlockN;
  const int scale_rows_a = tiles_m;
  const int scale_rows_b = (p.N + kHalfN - 1) / kHalfN;
  const int k_tiles = (p.K + kBlockK - 1) / kBlockK;
  const int warp = (threadIdx.x / 32) % 4;  // warp within the warpgroup: 16 rows each
  const int lane = threadIdx.x % 32;
  const bool warp_leader = lane == 0;

  float acc[2 * 64];
  // INT8 partials need an int32 → fp32 conversion per element and K tile; FP8 ones come out in fp32.
  std::conditional_t<kFp8, float, int32_t> part[64];
  if (kPingPong && consumer == 1) named_barrier_arrive(kTurnBarrier, 256);  // consumer 0 goes first
  int it = 0;
  for (int tile = blockIdx.x; tile < tiles_m * tiles_n; tile += gridDim.x) {
    int tm, tn;
    tile_coords(tile, tiles_m, tiles_n, p.group_m, tm, tn);
    // A ragged last column half past the matrix (no weight scale row) scales by 0.
    const bool has_hi = 2 * tn + 1 < scale_rows_b;
    const int a_row = tm * static_cast<int>(p.a_scale_s0);  // 32-bit offsets: registers are scarce here
    const int b_row_lo = 2 * tn * static_cast<int>(p.b_scale_s0);
    const int b_row_hi = has_hi ? b_row_lo + static_cast<int>(p.b_scale_s0) : b_row_lo;
#pragma unroll
    for (int j = 0; j < 128; ++j) acc[j] = 0.0f;

    for (int kt = 0; kt < k_tiles; ++kt, ++it) {
      // Loaded before the wait, so the latency hides behind it.
      const float sa = p.a_scale[a_row + kt * static_cast<int>(p.a_scale_s1)];
      const float scale_lo = sa * p.b_scale[b_row_lo + kt * static_cast<int>(p.b_scale_s1)];
      const float scale_hi = has_hi ? sa * p.b_scale[b_row_hi + kt * static_cast<int>(p.b_scale_s1)] : 0.0f;
      const int s = it % kStages;
      mbar_wait(&full[s], (it / kStages) & 1);
      const uint32_t a_base = smem_addr(smem + s * kStageBytes) + consumer * 64 * kBlockK;
      const uint32_t b_base = smem_addr(smem + s * kStageBytes + kTileBytes);
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        // Ping-pong: the consumers take turns issuing, one chain each, so one's promotion runs while the other's
        // wgmmas do (left alone, both issue together, finish together and promote together).
        if constexpr (kPingPong) named_barrier_sync(kTurnBarrier + consumer, 256);
        wgmma_fence();
        // Each k32 step moves 32 bytes along the swizzled rows: + 2 in the descriptor's address field (16-byte units).
        const uint64_t desc_a = smem_desc(a_base), desc_b = smem_desc(b_base + half * kTileBytes);
#pragma unroll
        for (int k = 0; k < kBlockK / 32; ++k) wgmma_m64n128k32(part, desc_a + 2 * k, desc_b + 2 * k, k > 0);
        wgmma_commit();
        // Hand the turn over once this chain is issued, not done: the other consumer's chain queues right behind
        // it, so the tensor cores never wait for a completion, an arrive and an issue between chains.
        if constexpr (kPingPong) named_barrier_arrive(kTurnBarrier + (consumer ^ 1), 256);
        wgmma_wait<0>();
        if (half == 1 && warp_leader) mbar_arrive(&empty[s]);  // this warp no longer reads stage s
        const float scale = half == 0 ? scale_lo : scale_hi;
        // For INT8 the int32 → fp32 conversion here (I2FP) is the kernel's costliest ALU step: without it the
        // kernel ran ~25 % faster (docs/notes/linear.md); the exact alternatives measured (integer + float add on
        // the bits of 1.5·2^23) were no faster. FP8 partials are fp32 already.
#pragma unroll
        for (int j = 0; j < 64; ++j) acc[64 * half + j] = fmaf(scale, static_cast<float>(part[j]), acc[64 * half + j]);
      }
    }

    // ---- Epilogue: thread (warp, lane) holds rows r and r + 8 and, per column half, columns
    // 8c + 2·(lane % 4) + {0, 1}, c = 0..15, in acc[64·half + 4c + 2·(row is r + 8) + {0, 1}].
    const int row0 = tm * kBlockM + consumer * 64 + warp * 16 + lane / 4;
    const int col0 = tn * kBlockN + 2 * (lane % 4);
    if constexpr (kEpilogue == kGeluQuant) {
      float local_max[2] = {0.0f, 0.0f};
#pragma unroll
      for (int half = 0; half < 2; ++half) {
#pragma unroll
        for (int c = 0; c < 16; ++c) {
          const int col = col0 + half * kHalfN + 8 * c;
          const float bias0 = col < p.N ? load_bias(p, col) : 0.0f;
          const float bias1 = col + 1 < p.N ? load_bias(p, col + 1) : 0.0f;
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int row = row0 + 8 * r;
            float& v0 = acc[64 * half + 4 * c + 2 * r];
            float& v1 = acc[64 * half + 4 * c + 2 * r + 1];
            v0 = gelu_tanh_bf16(round_to_bf16(v0 + bias0));
            v1 = gelu_tanh_bf16(round_to_bf16(v1 + bias1));
            if (row < p.M) {
              if (col < p.N) local_max[half] = fmaxf(local_max[half], fabsf(v0));
              if (col + 1 < p.N) local_max[half] = fmaxf(local_max[half], fabsf(v1));
            }
          }
        }
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2) {
          local_max[half] = fmaxf(local_max[half], __shfl_xor_sync(0xffffffffu, local_max[half], offset));
        }
        if (warp_leader) reduction[half * kConsumerWarps + consumer * 4 + warp] = local_max[half];
      }
      asm volatile("bar.sync 1, 256;" ::: "memory");  // the two consumer warpgroups only
      float amax[2] = {1e-8f, 1e-8f};
#pragma unroll
      for (int half = 0; half < 2; ++half) {
#pragma unroll
        for (int w8 = 0; w8 < kConsumerWarps; ++w8) amax[half] = fmaxf(amax[half], reduction[half * kConsumerWarps + w8]);
      }
      asm volatile("bar.sync 1, 256;" ::: "memory");  // everyone has read before the next tile writes
      int8_t* q = static_cast<int8_t*>(p.out);
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const float inv = __fdiv_rn(128.0f, amax[half]);
#pragma unroll
        for (int c = 0; c < 16; ++c) {
          const int col = col0 + half * kHalfN + 8 * c;
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int row = row0 + 8 * r;
            if (row >= p.M || col >= p.N) continue;
            float v0 = __fmul_rn(acc[64 * half + 4 * c + 2 * r], inv);
            float v1 = __fmul_rn(acc[64 * half + 4 * c + 2 * r + 1], inv);
            v0 = v0 == v0 ? fminf(fmaxf(rintf(v0), -128.0f), 127.0f) : 0.0f;
            v1 = v1 == v1 ? fminf(fmaxf(rintf(v1), -128.0f), 127.0f) : 0.0f;
            int8_t* dst = q + static_cast<long long>(row) * p.ld_out + col;
            if (col + 1 < p.N) {
              char2 pair;
              pair.x = static_cast<signed char>(v0);
              pair.y = static_cast<signed char>(v1);
              *reinterpret_cast<char2*>(dst) = pair;
            } else {
              dst[0] = static_cast<int8_t>(v0);
            }
          }
        }
        const int block_n = 2 * tn + half;
        if (threadIdx.x == 128 && tm < scale_rows_a && block_n < scale_rows_b) {
          p.q_scale[tm * p.q_scale_s0 + block_n * p.q_scale_s1] = __fdiv_rn(amax[half], 128.0f);
        }
      }
    } else {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
#pragma unroll
        for (int c = 0; c < 16; ++c) {
          const int col = col0 + half * kHalfN + 8 * c;
          if (col >= p.N) continue;
          const bool pair = col + 1 < p.N;
          const float bias0 = load_bias(p, col);
          const float bias1 = pair ? load_bias(p, col + 1) : 0.0f;
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int row = row0 + 8 * r;
            if (row >= p.M) continue;
            const float v0 = acc[64 * half + 4 * c + 2 * r] + bias0;
            const float v1 = acc[64 * half + 4 * c + 2 * r + 1] + bias1;
            const long long offset = static_cast<long long>(row) * p.ld_out + col;
            if constexpr (kEpilogue == kResidual) {
              // The unfused chain stores the Linear's output in bf16 before `x + y · gate`: round where it does.
              const float* gate = p.gate + static_cast<long long>(row / p.rows_per_gate) * p.ld_gate + col;
              float* dst = static_cast<float*>(p.out) + offset;
              if (pair) {
                float2 res = *reinterpret_cast<float2*>(dst);
                res.x += round_to_bf16(v0) * gate[0];
                res.y += round_to_bf16(v1) * gate[1];
                *reinterpret_cast<float2*>(dst) = res;
              } else {
                dst[0] += round_to_bf16(v0) * gate[0];
              }
            } else {
              __nv_bfloat16* dst = static_cast<__nv_bfloat16*>(p.out) + offset;
              if (pair) {
                *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(v0, v1);
              } else {
                dst[0] = __float2bfloat16_rn(v0);
              }
            }
          }
        }
      }
    }
  }
  if (kPingPong && consumer == 0) named_barrier_sync(kTurnBarrier, 256);  // the last turn consumer 1 handed over
}

template <int kEpilogue, bool kPingPong, bool kFp8>
__global__ void __launch_bounds__(kThreads, 1)
    w8a8_gemm_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_b,
                     const Params p) {
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kStages * kStageBytes);
  uint64_t* empty = full + kStages;
  float* reduction = reinterpret_cast<float*>(empty + kStages);  // 2 × kConsumerWarps floats

  const int warpgroup = threadIdx.x / 128;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], kConsumerWarps);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (warpgroup == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
    if (threadIdx.x == 0) {
      prefetch_tensormap(&map_a);
      prefetch_tensormap(&map_b);
      const int tiles_m = (p.M + kBlockM - 1) / kBlockM;
      const int tiles_n = (p.N + kBlockN - 1) / kBlockN;
      const int k_tiles = (p.K + kBlockK - 1) / kBlockK;
      int it = 0;
      for (int tile = blockIdx.x; tile < tiles_m * tiles_n; tile += gridDim.x) {
        int tm, tn;
        tile_coords(tile, tiles_m, tiles_n, p.group_m, tm, tn);
        for (int kt = 0; kt < k_tiles; ++kt, ++it) {
          const int s = it % kStages;
          mbar_wait(&empty[s], ((it / kStages) & 1) ^ 1);  // a fresh barrier's "previous phase" is complete
          mbar_expect_tx(&full[s], kStageBytes);          // out-of-bounds box parts are zero-filled and counted
          uint8_t* stage = smem + s * kStageBytes;
          tma_load_2d(stage, &map_a, kt * kBlockK, tm * kBlockM, &full[s]);
          tma_load_2d(stage + kTileBytes, &map_b, kt * kBlockK, tn * kBlockN, &full[s]);
          tma_load_2d(stage + 2 * kTileBytes, &map_b, kt * kBlockK, tn * kBlockN + kHalfN, &full[s]);
        }
      }
    }
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
    consume<kEpilogue, kPingPong, kFp8>(p, smem, full, empty, reduction, warpgroup - 1);
  }
}

// A row-major int8 [rows, K] operand as 128×128-byte boxes with 128-byte swizzle (the wgmma K-major layout).
bool make_operand_map(CUtensorMap* map, const void* ptr, int rows, int K, long long ld) {
  return make_8bit_map(map, ptr, rows, K, ld, kBlockK, kBlockM);
}

template <int kEpilogue, bool kPingPong, bool kFp8>
cudaError_t launch(const CUtensorMap& map_a, const CUtensorMap& map_b, const Params& p, int num_sms,
                   cudaStream_t stream) {
  const auto kernel = w8a8_gemm_kernel<kEpilogue, kPingPong, kFp8>;
  static bool configured = false;
  if (!configured) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
    if (err != cudaSuccess) return err;
    configured = true;
  }
  const int tiles = ((p.M + kBlockM - 1) / kBlockM) * ((p.N + kBlockN - 1) / kBlockN);
  kernel<<<tiles < num_sms ? tiles : num_sms, kThreads, kSmemBytes, stream>>>(map_a, map_b, p);
  return cudaGetLastError();
}

}  // namespace

extern "C" int w8a8_gemm(const void* a, long long lda, const void* b, long long ldb, int M, int N, int K,
                         const float* a_scale, long long a_scale_s0, long long a_scale_s1, const float* b_scale,
                         long long b_scale_s0, long long b_scale_s1, const void* bias, int bias_kind, void* out,
                         long long ld_out, int epilogue, const float* gate, long long ld_gate, int rows_per_gate,
                         float* q_scale, long long q_scale_s0, long long q_scale_s1, int num_sms, int group_m,
                         int variant, void* stream) {
  CUtensorMap map_a, map_b;
  if (!make_operand_map(&map_a, a, M, K, lda) || !make_operand_map(&map_b, b, N, K, ldb)) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  const Params p{M,      N,       K,        a_scale,       a_scale_s0, a_scale_s1, b_scale, b_scale_s0,
                 b_scale_s1, bias, bias_kind, out,         ld_out,     gate,       ld_gate, rows_per_gate,
                 q_scale, q_scale_s0, q_scale_s1, group_m};
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  // variant bit 0: the consumers take turns on the tensor cores (ping-pong); bit 1: e4m3 operands (else int8).
  switch (epilogue * 4 + (variant & 3)) {
#define W8A8_CASE(epi, v) \
  case epi * 4 + v: return static_cast<int>(launch<epi, (v & 1) != 0, (v & 2) != 0>(map_a, map_b, p, num_sms, s));
    W8A8_CASE(kStoreBf16, 0) W8A8_CASE(kStoreBf16, 1) W8A8_CASE(kStoreBf16, 2) W8A8_CASE(kStoreBf16, 3)
    W8A8_CASE(kResidual, 0) W8A8_CASE(kResidual, 1) W8A8_CASE(kResidual, 2) W8A8_CASE(kResidual, 3)
    W8A8_CASE(kGeluQuant, 0) W8A8_CASE(kGeluQuant, 1) W8A8_CASE(kGeluQuant, 2) W8A8_CASE(kGeluQuant, 3)
#undef W8A8_CASE
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}
