// Bit stream writer/reader, rANS symbol tables and Rice parameter selection (FORMAT.md 4.1, 4.3).
#ifndef SS_CODER_H_
#define SS_CODER_H_

#include "ss_internal.h"

namespace ss {

// Checks a 256-entry frequency table: entries <= 4096 and sum == 4096.
inline bool freq_table_ok(const uint32_t* freq) {
  uint64_t sum = 0;
  for (int s = 0; s < 256; ++s) {
    if (freq[s] > kProbScale) return false;
    sum += freq[s];
  }
  return sum == kProbScale;
}

// ---------------------------------------------------------------- bit writer (LSB first)
// Writes whole 64-bit words; the destination needs 8 bytes of slack past the last byte written.
struct BitWriter {
  uint8_t* p;
  uint64_t acc = 0;
  int fill = 0;  // < 8 between calls
  explicit BitWriter(uint8_t* dst) : p(dst) {}
  // v must have no bits at or above nb; nb <= 56.
  SS_INLINE void put(uint64_t v, int nb) {
    acc |= v << fill;
    fill += nb;
    store_u64(p, acc);
    int bytes = fill >> 3;
    p += bytes;
    acc = bytes ? (acc >> (bytes * 8)) : acc;
    fill &= 7;
  }
  SS_INLINE void put_long(uint64_t v, int nb) {  // nb <= 64
    if (nb > 56) {
      put(v & 0xffffffffull, 32);
      put(v >> 32, nb - 32);
    } else {
      put(v, nb);
    }
  }
  SS_INLINE void ones(uint64_t q) {
    while (q >= 56) {
      put((1ull << 56) - 1, 56);
      q -= 56;
    }
    if (q) put((1ull << q) - 1, (int)q);
  }
  SS_INLINE void rice(uint64_t g, int k) {
    uint64_t q = g >> k;
    uint64_t low = g & low_mask(k);
    if (q + 1 + (uint64_t)k <= 56) {
      put(((1ull << q) - 1) | (low << (q + 1)), (int)(q + 1 + k));
    } else {
      ones(q);
      put(low << 1, 1 + k);
    }
  }
};

// ---------------------------------------------------------------- bit reader (LSB first)
// Reads beyond the end of the stream return zero bits; the caller checks pos() <= nbits() afterwards.
struct BitReader {
  const uint8_t* buf;
  uint64_t nbytes;
  uint64_t bitpos = 0;
  BitReader(const uint8_t* b, uint64_t n) : buf(b), nbytes(n) {}
  // Returns the next >= 57 bits (bit 0 = next stream bit), zero past the end.
  SS_INLINE uint64_t peek() const {
    uint64_t byte = bitpos >> 3;
    uint64_t w;
    if (SS_LIKELY(byte + 8 <= nbytes)) {
      w = load_u64(buf + byte);
    } else {
      w = 0;
      for (uint64_t j = 0; j < 8 && byte + j < nbytes; ++j) w |= (uint64_t)buf[byte + j] << (8 * j);
    }
    return w >> (bitpos & 7);
  }
  SS_INLINE void skip(uint64_t nb) { bitpos += nb; }
  SS_INLINE uint64_t get(int nb) {  // nb <= 56
    if (nb == 0) return 0;
    uint64_t v = peek() & low_mask(nb);
    bitpos += (uint64_t)nb;
    return v;
  }
  SS_INLINE uint64_t get_long(int nb) {  // nb <= 64
    if (nb > 56) {
      uint64_t lo = get(32);
      return lo | (get(nb - 32) << 32);
    }
    return get(nb);
  }
  SS_INLINE bool overrun() const { return bitpos > nbytes * 8; }
};

// ---------------------------------------------------------------- rANS encoder symbols
// Division-free encoding (F. Giesen, rans_byte.h; exact for x < 2^31, which always holds here).
struct RansEncSym {
  uint32_t x_max;  // 0: symbol absent
  uint32_t rcp_freq;
  uint32_t bias;
  uint32_t cmpl_freq;
  uint32_t rcp_shift;
};

inline void rans_enc_init(RansEncSym* t, const uint32_t* freq) {
  uint32_t cum = 0;
  for (int s = 0; s < 256; ++s) {
    uint32_t f = freq[s];
    RansEncSym& e = t[s];
    if (f == 0) {
      e.x_max = 0;
      e.rcp_freq = 0;
      e.bias = 0;
      e.cmpl_freq = 0;
      e.rcp_shift = 0;
      continue;
    }
    e.x_max = ((kRansL >> kProbBits) << 8) * f;
    e.cmpl_freq = kProbScale - f;
    if (f < 2) {
      e.rcp_freq = ~0u;
      e.rcp_shift = 0;
      e.bias = cum + kProbScale - 1;
    } else {
      uint32_t shift = 0;
      while (f > (1u << shift)) shift++;
      e.rcp_freq = (uint32_t)(((1ull << (shift + 31)) + f - 1) / f);
      e.rcp_shift = shift - 1;
      e.bias = cum;
    }
    cum += f;
  }
}

// Encodes one symbol; emitted bytes are written downwards from *pp.
SS_INLINE uint32_t rans_enc_put(uint32_t x, uint8_t** pp, const RansEncSym& e) {
  if (x >= e.x_max) {
    uint8_t* p = *pp;
    do {
      *--p = (uint8_t)(x & 0xff);
      x >>= 8;
    } while (x >= e.x_max);
    *pp = p;
  }
  uint32_t q = (uint32_t)(((uint64_t)x * e.rcp_freq) >> 32) >> e.rcp_shift;
  return x + e.bias + q * e.cmpl_freq;
}

// ---------------------------------------------------------------- Rice parameter (FORMAT.md 4.1)
// Smallest k in [0, log2c] minimising n*(k+1) + sum(g >> k). The cost is convex in k:
// cost(k+1) - cost(k) = n - sum(ceil((g >> k) / 2)) is non-decreasing, so the answer is the first k whose
// forward difference is >= 0 (or log2c).
inline uint64_t rice_delta_sum(const uint32_t* g, int64_t n, int k) {
  uint64_t s = 0;
  for (int64_t i = 0; i < n; ++i) s += ((g[i] >> k) + 1) >> 1;
  return s;
}
inline int choose_k(const uint32_t* g, int64_t n, int log2c, uint64_t sum_g) {
  if (n <= 0) return 0;
  auto nonneg = [&](int k) { return (uint64_t)n >= rice_delta_sum(g, n, k); };  // diff(k) >= 0
  int k = bit_length64(sum_g / (uint64_t)n);
  k = k > 0 ? k - 1 : 0;
  if (k > log2c - 1) k = log2c - 1;
  if (nonneg(k)) {
    while (k > 0 && nonneg(k - 1)) --k;
    return k;
  }
  ++k;
  while (k < log2c && !nonneg(k)) ++k;
  return k;
}

}  // namespace ss

#endif  // SS_CODER_H_
