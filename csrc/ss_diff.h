// 64-element difference bitmasks: bit i set iff element i of a and b differ.
#ifndef SS_DIFF_H_
#define SS_DIFF_H_

#include "ss_internal.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace ss {

template <int W>
SS_INLINE uint64_t diff_mask64(const uint8_t* a, const uint8_t* b);

#if defined(__SSE2__) && !defined(SS_BIG_ENDIAN) && !defined(SS_PORTABLE)

SS_INLINE __m128i ld(const uint8_t* p) { return _mm_loadu_si128((const __m128i*)p); }

template <>
SS_INLINE uint64_t diff_mask64<1>(const uint8_t* a, const uint8_t* b) {
  uint64_t eq = 0;
  for (int i = 0; i < 4; ++i) {
    __m128i e = _mm_cmpeq_epi8(ld(a + 16 * i), ld(b + 16 * i));
    eq |= (uint64_t)(uint32_t)_mm_movemask_epi8(e) << (16 * i);
  }
  return ~eq;
}

template <>
SS_INLINE uint64_t diff_mask64<2>(const uint8_t* a, const uint8_t* b) {
  uint64_t eq = 0;
  for (int i = 0; i < 4; ++i) {
    const uint8_t* pa = a + 32 * i;
    const uint8_t* pb = b + 32 * i;
    __m128i e0 = _mm_cmpeq_epi16(ld(pa), ld(pb));
    __m128i e1 = _mm_cmpeq_epi16(ld(pa + 16), ld(pb + 16));
    eq |= (uint64_t)(uint32_t)_mm_movemask_epi8(_mm_packs_epi16(e0, e1)) << (16 * i);
  }
  return ~eq;
}

template <>
SS_INLINE uint64_t diff_mask64<4>(const uint8_t* a, const uint8_t* b) {
  uint64_t eq = 0;
  for (int i = 0; i < 4; ++i) {
    const uint8_t* pa = a + 64 * i;
    const uint8_t* pb = b + 64 * i;
    __m128i e0 = _mm_cmpeq_epi32(ld(pa), ld(pb));
    __m128i e1 = _mm_cmpeq_epi32(ld(pa + 16), ld(pb + 16));
    __m128i e2 = _mm_cmpeq_epi32(ld(pa + 32), ld(pb + 32));
    __m128i e3 = _mm_cmpeq_epi32(ld(pa + 48), ld(pb + 48));
    __m128i p = _mm_packs_epi16(_mm_packs_epi32(e0, e1), _mm_packs_epi32(e2, e3));
    eq |= (uint64_t)(uint32_t)_mm_movemask_epi8(p) << (16 * i);
  }
  return ~eq;
}

template <>
SS_INLINE uint64_t diff_mask64<8>(const uint8_t* a, const uint8_t* b) {
  uint64_t eq = 0;
  for (int i = 0; i < 32; ++i) {
    __m128i e = _mm_cmpeq_epi32(ld(a + 16 * i), ld(b + 16 * i));
    e = _mm_and_si128(e, _mm_shuffle_epi32(e, _MM_SHUFFLE(2, 3, 0, 1)));
    eq |= (uint64_t)(uint32_t)_mm_movemask_pd(_mm_castsi128_pd(e)) << (2 * i);
  }
  return ~eq;
}

#else  // portable fallback: SWAR on 64-bit words (no SIMD intrinsics; also the path on aarch64 / big-endian)

// For x = a ^ b holding 64/(8*W) lanes, returns one bit per nonzero lane (lane 0 -> bit 0).
template <int W>
SS_INLINE uint64_t nonzero_lanes(uint64_t x);
template <>
SS_INLINE uint64_t nonzero_lanes<8>(uint64_t x) { return x != 0; }
template <>
SS_INLINE uint64_t nonzero_lanes<4>(uint64_t x) {
  const uint64_t lo = 0x7fffffff7fffffffull;
  uint64_t nz = (((x & lo) + lo) | x) & ~lo;  // top bit of each 32-bit lane: lane != 0
  return ((nz >> 31) & 1) | ((nz >> 62) & 2);
}
template <>
SS_INLINE uint64_t nonzero_lanes<2>(uint64_t x) {
  const uint64_t lo = 0x7fff7fff7fff7fffull;
  uint64_t nz = ((((x & lo) + lo) | x) & ~lo) >> 15;  // bits 0, 16, 32, 48
  return ((nz * 0x0001000200040008ull) >> 48) & 0xf;  // gathered at bits 48..51 (no carries below)
}
template <>
SS_INLINE uint64_t nonzero_lanes<1>(uint64_t x) {
  const uint64_t lo = 0x7f7f7f7f7f7f7f7full;
  uint64_t nz = ((((x & lo) + lo) | x) & ~lo) >> 7;  // bits 0, 8, ..., 56
  return (nz * 0x0102040810204080ull) >> 56;         // lane i -> bit 56+i (no carries)
}

template <int W>
SS_INLINE uint64_t diff_mask64(const uint8_t* a, const uint8_t* b) {
  constexpr int kLanes = 8 / W;  // elements per 64-bit word
  uint64_t m = 0;
  for (int i = 0; i < 8 * W; ++i) {
    uint64_t x, y;
    memcpy(&x, a + 8 * i, 8);
    memcpy(&y, b + 8 * i, 8);
#ifdef SS_BIG_ENDIAN
    // element 0 sits in the most significant bytes: reversing the bytes puts the lanes in memory order (the byte
    // order inside a lane does not matter for "lane != 0")
    x = __builtin_bswap64(x);
    y = __builtin_bswap64(y);
#endif
    m |= nonzero_lanes<W>(x ^ y) << (kLanes * i);
  }
  return m;
}

#endif

// Mask for cnt (0 < cnt <= 64) elements; reads only cnt elements.
template <int W>
SS_INLINE uint64_t diff_mask_n(const uint8_t* a, const uint8_t* b, int cnt) {
  if (cnt == 64) return diff_mask64<W>(a, b);
  uint64_t m = 0;
  for (int i = 0; i < cnt; ++i)
    if (memcmp(a + (size_t)i * W, b + (size_t)i * W, W) != 0) m |= 1ull << i;
  return m;
}

// Calls f(index) for every element index in [begin, end) where a and b differ, in increasing order.
template <int W, class F>
SS_INLINE void for_each_diff(const uint8_t* a, const uint8_t* b, int64_t begin, int64_t end, F&& f) {
  int64_t i = begin;
  for (; i + 64 <= end; i += 64) {
    uint64_t m = diff_mask64<W>(a + i * W, b + i * W);
    while (m) {
      f(i + ctz64(m));
      m &= m - 1;
    }
  }
  if (i < end) {
    uint64_t m = diff_mask_n<W>(a + i * W, b + i * W, (int)(end - i));
    while (m) {
      f(i + ctz64(m));
      m &= m - 1;
    }
  }
}

}  // namespace ss

#endif  // SS_DIFF_H_
