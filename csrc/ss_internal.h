// Private helpers shared by the sparsesync kernels (not part of the ABI).
#ifndef SS_INTERNAL_H_
#define SS_INTERNAL_H_

#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <atomic>
#include <new>
#include <thread>
#include <vector>

#include "sparsesync.h"

#define SS_EXPORT extern "C" __attribute__((visibility("default")))

#if defined(__GNUC__)
#define SS_LIKELY(x) __builtin_expect(!!(x), 1)
#define SS_UNLIKELY(x) __builtin_expect(!!(x), 0)
#define SS_INLINE inline __attribute__((always_inline))
#else
#define SS_LIKELY(x) (x)
#define SS_UNLIKELY(x) (x)
#define SS_INLINE inline
#endif

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define SS_BIG_ENDIAN 1
#endif

namespace ss {

constexpr int64_t kFineBlock = 4096;   // elements per fine block of ss_scan
constexpr uint64_t kLeafBytes = 4096;  // tree64 leaf size
constexpr uint32_t kRansL = 1u << 23;  // rANS lower bound
constexpr int kProbBits = 12;          // rANS probability scale
constexpr uint32_t kProbScale = 1u << kProbBits;

// ---------------------------------------------------------------- little-endian loads/stores
SS_INLINE uint64_t load_u64(const uint8_t* p) {
  uint64_t v;
  memcpy(&v, p, 8);
#ifdef SS_BIG_ENDIAN
  v = __builtin_bswap64(v);
#endif
  return v;
}
SS_INLINE void store_u64(uint8_t* p, uint64_t v) {
#ifdef SS_BIG_ENDIAN
  v = __builtin_bswap64(v);
#endif
  memcpy(p, &v, 8);
}
SS_INLINE uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  memcpy(&v, p, 4);
#ifdef SS_BIG_ENDIAN
  v = __builtin_bswap32(v);
#endif
  return v;
}
SS_INLINE void store_u32(uint8_t* p, uint32_t v) {
#ifdef SS_BIG_ENDIAN
  v = __builtin_bswap32(v);
#endif
  memcpy(p, &v, 4);
}

// Element bit patterns of width W bytes as unsigned integers (little-endian memory).
template <int W> struct UInt;
template <> struct UInt<1> { typedef uint8_t T; };
template <> struct UInt<2> { typedef uint16_t T; };
template <> struct UInt<4> { typedef uint32_t T; };
template <> struct UInt<8> { typedef uint64_t T; };

template <int W>
SS_INLINE typename UInt<W>::T load_elem(const uint8_t* p) {
  typename UInt<W>::T v;
  memcpy(&v, p, W);
#ifdef SS_BIG_ENDIAN
  if (W == 2) v = (typename UInt<W>::T)__builtin_bswap16((uint16_t)v);
  if (W == 4) v = (typename UInt<W>::T)__builtin_bswap32((uint32_t)v);
  if (W == 8) v = (typename UInt<W>::T)__builtin_bswap64((uint64_t)v);
#endif
  return v;
}
template <int W>
SS_INLINE void store_elem(uint8_t* p, typename UInt<W>::T v) {
#ifdef SS_BIG_ENDIAN
  if (W == 2) v = (typename UInt<W>::T)__builtin_bswap16((uint16_t)v);
  if (W == 4) v = (typename UInt<W>::T)__builtin_bswap32((uint32_t)v);
  if (W == 8) v = (typename UInt<W>::T)__builtin_bswap64((uint64_t)v);
#endif
  memcpy(p, &v, W);
}

SS_INLINE int ctz64(uint64_t x) { return __builtin_ctzll(x); }
SS_INLINE int bit_length64(uint64_t x) { return x ? 64 - __builtin_clzll(x) : 0; }
SS_INLINE uint64_t low_mask(int nb) { return nb >= 64 ? ~0ull : ((1ull << nb) - 1); }

// ---------------------------------------------------------------- value symbols (FORMAT.md 4.2)
// Symbol plus "extra bits" (value `extra`, `nextra` bits, written LSB first) of one changed element.
template <int W>
SS_INLINE int delta_symbol(typename UInt<W>::T oldv, typename UInt<W>::T newv, uint64_t* extra, int* nextra) {
  typedef typename UInt<W>::T T;
  constexpr int B = 8 * W;
  T d = (T)(newv - oldv);
  unsigned neg = (unsigned)(d >> (B - 1));
  T m = neg ? (T)(T(0) - d) : d;
  if (m <= 8) {
    *extra = 0;
    *nextra = 0;
    return (int)(2 * (m - 1) + neg);
  }
  int nb = bit_length64((uint64_t)m);
  *extra = (uint64_t)neg | (((uint64_t)m & low_mask(nb - 1)) << 1);
  *nextra = nb;
  return 16 + nb - 4;
}

template <int W>
SS_INLINE int delta_symbol_only(typename UInt<W>::T oldv, typename UInt<W>::T newv) {
  typedef typename UInt<W>::T T;
  constexpr int B = 8 * W;
  T d = (T)(newv - oldv);
  unsigned neg = (unsigned)(d >> (B - 1));
  T m = neg ? (T)(T(0) - d) : d;
  if (m <= 8) return (int)(2 * (m - 1) + neg);
  return 16 + bit_length64((uint64_t)m) - 4;
}

template <int W>
SS_INLINE int raw_symbol(typename UInt<W>::T newv, uint64_t* extra, int* nextra) {
  constexpr int B = 8 * W;
  *extra = (uint64_t)newv & low_mask(B - 8);
  *nextra = B - 8;
  return (int)((uint64_t)newv >> (B - 8));
}

// ---------------------------------------------------------------- varints (FORMAT.md 3)
SS_INLINE int varint_size(uint64_t v) {
  int n = 1;
  while (v >= 0x80) {
    v >>= 7;
    ++n;
  }
  return n;
}
SS_INLINE uint8_t* varint_put(uint8_t* p, uint64_t v) {
  while (v >= 0x80) {
    *p++ = (uint8_t)(v | 0x80);
    v >>= 7;
  }
  *p++ = (uint8_t)v;
  return p;
}
// Reads a canonical varint from [*pos, len). Returns false on truncation, > 10 bytes, value >= 2^63 or a
// non-canonical encoding (a multi-byte varint ending in a zero byte, e.g. 0x80 0x00 for 0).
SS_INLINE bool varint_get(const uint8_t* buf, uint64_t len, uint64_t* pos, uint64_t* out) {
  uint64_t v = 0;
  uint64_t p = *pos;
  for (int i = 0; i < 10; ++i) {
    if (p >= len) return false;
    uint8_t b = buf[p++];
    uint64_t part = (uint64_t)(b & 0x7f);
    if (i == 9 && part > 0) return false;  // would be >= 2^63
    v |= part << (7 * i);
    if (!(b & 0x80)) {
      if (b == 0 && i > 0) return false;   // redundant zero group: not the one canonical encoding
      *pos = p;
      *out = v;
      return true;
    }
  }
  return false;
}

// ---------------------------------------------------------------- threading
int resolve_threads(int nthreads);

// Runs fn(task, worker) for task in [0, ntasks) on up to `nthreads` threads (dynamic scheduling; worker ids are
// 0..nworkers-1 with worker 0 the calling thread). Returns the number of workers used. Falls back to fewer
// threads if thread creation fails. fn must not throw.
template <class F>
int parallel_for(int64_t ntasks, int nthreads, F&& fn) {
  if (ntasks <= 0) return 1;
  int nw = (int)std::min<int64_t>(ntasks, std::max(1, nthreads));
  if (nw <= 1) {
    for (int64_t t = 0; t < ntasks; ++t) fn(t, 0);
    return 1;
  }
  std::atomic<int64_t> next(0);
  auto worker = [&](int wid) {
    for (;;) {
      int64_t t = next.fetch_add(1, std::memory_order_relaxed);
      if (t >= ntasks) break;
      fn(t, wid);
    }
  };
  std::vector<std::thread> threads;
  try {
    threads.reserve(nw - 1);
    for (int i = 1; i < nw; ++i) threads.emplace_back(worker, i);
  } catch (...) {
    // could not start all threads: carry on with the ones we have
  }
  worker(0);
  for (auto& th : threads) th.join();
  return nw;
}

// Number of workers parallel_for will use for `ntasks` tasks when each worker should get at least
// `min_work_per_thread` units out of `total_work`.
SS_INLINE int plan_threads(int nthreads, int64_t ntasks, int64_t total_work, int64_t min_work_per_thread) {
  int t = resolve_threads(nthreads);
  int64_t by_work = min_work_per_thread > 0 ? std::max<int64_t>(1, total_work / min_work_per_thread) : t;
  int64_t r = std::min<int64_t>(std::min<int64_t>(t, ntasks), by_work);
  return (int)std::max<int64_t>(1, r);
}

// ---------------------------------------------------------------- hashing
uint64_t h64(const uint8_t* data, uint64_t len, uint64_t seed);
uint64_t tree64(const uint8_t* data, uint64_t len, int nthreads);
uint64_t tree64_serial(const uint8_t* data, uint64_t len);
// tree64 in two steps (for many buffers at once): leaf hashes of leaves [b, e) of data (length len) into
// out[8*b .. 8*e) (u64 LE each), then the top level over a buffer's nleaves leaf hashes.
void hash_leaves(const uint8_t* data, uint64_t len, uint64_t b, uint64_t e, uint8_t* out);
uint64_t tree64_top(const uint8_t* leaves, uint64_t nleaves, uint64_t len);
// out[i] = h64 of the full leaf (4096 bytes) at src[i] with seed seeds[i], 8 at a time with AVX-512.
void hash_full_leaves(const uint8_t* const* src, const uint64_t* seeds, int count, uint64_t* out);
// out[i] = tree64 of the lens[i] bytes at ptrs[i], for count buffers, in parallel (ss2_tree64_many).
int tree64_batch(const uint64_t* ptrs, const uint64_t* lens, int64_t count, uint64_t* out, int nthreads);
int simd(int max_level);

// SS_OK when tree64 of the decoded values (FORMAT.md: values_hash) is `expected`, else SS_EHASH.
inline int check_values_hash(const uint8_t* vals, uint64_t nbytes, uint64_t expected, int nthreads) {
  uint64_t h;
  try {
    h = tree64(vals, nbytes, nthreads);
  } catch (...) {  // no threads to be had: hash on this one
    h = tree64_serial(vals, nbytes);
  }
  return h == expected ? SS_OK : SS_EHASH;
}

// every idx[i] in [0, n), checked in parallel (tasks of per_task indices) before a kernel writes anything
inline bool indices_in_range(const int64_t* idx, int64_t count, int64_t n, int64_t ntasks, int64_t per_task, int nt) {
  std::atomic<bool> bad(false);
  parallel_for(ntasks, nt, [&](int64_t t, int) {
    const int64_t b = t * per_task, e = std::min(count, b + per_task);
    bool ok = true;
    for (int64_t i = b; i < e; ++i) ok &= (uint64_t)idx[i] < (uint64_t)n;
    if (!ok) bad.store(true, std::memory_order_relaxed);
  });
  return !bad.load();
}

}  // namespace ss

#endif  // SS_INTERNAL_H_
