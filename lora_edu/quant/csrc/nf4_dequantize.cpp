// NF4 (or any 16-level table) dequantization on the CPU, the hand-written kernel behind
// lora_edu's dequantize(compiled="cpp"); the CPU's counterpart of the Triton kernel in
// lora_edu/blockwise.py. torch.utils.cpp_extension compiles it on first use, for the machine
// it runs on (-march=native on x86-64).
//
// For block b of half_block packed bytes (2 * half_block weights) with scale absmax[b]:
//     out[2j], out[2j + 1] = table[byte j] * absmax[b]       table: [256] pairs (high, low)
// Each byte is read once and each weight written once, by two threads or more (OpenMP).
// With AVX-512 the 16 levels sit in one register and one permute instruction looks up 16
// codes at a time (the way bitsandbytes' CPU kernel does it). Elsewhere, a portable loop
// copies a block's pairs, 8 bytes per packed byte, into a buffer that stays in L1, and a
// second loop scales them, which the compiler vectorises. Either way the float32 product is
// rounded once, to nearest even, exactly as torch rounds: the result equals the eager path's bits.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstring>
#include <type_traits>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

// float -> out_t, rounded to nearest even (finite inputs only: levels and scales are finite)
template <typename out_t>
static inline out_t round_to(float x) { return static_cast<out_t>(x); }

template <>
inline uint16_t round_to<uint16_t>(float x) {  // bfloat16's bits
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  bits += 0x7FFF + ((bits >> 16) & 1);  // round half to even on the 16 bits that are dropped
  return static_cast<uint16_t>(bits >> 16);
}

#if defined(__AVX512F__)
// 16 packed bytes -> 32 weights with AVX-512: the 16 levels sit in one register and a permute
// looks up 16 codes at once. Returns the products (high nibble first) as two registers.
static inline void avx512_block16(const uint8_t* p, __m512 lut, __m512 scale, __m512& first, __m512& second) {
  const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));  // 16 x int32
  const __m512 high = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), lut);  // first code of each byte
  const __m512 low = _mm512_permutexvar_ps(_mm512_and_si512(bytes, _mm512_set1_epi32(15)), lut);
  // interleave: high0 low0 high1 low1 ... (index 16 + i picks low[i])
  const __m512i lo_half = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i hi_half = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  first = _mm512_mul_ps(_mm512_permutex2var_ps(high, lo_half, low), scale);
  second = _mm512_mul_ps(_mm512_permutex2var_ps(high, hi_half, low), scale);
}

static inline void avx512_store(float* o, __m512 v) { _mm512_storeu_ps(o, v); }

static inline void avx512_store(uint16_t* o, __m512 v) {  // bfloat16, rounded to nearest even
  __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  bits = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
}

template <typename out_t>
static constexpr bool has_avx512_store() { return std::is_same<out_t, float>::value || std::is_same<out_t, uint16_t>::value; }
#endif

template <typename out_t>
static void dequant(const uint8_t* packed, const float* absmax, const float* table, out_t* out,
                    int64_t n_blocks, int64_t half_block) {
  const uint64_t* pairs = reinterpret_cast<const uint64_t*>(table);  // [256] (high, low) level pairs, 8 bytes each
  at::parallel_for(0, n_blocks, 64, [&](int64_t first, int64_t last) {
    uint64_t levels[256];  // one block's levels, two per byte, before scaling
    const float* level = reinterpret_cast<const float*>(levels);
#if defined(__AVX512F__)
    float sixteen[16];  // the table's 16 levels: the first level of the pairs (c, 0)
    for (int c = 0; c < 16; ++c) sixteen[c] = table[2 * (c << 4)];
    const __m512 lut = _mm512_loadu_ps(sixteen);
#endif
    for (int64_t start = first; start < last; ++start) {
      const uint8_t* p = packed + start * half_block;
      out_t* o = out + 2 * start * half_block;
      const float s = absmax[start];
      int64_t done = 0;
#if defined(__AVX512F__)
      if constexpr (has_avx512_store<out_t>()) {
        const __m512 scale = _mm512_set1_ps(s);
        for (; done + 16 <= half_block; done += 16) {
          __m512 a, b;
          avx512_block16(p + done, lut, scale, a, b);
          avx512_store(o + 2 * done, a);
          avx512_store(o + 2 * done + 16, b);
        }
      }
#endif
      for (; done < half_block; done += 256) {  // the portable path, 256 bytes at a time
        const int64_t n = std::min<int64_t>(256, half_block - done);
        for (int64_t j = 0; j < n; ++j) levels[j] = pairs[p[done + j]];  // one 8-byte copy per byte
        for (int64_t k = 0; k < 2 * n; ++k) o[2 * done + k] = round_to<out_t>(level[k] * s);  // vectorises
      }
    }
  });
}

torch::Tensor dequantize(torch::Tensor packed, torch::Tensor absmax, torch::Tensor table, int64_t block_size,
                         torch::ScalarType dtype) {
  auto out = torch::empty({packed.numel() * 2}, packed.options().dtype(dtype));
  const int64_t half = block_size / 2;
  if (dtype == at::kBFloat16) {
    dequant<uint16_t>(packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(), table.data_ptr<float>(),
                      reinterpret_cast<uint16_t*>(out.data_ptr()), absmax.numel(), half);
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND(at::kHalf, dtype, "nf4_dequantize", [&] {
      dequant<scalar_t>(packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(), table.data_ptr<float>(),
                        out.data_ptr<scalar_t>(), absmax.numel(), half);
    });
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("dequantize", &dequantize); }
