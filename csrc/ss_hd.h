// Per-chunk coders of wire format 2 (FORMAT.md §1, §3, §4, §6) as ONE scalar source for host and device.
//
// Everything here is `SS_HD` (__host__ __device__ under nvcc, plain inline C++ otherwise): no STL, no exceptions, no
// SIMD intrinsics, no memcpy, no heap. Loads and stores of multi-byte values go byte by byte (little-endian, any
// alignment). Every read and write is bounds-checked against the lengths the caller passes; a malformed chunk is
// refused with an SS_E* code (sparsesync.h) and never makes the code touch memory outside the given buffers.
//
// The CPU entry points (csrc/chunk_hd.cpp: ss2_hd_encode / ss2_hd_decode) run these coders over every chunk of a
// segment and are tested byte for byte against the optimized CPU kernels (csrc/format2.cpp); the CUDA translation unit
// (csrc/chunk_hd_device.cu) runs the very same functions, one thread per chunk.
//
// ------------------------------------------------------------------------------------------------------------------
// Encoding a sparse segment [start, end) with chunks of C = 2^log2c elements (FORMAT.md §6.4) in three steps:
//
//   1. encode_prepare (one call per chunk, independent): inputs in memory
//        - the base ("old") and new values of the space, through an element accessor (Pieces or Contig below;
//          old is read at the positions, and over the whole chunk when the segment has cuts: the classes of the
//          unchanged elements give the class ranks), new only at the positions;
//        - the chunk's changed positions (space indices, strictly increasing, inside the chunk), n of them;
//        - an EncParams (width, mode, classes, the K x 256 frequency tables).
//      outputs: n Rec records (class, symbol, extra bits, the gap coded after the change), the chunk's first gap of
//      every class (K entries; for a class without change in the chunk: its element count, its only gap) and the
//      mask of classes with a change. The caller gives n Rec of memory (e.g. at the chunk's offset in an array of all
//      changes of the segment) and K u32.
//   2. segment-wide: present = OR of the chunk masks; each present class's Rice parameter from its gap statistics
//      (gap_stats_add over, for every chunk with n > 0, first[c] of every class and each Rec's `after` for its class;
//      then choose_k). This is a reduction over chunks (host loop, or atomics on a device).
//   3. encode_write (one call per chunk with n > 0, independent): Recs + first gaps + present + ks + tables ->
//      rans_len, bits_len and (when dst is not NULL) the chunk's rans stream followed by its bit stream, exactly as
//      ss2_encode writes them. With dst NULL it only sizes (so a device caller can prefix-sum the offsets, allocate
//      and call it again to write); with dst it needs cap >= rans_len + bits_len, else SS_ECOUNT.
//      The chunk table entry is varint n, varint rans_len, varint bits_len (table_entry_put).
//
// Decoding: parse_table (serial, one pass: each chunk's n and stream offsets), then decode_chunk per chunk with
// n > 0 (independent): the chunk's rans and bit streams + the base values of the chunk's range (read through an
// accessor: every element when the segment has cuts, only the changed ones in delta mode without cuts, none in raw
// mode without cuts) -> the changed positions and the new values (or differences, mode 2), n of each.
// ------------------------------------------------------------------------------------------------------------------
#ifndef SS_HD_H_
#define SS_HD_H_

#include <stdint.h>

#include "sparsesync.h"

#if defined(__CUDACC__)
#define SS_HD __host__ __device__
#define SS_HD_INLINE __host__ __device__ __forceinline__
#else
#define SS_HD
#define SS_HD_INLINE inline
#endif

namespace sshd {

// The piece of a space holding element i: the largest t in [lo, hi) with offs[t] <= i, where offs[lo] <= i <
// offs[hi] (empty pieces are skipped). One binary search for the CPU and the GPU kernels.
SS_HD_INLINE int64_t locate_piece(const int64_t* offs, int64_t lo, int64_t hi, int64_t i) {
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (offs[mid] <= i)
      lo = mid;
    else
      hi = mid;
  }
  return lo;
}

// constants as enumerators / literals (usable in device code without relaxed-constexpr)
enum : uint32_t { kProbBits = 12, kProbScale = 4096, kRansL = 1u << 23, kMaxClasses = 32 };
enum : uint64_t { kLeafBytes = 4096 };
#define SSHD_K0 0x9E3779B97F4A7C15ull
#define SSHD_K1 0xBF58476D1CE4E5B9ull
#define SSHD_K2 0x94D049BB133111EBull
#define SSHD_K3 0xD6E8FEB86659FD93ull
#define SSHD_TREE_SEED 0x5353594E43ull

// ---------------------------------------------------------------- small helpers
SS_HD_INLINE uint64_t low_mask(int nb) { return nb >= 64 ? ~0ull : ((1ull << nb) - 1); }

SS_HD_INLINE int ctz32(uint32_t x) {  // x != 0
#if defined(__CUDA_ARCH__)
  return __ffs((int)x) - 1;
#else
  return __builtin_ctz(x);
#endif
}

SS_HD_INLINE int bit_length64(uint64_t x) {
#if defined(__CUDA_ARCH__)
  return 64 - __clzll((long long)x);
#else
  return x ? 64 - __builtin_clzll(x) : 0;
#endif
}

// little-endian loads / stores of nb <= 8 bytes, byte by byte (any alignment, either host byte order)
SS_HD_INLINE uint64_t load_le(const uint8_t* p, int nb) {
  uint64_t v = 0;
  for (int i = 0; i < nb; ++i) v |= (uint64_t)p[i] << (8 * i);
  return v;
}
SS_HD_INLINE void store_le(uint8_t* p, uint64_t v, int nb) {
  for (int i = 0; i < nb; ++i) p[i] = (uint8_t)(v >> (8 * i));
}

// ---------------------------------------------------------------- h64 / tree64 (FORMAT.md 1.1, 1.2)
SS_HD_INLINE uint64_t rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
SS_HD_INLINE uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= SSHD_K1;
  x ^= x >> 27;
  x *= SSHD_K2;
  x ^= x >> 31;
  return x;
}
SS_HD_INLINE uint64_t round64(uint64_t a, uint64_t w) { return rotl64(a + w * SSHD_K3, 27) * SSHD_K1; }

SS_HD_INLINE uint64_t h64_final(const uint64_t* a, uint64_t len, uint64_t seed) {
  uint64_t h = seed ^ (len * SSHD_K0);
  for (int j = 0; j < 4; ++j) h = mix64(h ^ a[j]);
  return h;
}

// h64 of the len bytes at data (data may be NULL when len == 0).
SS_HD inline uint64_t h64(const uint8_t* data, uint64_t len, uint64_t seed) {
  uint64_t a[4];
  for (int j = 0; j < 4; ++j) a[j] = seed + (uint64_t)(j + 1) * SSHD_K0;
  const uint64_t nfull = len / 32;
  for (uint64_t i = 0; i < nfull; ++i)
    for (int j = 0; j < 4; ++j) a[j] = round64(a[j], load_le(data + 32 * i + 8 * j, 8));
  const uint64_t off = nfull * 32;
  if (off < len) {  // the zero-padded tail
    for (int j = 0; j < 4; ++j) {
      uint64_t wv = 0;
      for (int b = 0; b < 8; ++b) {
        const uint64_t at = off + 8 * (uint64_t)j + (uint64_t)b;
        if (at < len) wv |= (uint64_t)data[at] << (8 * b);
      }
      a[j] = round64(a[j], wv);
    }
  }
  return h64_final(a, len, seed);
}

// h64 of nw u64 words taken as their little-endian bytes (8*nw bytes), without a byte copy.
SS_HD inline uint64_t h64_words(const uint64_t* words, uint64_t nw, uint64_t seed) {
  uint64_t a[4];
  for (int j = 0; j < 4; ++j) a[j] = seed + (uint64_t)(j + 1) * SSHD_K0;
  for (uint64_t i = 0; i < nw; i += 4)
    for (uint64_t j = 0; j < 4; ++j) a[j] = round64(a[j], i + j < nw ? words[i + j] : 0);
  return h64_final(a, nw * 8, seed);
}

SS_HD_INLINE uint64_t tree64_nleaves(uint64_t len) { return len == 0 ? 1 : (len + kLeafBytes - 1) / kLeafBytes; }

// Leaf i (< tree64_nleaves(len)) of tree64 over the len bytes at data: h64(leaf bytes, seed = i).
SS_HD inline uint64_t tree64_leaf(const uint8_t* data, uint64_t len, uint64_t i) {
  const uint64_t off = i * kLeafBytes;
  if (off >= len) return h64(data, 0, i);  // only the single empty leaf of len == 0
  const uint64_t rem = len - off;
  return h64(data + off, rem < kLeafBytes ? rem : kLeafBytes, i);
}

// The top level: h64 over the leaf hashes (u64 LE array) with seed len ^ "SSYNC".
SS_HD_INLINE uint64_t tree64_top(const uint64_t* leaves, uint64_t nleaves, uint64_t len) {
  return h64_words(leaves, nleaves, len ^ SSHD_TREE_SEED);
}

// ---------------------------------------------------------------- varints (FORMAT.md 3)
SS_HD_INLINE int varint_size(uint64_t v) {
  int n = 1;
  while (v >= 0x80) {
    v >>= 7;
    ++n;
  }
  return n;
}
// Writes v at dst[*pos] (cap bytes); false (nothing past cap written) when it does not fit.
SS_HD_INLINE bool varint_put(uint8_t* dst, uint64_t cap, uint64_t* pos, uint64_t v) {
  uint64_t p = *pos;
  if ((uint64_t)varint_size(v) > cap || p > cap - (uint64_t)varint_size(v)) return false;
  while (v >= 0x80) {
    dst[p++] = (uint8_t)(v | 0x80);
    v >>= 7;
  }
  dst[p++] = (uint8_t)v;
  *pos = p;
  return true;
}
// Reads a canonical varint (< 2^63, no redundant zero group) from buf[*pos .. len).
SS_HD_INLINE bool varint_get(const uint8_t* buf, uint64_t len, uint64_t* pos, uint64_t* out) {
  uint64_t v = 0, p = *pos;
  for (int i = 0; i < 10; ++i) {
    if (p >= len) return false;
    const uint8_t b = buf[p++];
    const uint64_t part = (uint64_t)(b & 0x7f);
    if (i == 9 && part > 0) return false;
    v |= part << (7 * i);
    if (!(b & 0x80)) {
      if (b == 0 && i > 0) return false;
      *pos = p;
      *out = v;
      return true;
    }
  }
  return false;
}

// ---------------------------------------------------------------- bit writer (LSB first, FORMAT.md 4.1)
// dst NULL: counts only. Otherwise bytes beyond cap are not written and `ok` turns false.
struct BitWriter {
  uint8_t* dst;
  uint64_t cap;
  uint64_t nbytes;  // whole bytes emitted
  uint64_t acc;     // < 2^fill
  int fill;         // < 8 between calls
  bool ok;
  SS_HD_INLINE void init(uint8_t* d, uint64_t c) {
    dst = d;
    cap = c;
    nbytes = 0;
    acc = 0;
    fill = 0;
    ok = true;
  }
  SS_HD_INLINE void emit(uint8_t b) {
    if (dst) {
      if (nbytes < cap)
        dst[nbytes] = b;
      else
        ok = false;
    }
    ++nbytes;
  }
  // v < 2^nb, nb <= 32
  SS_HD_INLINE void put(uint64_t v, int nb) {
    acc |= v << fill;
    fill += nb;
    while (fill >= 8) {
      emit((uint8_t)acc);
      acc >>= 8;
      fill -= 8;
    }
  }
  SS_HD_INLINE void put_long(uint64_t v, int nb) {  // nb <= 64, v < 2^nb
    if (nb > 32) {
      put(v & 0xffffffffull, 32);
      put(v >> 32, nb - 32);
    } else {
      put(v, nb);
    }
  }
  SS_HD_INLINE void ones(uint64_t q) {
    while (q >= 32) {
      put(0xffffffffull, 32);
      q -= 32;
    }
    if (q) put((1ull << q) - 1, (int)q);
  }
  // Rice code of g with parameter k (<= 30): g >> k one-bits, a zero-bit, the low k bits of g.
  SS_HD_INLINE void rice(uint64_t g, int k) {
    ones(g >> k);
    put(0, 1);
    put_long(g & low_mask(k), k);
  }
  // Pads the last byte with zero bits; returns the stream length in bytes.
  SS_HD_INLINE uint64_t finish() {
    if (fill) {
      emit((uint8_t)acc);
      acc = 0;
      fill = 0;
    }
    return nbytes;
  }
};

// ---------------------------------------------------------------- bit reader (LSB first)
struct BitReader {
  const uint8_t* buf;
  uint64_t total;  // bits
  uint64_t pos;    // next bit
  SS_HD_INLINE void init(const uint8_t* b, uint64_t nbytes) {
    buf = b;
    total = nbytes * 8;
    pos = 0;
  }
  // nb <= 64 bits; false (nothing consumed) when fewer than nb bits are left
  SS_HD_INLINE bool get(int nb, uint64_t* out) {
    if ((uint64_t)nb > total - pos) return false;
    uint64_t v = 0;
    int got = 0;
    while (got < nb) {
      const int sh = (int)(pos & 7);
      int take = 8 - sh;
      if (take > nb - got) take = nb - got;
      const uint64_t b = (uint64_t)(buf[pos >> 3] >> sh) & low_mask(take);
      v |= b << got;
      got += take;
      pos += (uint64_t)take;
    }
    *out = v;
    return true;
  }
  // One Rice-coded gap with parameter k: a unary part above `limit` is SS_EPOS (the gap runs past its chunk), a read
  // past the stream SS_ESTREAM (same codes as csrc/format2.cpp).
  SS_HD_INLINE int gap(int k, uint64_t limit, uint64_t* g) {
    uint64_t q = 0;
    for (;;) {
      if (pos >= total) return SS_ESTREAM;
      const int sh = (int)(pos & 7);
      const int avail = 8 - sh;
      const uint32_t b = (uint32_t)(buf[pos >> 3] >> sh);  // avail valid bits, zeros above
      const int run = ctz32(~b);                           // <= avail (bit avail of ~b is set)
      if (run >= avail) {
        q += (uint64_t)avail;
        pos += (uint64_t)avail;
        if (q > limit) return SS_EPOS;
        continue;
      }
      q += (uint64_t)run;
      if (q > limit) return SS_EPOS;
      pos += (uint64_t)run + 1;
      break;
    }
    uint64_t low;
    if (!get(k, &low)) return SS_ESTREAM;
    *g = (q << k) | low;
    return SS_OK;
  }
  // The stream is consumed exactly: fewer than 8 bits left and those are zero.
  SS_HD_INLINE bool exact() const {
    if (total - pos >= 8) return false;
    if (pos < total && (buf[(total >> 3) - 1] >> (pos & 7)) != 0) return false;
    return true;
  }
};

// ---------------------------------------------------------------- rANS (FORMAT.md 4.3)
// Frequency tables: freq[256] (sum 4096) and cum[256] (cum[s] = sum of freq below s).
SS_HD_INLINE void build_cum(const uint32_t* freq, uint32_t* cum) {
  uint32_t c = 0;
  for (int s = 0; s < 256; ++s) {
    cum[s] = c;
    c += freq[s];
  }
}
// Entries <= 4096, sum 4096, nothing above maxsym.
SS_HD_INLINE bool freq_ok(const uint32_t* freq, int maxsym) {
  uint64_t sum = 0;
  for (int s = 0; s < 256; ++s) {
    if (freq[s] > kProbScale) return false;
    if (s > maxsym && freq[s]) return false;
    sum += freq[s];
  }
  return sum == kProbScale;
}

// Encoder: one symbol (coded backwards). Emitted bytes go to *E, in emission order (the stream holds them reversed).
struct RansEnc {
  uint32_t x;
  uint8_t* out;  // NULL: count only
  uint64_t cap;  // bytes available at out
  uint64_t nemit;
  bool ok;
  SS_HD_INLINE void init(uint8_t* o, uint64_t c) {
    x = kRansL;
    out = o;
    cap = c;
    nemit = 0;
    ok = true;
  }
  SS_HD_INLINE void put(uint32_t f, uint32_t c) {  // f >= 1
    const uint32_t x_max = ((kRansL >> kProbBits) << 8) * f;
    while (x >= x_max) {
      if (out) {
        if (nemit < cap)
          out[nemit] = (uint8_t)x;
        else
          ok = false;
      }
      ++nemit;
      x >>= 8;
    }
    x = ((x / f) << kProbBits) + (x % f) + c;
  }
};

// Decoder state over one chunk's rans stream.
struct RansDec {
  uint32_t x;
  const uint8_t* p;
  uint64_t rp, rl;
  SS_HD_INLINE bool init(const uint8_t* s, uint64_t len) {
    if (len < 4) return false;
    p = s;
    rl = len;
    x = (uint32_t)load_le(s, 4);
    rp = 4;
    return true;
  }
  // The symbol of slot x & 4095: the largest s with cum[s] <= slot (valid tables: its freq is > 0).
  SS_HD_INLINE int step(const uint32_t* freq, const uint32_t* cum, int* sym) {
    const uint32_t slot = x & (kProbScale - 1);
    int lo = 0, hi = 256;  // cum[lo] <= slot < cum[hi] (cum[256] = 4096)
    while (hi - lo > 1) {
      const int mid = (lo + hi) >> 1;
      if (cum[mid] <= slot)
        lo = mid;
      else
        hi = mid;
    }
    x = freq[lo] * (x >> kProbBits) + slot - cum[lo];
    while (x < kRansL) {
      if (rp >= rl) return SS_ESTREAM;
      x = (x << 8) | p[rp++];
    }
    *sym = lo;
    return SS_OK;
  }
  SS_HD_INLINE bool done() const { return x == kRansL && rp == rl; }
};

// ---------------------------------------------------------------- value symbols (FORMAT.md 4.2)
// mode 0 / 2: delta, mode 1: raw. Bit patterns are the low 8w bits of u64.
SS_HD_INLINE int value_symbol(int w, int mode, uint64_t oldv, uint64_t newv, uint64_t* extra, int* nextra) {
  const int B = 8 * w;
  const uint64_t mask = low_mask(B);
  if (mode == 1) {
    *extra = newv & low_mask(B - 8);
    *nextra = B - 8;
    return (int)((newv & mask) >> (B - 8));
  }
  const uint64_t d = (newv - oldv) & mask;
  const uint64_t neg = (d >> (B - 1)) & 1;
  const uint64_t m = neg ? ((0 - d) & mask) : d;
  if (m <= 8) {
    *extra = 0;
    *nextra = 0;
    return (int)(2 * (m - 1) + neg);
  }
  const int nb = bit_length64(m);
  *extra = neg | ((m & low_mask(nb - 1)) << 1);
  *nextra = nb;
  return 16 + nb - 4;
}
SS_HD_INLINE int value_nextra(int w, int mode, int sym) { return mode == 1 ? 8 * w - 8 : (sym < 16 ? 0 : sym - 12); }
// The new bit pattern (modes 0, 1) or the difference (mode 2).
SS_HD_INLINE uint64_t value_decode(int w, int mode, int sym, uint64_t extra, uint64_t oldv) {
  const int B = 8 * w;
  const uint64_t mask = low_mask(B);
  if (mode == 1) return (((uint64_t)sym << (B - 8)) | extra) & mask;
  uint64_t m, neg;
  if (sym < 16) {
    m = (uint64_t)(sym >> 1) + 1;
    neg = (uint64_t)(sym & 1);
  } else {
    const int nb = sym - 12;
    neg = extra & 1;
    m = (1ull << (nb - 1)) | (extra >> 1);
  }
  const uint64_t d = (neg ? 0 - m : m) & mask;
  return mode == 0 ? (oldv + d) & mask : d;
}
SS_HD_INLINE int max_symbol(int w, int mode) {
  const int m = 16 + 8 * w - 4;
  return mode == 1 ? 255 : (m < 255 ? m : 255);
}

// ---------------------------------------------------------------- classes (FORMAT.md 6.3)
struct Classes {
  int K, kb, shift;
  uint8_t lut[256];  // key -> class
  SS_HD_INLINE int of(uint64_t x) const { return kb ? lut[(x >> shift) & low_mask(kb)] : 0; }
};
// Checks kb, the cut count and the cuts (strictly increasing in [1, 2^kb)); fills cl.
SS_HD inline bool classes_init(Classes& cl, int w, int kb, const int64_t* cuts, int ncuts) {
  if (kb < 0 || kb > 8 || kb > 8 * w - 1 || ncuts < 0 || ncuts + 1 > (int)kMaxClasses) return false;
  if (kb == 0 && ncuts != 0) return false;
  if (ncuts > 0 && !cuts) return false;
  int64_t prev = 0;
  for (int j = 0; j < ncuts; ++j) {
    if (cuts[j] <= prev || cuts[j] >= ((int64_t)1 << kb)) return false;
    prev = cuts[j];
  }
  cl.K = ncuts + 1;
  cl.kb = kb;
  cl.shift = kb ? 8 * w - 1 - kb : 0;
  for (int key = 0; key < 256; ++key) {
    int c = 0;
    while (c < ncuts && cuts[c] <= key) ++c;
    cl.lut[key] = (uint8_t)c;
  }
  return true;
}

// ---------------------------------------------------------------- element accessors
// A space as pieces (FORMAT.md 6.1, csrc/format2.cpp): piece t holds elements [offs[t], offs[t+1]) at address
// ptrs[t]. operator()(i) = the bit pattern of element i (0 <= i < offs[np], the caller's range checks guarantee it).
// Keeps a cursor (one binary search when i leaves the current piece): give every thread its own copy.
struct Pieces {
  const uint64_t* ptrs;
  const int64_t* offs;
  int64_t np;
  int w;
  mutable int64_t t;
  SS_HD_INLINE void init(const uint64_t* p, const int64_t* o, int64_t n, int width) {
    ptrs = p;
    offs = o;
    np = n;
    w = width;
    t = 0;
  }
  SS_HD_INLINE int64_t locate(int64_t i) const { return locate_piece(offs, 0, np, i); }
  SS_HD_INLINE uint8_t* addr(int64_t i) const {
    if (!(i >= offs[t] && i < offs[t + 1])) {
      if (t + 2 <= np && i >= offs[t + 1] && i < offs[t + 2])
        ++t;
      else
        t = locate(i);
    }
    return (uint8_t*)(uintptr_t)ptrs[t] + (i - offs[t]) * w;
  }
  SS_HD_INLINE uint64_t operator()(int64_t i) const { return load_le(addr(i), w); }
};

// One contiguous array holding elements [0, n) at base (e.g. a flat device buffer of the space).
struct Contig {
  const uint8_t* base;
  int w;
  SS_HD_INLINE uint64_t operator()(int64_t i) const { return load_le(base + i * w, w); }
};

// ---------------------------------------------------------------- encoder
struct EncParams {
  int w, mode;              // mode 0 delta, 1 raw
  Classes cl;               // K = cl.K
  const uint32_t* freqs;    // K x 256 (class c at freqs + 256 c): only a changed element's (class, symbol) is looked up
  const uint32_t* cums;     // K x 256 cumulative (build_cum), needed by encode_write only
};

// One changed element of a chunk (position order).
struct Rec {
  uint64_t extra;  // extra bits (FORMAT.md 4.2), nextra of them
  uint32_t after;  // the gap coded after it: the next gap of its class, or the class's final gap
  uint8_t cls, sym, nextra, pad;
};

// Step 1 for one chunk [cs, cs + clen) with the changed positions pos[0..n) (space indices). Writes rec[0..n),
// first[0..K) and *mask (bit c: class c has a change in the chunk). Returns SS_OK, SS_EARG (positions not strictly
// increasing or outside the chunk), SS_ECOUNT (old == new at a position) or SS_ERANS (a symbol without frequency in
// its class's table): the first of these in position order, as ss2_encode.
template <class OldSrc, class NewSrc>
SS_HD int encode_prepare(const EncParams& P, const OldSrc& old, const NewSrc& neu, int64_t cs, int64_t clen,
                         const int64_t* pos, int64_t n, Rec* rec, uint32_t* first, uint32_t* mask) {
  const int K = P.cl.K;
  *mask = 0;
  for (int64_t i = 0; i < n; ++i)
    if (pos[i] < cs || pos[i] >= cs + clen || (i > 0 && pos[i] <= pos[i - 1])) return SS_EARG;
  int64_t lastq[kMaxClasses];   // index of the class's last change so far, -1
  uint64_t lastr[kMaxClasses];  // its rank
  uint64_t cnt[kMaxClasses];    // class elements seen so far
  for (int c = 0; c < K; ++c) {
    lastq[c] = -1;
    lastr[c] = 0;
    cnt[c] = 0;
  }
  uint32_t m = 0;
  // records one change q of class c with rank r among the chunk's class-c elements
  auto change = [&](int64_t q, int c, uint64_t r) -> int {
    const uint64_t ov = old(pos[q]), nv = neu(pos[q]);
    if (ov == nv) return SS_ECOUNT;
    uint64_t extra;
    int ne;
    const int sym = value_symbol(P.w, P.mode, ov, nv, &extra, &ne);
    if (P.freqs[(uint64_t)c * 256 + (uint64_t)sym] == 0) return SS_ERANS;
    const uint64_t gap = lastq[c] < 0 ? r : r - lastr[c] - 1;
    if (lastq[c] < 0)
      first[c] = (uint32_t)gap;
    else
      rec[lastq[c]].after = (uint32_t)gap;
    lastq[c] = q;
    lastr[c] = r;
    Rec& e = rec[q];
    e.extra = extra;
    e.after = 0;
    e.cls = (uint8_t)c;
    e.sym = (uint8_t)sym;
    e.nextra = (uint8_t)ne;
    e.pad = 0;
    m |= 1u << c;
    return SS_OK;
  };
  if (K == 1) {
    for (int64_t q = 0; q < n; ++q) {
      const int rc = change(q, 0, (uint64_t)(pos[q] - cs));
      if (rc) return rc;
    }
    cnt[0] = (uint64_t)clen;
  } else {
    // ranks need the class of every element before a change: walk the whole chunk
    int64_t q = 0;
    for (int64_t e = 0; e < clen; ++e) {
      const int c = P.cl.of(old(cs + e));
      if (q < n && pos[q] == cs + e) {
        const int rc = change(q, c, cnt[c]);
        if (rc) return rc;
        ++q;
      }
      ++cnt[c];
    }
  }
  for (int c = 0; c < K; ++c) {
    if (lastq[c] < 0)
      first[c] = (uint32_t)cnt[c];  // no change: the class's only gap is all of its elements
    else
      rec[lastq[c]].after = (uint32_t)(cnt[c] - lastr[c] - 1);
  }
  *mask = m;
  return SS_OK;
}

// Step 2: the Rice rule (FORMAT.md 6.4). bits[j] counts the class's gaps with bit j set, ngaps all its gaps.
SS_HD_INLINE void gap_stats_add(uint64_t* bits, uint64_t* ngaps, uint64_t g) {
  ++*ngaps;
  for (int j = 0; g; ++j, g >>= 1) bits[j] += g & 1;
}
// Smallest k in [0, log2c] minimising sum(g >> k) + ngaps (k + 1), with sum(g >> k) = sum_j>=k bits[j] 2^(j - k).
SS_HD_INLINE int choose_k(const uint64_t* bits, uint64_t ngaps, int log2c) {
  uint64_t best = 0;
  int bk = 0;
  for (int k = 0; k <= log2c; ++k) {
    uint64_t sum = 0;
    for (int j = k; j < 64; ++j) sum += bits[j] << (j - k);
    const uint64_t v = sum + ngaps * (uint64_t)(k + 1);
    if (k == 0 || v < best) {
      best = v;
      bk = k;
    }
  }
  return bk;
}

// Step 3 for one chunk with n >= 1 changes: ks[c] is class c's Rice parameter (present classes: bit c of present).
// dst NULL: sizes only. Otherwise writes rans stream then bit stream at dst (cap bytes); SS_ECOUNT if they do not
// fit (sizes still reported). Recs must come from encode_prepare with the same tables.
SS_HD inline int encode_write(const EncParams& P, const Rec* rec, int64_t n, const uint32_t* first, uint32_t present,
                              const int* ks, uint8_t* dst, uint64_t cap, uint64_t* rans_len, uint64_t* bits_len) {
  const int K = P.cl.K;
  // rANS, backwards; emitted bytes at dst + 4 in emission order, reversed below
  RansEnc re;
  re.init(dst ? dst + (cap >= 4 ? 4 : cap) : nullptr, cap >= 4 ? cap - 4 : 0);
  for (int64_t i = n - 1; i >= 0; --i) {
    const uint64_t t = (uint64_t)rec[i].cls * 256 + rec[i].sym;
    re.put(P.freqs[t], P.cums[t]);
  }
  const uint64_t rl = 4 + re.nemit;
  bool ok = re.ok && (dst == nullptr || cap >= 4);
  if (dst && ok) {
    store_le(dst, re.x, 4);
    for (uint64_t a = 4, b = rl - 1; a < b; ++a, --b) {
      const uint8_t tmp = dst[a];
      dst[a] = dst[b];
      dst[b] = tmp;
    }
  }
  // bits, forwards: every present class's first gap, then per change its extra bits and the gap after it
  BitWriter bw;
  bw.init(dst && ok ? dst + rl : nullptr, dst && ok ? cap - rl : 0);
  for (int c = 0; c < K; ++c)
    if (present >> c & 1) bw.rice(first[c], ks[c]);
  for (int64_t i = 0; i < n; ++i) {
    const Rec& r = rec[i];
    if (r.nextra) bw.put_long(r.extra, r.nextra);
    bw.rice(r.after, ks[r.cls]);
  }
  const uint64_t bl = bw.finish();
  *rans_len = rl;
  *bits_len = bl;
  if (dst && !(ok && bw.ok)) return SS_ECOUNT;
  return SS_OK;
}

// Chunk table entry (FORMAT.md 6.4): varint n, and if n > 0 varint rans_len, varint bits_len.
SS_HD_INLINE uint64_t table_entry_size(uint64_t n, uint64_t rl, uint64_t bl) {
  return (uint64_t)varint_size(n) + (n ? (uint64_t)varint_size(rl) + (uint64_t)varint_size(bl) : 0);
}
SS_HD_INLINE bool table_entry_put(uint8_t* dst, uint64_t cap, uint64_t* pos, uint64_t n, uint64_t rl, uint64_t bl) {
  if (!varint_put(dst, cap, pos, n)) return false;
  if (n && (!varint_put(dst, cap, pos, rl) || !varint_put(dst, cap, pos, bl))) return false;
  return true;
}

// ---------------------------------------------------------------- decoder
struct DecParams {
  int w, mode;            // mode 0 delta (new values out), 1 raw, 2 delta (differences out)
  int log2c;
  Classes cl;
  int ks[kMaxClasses];    // Rice parameter of each class, -1 = absent
  const uint32_t* freqs;  // K x 256, validated (check_classes)
  const uint32_t* cums;   // K x 256 (build_cum)
};

// Checks the classes' Rice parameters and tables (FORMAT.md 6.5): k <= log2c (SS_ETABLE), valid tables without
// symbols above the mode's largest (SS_ERANS), at least one present class (SS_ETABLE). Same order as ss2_decode.
SS_HD inline int check_classes(const DecParams& P) {
  int npres = 0;
  const int maxsym = max_symbol(P.w, P.mode);
  for (int c = 0; c < P.cl.K; ++c) {
    if (P.ks[c] < 0) continue;
    if (P.ks[c] > P.log2c) return SS_ETABLE;
    if (!freq_ok(P.freqs + (uint64_t)c * 256, maxsym)) return SS_ERANS;
    ++npres;
  }
  return npres ? SS_OK : SS_ETABLE;
}

struct ChunkEntry {
  int64_t j;         // chunk index in the segment
  int64_t n;         // changed elements (>= 1)
  uint64_t data_off; // offset of its rans stream in the segment bytes; the bit stream follows at data_off + rl
  uint64_t rl, bl;
  int64_t out_off;   // index of its first change in the outputs
};

// Parses the chunk table of a segment (seg_len bytes, table first): the chunks with n > 0 into out (room for nch
// entries; *nout of them written). Checks as ss2_decode: SS_ETABLE (varints, n > chunk length, streams past the end,
// table or streams not filling their bytes exactly), SS_ECOUNT (sum of n != nchanged or nchanged < 1).
SS_HD inline int parse_table(const uint8_t* seg, uint64_t seg_len, uint64_t table_len, int64_t start, int64_t end,
                             int log2c, int64_t nchanged, ChunkEntry* out, int64_t* nout) {
  *nout = 0;
  if (table_len > seg_len) return SS_ETABLE;
  const int64_t C = (int64_t)1 << log2c;
  const int64_t nch = (end - start + C - 1) / C;
  uint64_t pos = 0, dp = table_len, total = 0;
  int64_t m = 0;
  for (int64_t j = 0; j < nch; ++j) {
    uint64_t cnt, rl, bl;
    if (!varint_get(seg, table_len, &pos, &cnt)) return SS_ETABLE;
    const int64_t rem = end - (start + j * C);
    const int64_t clen = rem < C ? rem : C;
    if (cnt > (uint64_t)clen) return SS_ETABLE;
    if (cnt == 0) continue;
    if (!varint_get(seg, table_len, &pos, &rl)) return SS_ETABLE;
    if (!varint_get(seg, table_len, &pos, &bl)) return SS_ETABLE;
    if (rl > seg_len || bl > seg_len || dp + rl + bl > seg_len) return SS_ETABLE;
    ChunkEntry& e = out[m++];
    e.j = j;
    e.n = (int64_t)cnt;
    e.data_off = dp;
    e.rl = rl;
    e.bl = bl;
    e.out_off = (int64_t)total;
    dp += rl + bl;
    total += cnt;
  }
  *nout = m;
  if (pos != table_len) return SS_ETABLE;
  if (dp != seg_len) return SS_ETABLE;
  if (nchanged < 1 || total != (uint64_t)nchanged) return SS_ECOUNT;
  return SS_OK;
}

// Decodes one chunk [cs, cs + clen) with n >= 1 changes from its rans stream (rl bytes) and bit stream (bl bytes).
// old: the base values (space indices). Writes idx_out[0..n) (space indices) and val_out[0..n*w) (new bit patterns,
// or differences in mode 2), nothing else. Returns SS_OK or the first violation (same codes as csrc/format2.cpp):
// SS_ESTREAM, SS_EPOS, SS_ECOUNT, SS_ERANS.
template <class OldSrc>
SS_HD int decode_chunk(const DecParams& P, const OldSrc& old, int64_t cs, int64_t clen, int64_t n,
                       const uint8_t* rans, uint64_t rl, const uint8_t* bits, uint64_t bl, int64_t* idx_out,
                       uint8_t* val_out) {
  const int w = P.w, mode = P.mode;
  RansDec rd;
  if (!rd.init(rans, rl)) return SS_ESTREAM;
  BitReader br;
  br.init(bits, bl);
  int rc;
  if (P.cl.K == 1) {  // order-0: positions follow from the gaps
    const int k = P.ks[0];
    const uint64_t limit = (uint64_t)clen >> k;
    uint64_t p;
    rc = br.gap(k, limit, &p);
    if (rc) return rc;
    for (int64_t i = 0; i < n; ++i) {
      if (p >= (uint64_t)clen) return p == (uint64_t)clen ? SS_ECOUNT : SS_EPOS;
      int sym;
      rc = rd.step(P.freqs, P.cums, &sym);
      if (rc) return rc;
      uint64_t extra;
      if (!br.get(value_nextra(w, mode, sym), &extra)) return SS_ESTREAM;
      const int64_t v = cs + (int64_t)p;
      idx_out[i] = v;
      store_le(val_out + (uint64_t)i * (uint64_t)w, value_decode(w, mode, sym, extra, mode == 0 ? old(v) : 0), w);
      uint64_t g;
      rc = br.gap(k, limit, &g);
      if (rc) return rc;
      p += g + 1;
    }
    if (p != (uint64_t)clen) return p > (uint64_t)clen ? SS_EPOS : SS_ECOUNT;
  } else {  // classes: walk every element; s[c] = class-c elements still to skip
    uint64_t s[kMaxClasses];
    for (int c = 0; c < P.cl.K; ++c) {
      s[c] = 0;
      if (P.ks[c] < 0) continue;
      rc = br.gap(P.ks[c], (uint64_t)clen >> P.ks[c], &s[c]);
      if (rc) return rc;
    }
    int64_t found = 0;
    for (int64_t e = 0; e < clen; ++e) {
      const uint64_t ov = old(cs + e);
      const int c = P.cl.of(ov);
      const int k = P.ks[c];
      if (k < 0) continue;
      if (s[c] > 0) {
        --s[c];
        continue;
      }
      if (found == n) return SS_ECOUNT;
      int sym;
      rc = rd.step(P.freqs + (uint64_t)c * 256, P.cums + (uint64_t)c * 256, &sym);
      if (rc) return rc;
      uint64_t extra;
      if (!br.get(value_nextra(w, mode, sym), &extra)) return SS_ESTREAM;
      idx_out[found] = cs + e;
      store_le(val_out + (uint64_t)found * (uint64_t)w, value_decode(w, mode, sym, extra, ov), w);
      ++found;
      rc = br.gap(k, (uint64_t)clen >> k, &s[c]);
      if (rc) return rc;
    }
    for (int c = 0; c < P.cl.K; ++c)
      if (P.ks[c] >= 0 && s[c] != 0) return SS_EPOS;
    if (found != n) return SS_ECOUNT;
  }
  if (!br.exact()) return SS_ESTREAM;
  if (!rd.done()) return SS_ERANS;
  return SS_OK;
}

}  // namespace sshd

#endif  // SS_HD_H_
