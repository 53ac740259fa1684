// The per-token float ops of the engine (ops.cpp): RMSNorm, RoPE, the KV cache, attention, gated
// activations, the LM head and the embedding lookup. Plain pointers in: the bindings
// (ops_bindings.cpp) have checked every shape, type and bound before a call.
#pragma once
#include <cstdint>
#include <cstring>
#include <string>

namespace tritlm {
namespace ops {

enum class Isa { portable, avx2, avx512, neon };

// The ops' instruction set for a kernel-set name ("avx512", "avx2", "i8mm", "dotprod", "neon",
// "portable"; the aarch64 sets share the NEON ops); throws
// std::invalid_argument when this CPU cannot run it.
Isa isa_named(const std::string& name);

// Tensor types of a token embedding / LM head, as GGUF names them.
enum class WeightType { F32, F16, Q8_0, Q6_K };
bool weight_type_named(const std::string& name, WeightType* type);
int64_t block_elements(WeightType type);  // 1, 1, 32, 256: a row's length must be a multiple
int64_t block_bytes(WeightType type);     // 4, 2, 34, 210

// IEEE half <-> float; float_to_half rounds to nearest even, as F16C and NumPy do.
namespace detail {
inline float as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t as_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
}  // namespace detail

inline float half_to_float(uint16_t h) {
#if defined(__aarch64__)
  __fp16 f;  // one fcvt, and loops of them vectorize
  std::memcpy(&f, &h, 2);
  return float(f);
#else
  // Branch-free so that loops over it vectorize: move exponent and mantissa into place and
  // rebias 15 -> 127; infinity and NaN need the exponent at 255, and a subnormal m * 2^-24 is
  // made as 2^-14 * (1 + m/1024) - 2^-14, which is exact.
  const uint32_t em = uint32_t(h & 0x7fff) << 13, exp = em & 0x0f800000;
  const uint32_t bits = em + 0x38000000 + (exp == 0x0f800000 ? 0x38000000 : 0) + (exp == 0 ? 0x00800000 : 0);
  const float f = exp == 0 ? detail::as_float(bits) - 0x1p-14f : detail::as_float(bits);
  return detail::as_float(detail::as_bits(f) | uint32_t(h & 0x8000) << 16);
#endif
}
uint16_t float_to_half(float f);

// out[t] = x[t] * (float)(1 / sqrt(mean(x[t]^2) + eps)) * weight, the mean in double.
void rms_norm(Isa isa, const float* x, const float* weight, int64_t T, int64_t D, double eps, float* out,
              int n_threads);

// Rotates x [T, H, D] in place: pairs (i, i + D/2) (neox) or (2i, 2i + 1), angle
// positions[t] * theta^(-2i/D) in double, then cos and sin to float.
void rope(float* x, const int32_t* positions, int64_t T, int64_t H, int64_t D, double theta, bool neox,
          int n_threads);

// Copies n floats to dst as f16 (round to nearest even) or as f32.
void store_rows(Isa isa, const float* src, int64_t n, void* dst, bool f16);

struct Attention {
  const float* q;            // [T, Hq, D]
  const void* k;             // [n_ctx, Hkv, D], f16 bits or f32
  const void* v;             // same
  bool f16;
  const int32_t* positions;  // [T], each < n_ctx: query t sees cache rows 0..positions[t]
  int64_t T, Hq, Hkv, D;
  float* out;                // [T, Hq * D]
  double scale = 0;          // of q . k; 0: 1 / sqrt(D)
  int64_t window = 0;        // > 0: query t sees only rows positions[t] - window + 1 .. positions[t]
};

// Causal grouped-query attention over the cache; query head h reads KV head h / (Hq / Hkv).
// Against an f16 cache, q is rounded to f16 for q . k (as ggml computes it).
void attention(Isa isa, const Attention& a, int n_threads);

// The FFN gate: relu(g)^2, g * sigmoid(g) (SiLU), or GELU's tanh approximation
// 0.5 g (1 + tanh(u)) = g * sigmoid(2u), u = sqrt(2 / pi) (g + 0.044715 g^3).
enum class Activation { relu2, silu, gelu_tanh };
bool activation_named(const std::string& name, Activation* activation);

// out = act(gate) * up, n elements.
void gated(Isa isa, const float* gate, const float* up, int64_t n, Activation act, float* out, int n_threads);

// q = x / dx rounded to nearest (even), dx = max |x| / 32767 (0 for x = 0), returned: the
// activations of a quantized LM head.
float quantize_int16(const float* x, int64_t n, int16_t* q);

// logits [T, V] = x [T, D] times the [V, D] matrix w, stored as GGUF stores a tensor of `type`.
// F32 / F16: in float. Q8_0 / Q6_K: dx[t] * sum over 32-element chunks of (the chunk's scales)
// times (int16 x of quantize_int16) . (int8 codes), each pair of products summed exactly.
void head_matmul(Isa isa, const float* x, int64_t T, int64_t D, const uint8_t* w, int64_t V, WeightType type,
                 float* out, int n_threads);

// out [T, D] = rows ids[t] of the [V, D] matrix w, dequantized to float.
void embedding_rows(Isa isa, const uint8_t* w, int64_t D, WeightType type, const int32_t* ids, int64_t T,
                    float* out);

}  // namespace ops
}  // namespace tritlm
