// h64 and tree64 (FORMAT.md 1.1, 1.2).
#include "ss_internal.h"

namespace ss {

namespace {

constexpr uint64_t K0 = 0x9E3779B97F4A7C15ull;
constexpr uint64_t K1 = 0xBF58476D1CE4E5B9ull;
constexpr uint64_t K2 = 0x94D049BB133111EBull;
constexpr uint64_t K3 = 0xD6E8FEB86659FD93ull;
constexpr uint64_t kTreeSeed = 0x5353594E43ull;

SS_INLINE uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

SS_INLINE uint64_t mix(uint64_t x) {
  x ^= x >> 30;
  x *= K1;
  x ^= x >> 27;
  x *= K2;
  x ^= x >> 31;
  return x;
}

SS_INLINE uint64_t round1(uint64_t a, uint64_t w) { return rotl(a + w * K3, 27) * K1; }

}  // namespace

uint64_t h64(const uint8_t* data, uint64_t len, uint64_t seed) {
  uint64_t a0 = seed + 1 * K0, a1 = seed + 2 * K0, a2 = seed + 3 * K0, a3 = seed + 4 * K0;
  uint64_t nfull = len / 32;
  const uint8_t* p = data;
  for (uint64_t i = 0; i < nfull; ++i, p += 32) {
    a0 = round1(a0, load_u64(p));
    a1 = round1(a1, load_u64(p + 8));
    a2 = round1(a2, load_u64(p + 16));
    a3 = round1(a3, load_u64(p + 24));
  }
  uint64_t rem = len - nfull * 32;
  if (rem) {
    uint8_t tail[32];
    memset(tail, 0, sizeof(tail));
    memcpy(tail, p, (size_t)rem);
    a0 = round1(a0, load_u64(tail));
    a1 = round1(a1, load_u64(tail + 8));
    a2 = round1(a2, load_u64(tail + 16));
    a3 = round1(a3, load_u64(tail + 24));
  }
  uint64_t h = seed ^ (len * K0);
  h = mix(h ^ a0);
  h = mix(h ^ a1);
  h = mix(h ^ a2);
  h = mix(h ^ a3);
  return h;
}

// ---------------------------------------------------------------- SIMD leaf hashing
// 8 full leaves at a time with AVX-512 (vpmullq): zmm p holds the 4 lanes of two leaves. Bit-identical to h64.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(SS_PORTABLE)
#define SS_HAVE_AVX512_PATH 1
#include <immintrin.h>
// GCC 12 warns about _mm512_undefined_epi32() inside its own intrinsics (false positive)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// 8 leaves of one length len (0 <= len <= kLeafBytes) at any addresses: out[l] = h64(src[l], len, seeds[l]), bit for
// bit (full 32-byte blocks in SIMD, then the zero-padded tail block, then the scalar finish of h64).
__attribute__((target("avx512f,avx512dq"))) static void leaves8_avx512_len(const uint8_t* const* src,
                                                                             const uint64_t* seeds, uint64_t len,
                                                                             uint64_t* out) {
  const __m512i k1 = _mm512_set1_epi64((long long)K1);
  const __m512i k3 = _mm512_set1_epi64((long long)K3);
  const __m512i jk0 = _mm512_set_epi64((long long)(4 * K0), (long long)(3 * K0), (long long)(2 * K0), (long long)K0,
                                       (long long)(4 * K0), (long long)(3 * K0), (long long)(2 * K0), (long long)K0);
  __m512i acc[4];
  for (int p = 0; p < 4; ++p) {
    uint64_t sa = seeds[2 * p], sb = seeds[2 * p + 1];
    __m512i seeds = _mm512_set_epi64((long long)sb, (long long)sb, (long long)sb, (long long)sb, (long long)sa,
                                     (long long)sa, (long long)sa, (long long)sa);
    acc[p] = _mm512_add_epi64(seeds, jk0);
  }
  const uint64_t full = len & ~(uint64_t)31;
  for (uint64_t off = 0; off < full; off += 32) {
    for (int p = 0; p < 4; ++p) {
      __m256i wa = _mm256_loadu_si256((const __m256i*)(src[2 * p] + off));
      __m256i wb = _mm256_loadu_si256((const __m256i*)(src[2 * p + 1] + off));
      __m512i w = _mm512_inserti64x4(_mm512_zextsi256_si512(wa), wb, 1);
      __m512i x = _mm512_add_epi64(acc[p], _mm512_mullo_epi64(w, k3));
      acc[p] = _mm512_mullo_epi64(_mm512_rol_epi64(x, 27), k1);
    }
  }
  if (len > full) {  // the tail, zero-padded to 32 bytes (as h64)
    alignas(32) uint8_t tail[8][32];
    memset(tail, 0, sizeof(tail));
    for (int l = 0; l < 8; ++l) memcpy(tail[l], src[l] + full, (size_t)(len - full));
    for (int p = 0; p < 4; ++p) {
      __m256i wa = _mm256_load_si256((const __m256i*)tail[2 * p]);
      __m256i wb = _mm256_load_si256((const __m256i*)tail[2 * p + 1]);
      __m512i w = _mm512_inserti64x4(_mm512_zextsi256_si512(wa), wb, 1);
      __m512i x = _mm512_add_epi64(acc[p], _mm512_mullo_epi64(w, k3));
      acc[p] = _mm512_mullo_epi64(_mm512_rol_epi64(x, 27), k1);
    }
  }
  alignas(64) uint64_t lanes[32];
  for (int p = 0; p < 4; ++p) _mm512_store_si512((__m512i*)(lanes + 8 * p), acc[p]);
  for (int l = 0; l < 8; ++l) {
    uint64_t seed = seeds[l];
    uint64_t h = seed ^ (len * K0);
    for (int j = 0; j < 4; ++j) h = mix(h ^ lanes[4 * l + j]);
    out[l] = h;
  }
}

// 8 full leaves at any addresses: leaf l is the 4096 bytes at src[l], hashed with seed seeds[l].
static inline void leaves8_avx512_at(const uint8_t* const* src, const uint64_t* seeds, uint64_t* out) {
  leaves8_avx512_len(src, seeds, kLeafBytes, out);
}

static void leaves8_avx512(const uint8_t* data, uint64_t first_leaf, uint64_t* out) {
  const uint8_t* src[8];
  uint64_t seeds[8];
  for (int l = 0; l < 8; ++l) {
    src[l] = data + l * kLeafBytes;
    seeds[l] = first_leaf + l;
  }
  leaves8_avx512_at(src, seeds, out);
}

#pragma GCC diagnostic pop

static int detect_simd() {
  __builtin_cpu_init();
  return (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq")) ? 1 : 0;
}
static const int g_simd_available = detect_simd();
static std::atomic<int> g_simd_cap(1);
#else
static const int g_simd_available = 0;
static std::atomic<int> g_simd_cap(0);
#endif

static inline int simd_level() { return std::min(g_simd_available, g_simd_cap.load(std::memory_order_relaxed)); }

// Hashes leaves [b, e) of data (length len) into out[b..e).
void hash_leaves(const uint8_t* data, uint64_t len, uint64_t b, uint64_t e, uint8_t* out) {
  uint64_t i = b;
#ifdef SS_HAVE_AVX512_PATH
  if (simd_level() >= 1) {
    uint64_t tmp[8];
    while (i + 8 <= e && (i + 8) * kLeafBytes <= len) {
      leaves8_avx512(data + i * kLeafBytes, i, tmp);
      for (int l = 0; l < 8; ++l) store_u64(out + (i + l) * 8, tmp[l]);
      i += 8;
    }
  }
#endif
  for (; i < e; ++i) {
    uint64_t off = i * kLeafBytes;
    uint64_t l = std::min<uint64_t>(kLeafBytes, len - off);
    store_u64(out + i * 8, h64(data + off, l, i));
  }
}

void hash_full_leaves(const uint8_t* const* src, const uint64_t* seeds, int count, uint64_t* out) {
  int i = 0;
#ifdef SS_HAVE_AVX512_PATH
  if (simd_level() >= 1)
    for (; i + 8 <= count; i += 8) leaves8_avx512_at(src + i, seeds + i, out + i);
#endif
  for (; i < count; ++i) out[i] = h64(src[i], kLeafBytes, seeds[i]);
}

namespace {

// Collects leaves (any lengths, any addresses) and hashes them 8 of one length at a time with AVX-512; a leaf's hash
// goes to dst (u64 LE) once it is hashed, at the latest by flush().
class LeafBatcher {
 public:
  explicit LeafBatcher(bool simd) : simd_(simd) {}
  void add(const uint8_t* src, uint64_t len, uint64_t seed, uint8_t* dst) {
    if (!simd_) {
      store_u64(dst, h64(src, len, seed));
      return;
    }
    int k = 0;
    while (k < kSlots && n_[k] && len_[k] != len) ++k;
    if (k == kSlots) {  // every slot holds leaves of another length: hash the fullest one now
      k = 0;
      for (int j = 1; j < kSlots; ++j)
        if (n_[j] > n_[k]) k = j;
      run(k);
    }
    // into L2 while the batch fills: all of a short leaf (a small buffer: too short for the hardware prefetcher to
    // ramp up), the start of a full one
    const uint64_t pf = len < kLeafBytes ? len : 512;
    for (uint64_t o = 0; o < pf; o += 64) __builtin_prefetch(src + o, 0, 2);
    const int i = n_[k]++;
    len_[k] = len;
    src_[k][i] = src;
    seed_[k][i] = seed;
    dst_[k][i] = dst;
    if (i == 7) run(k);
  }
  void flush() {
    for (int k = 0; k < kSlots; ++k)
      if (n_[k]) run(k);
  }

 private:
  static constexpr int kSlots = 4;
  void run(int k) {
    const int n = n_[k];
    n_[k] = 0;
    if (n == 1) {
      store_u64(dst_[k][0], h64(src_[k][0], len_[k], seed_[k][0]));
      return;
    }
    for (int i = n; i < 8; ++i) {  // pad with copies of leaf 0 (their hashes are dropped)
      src_[k][i] = src_[k][0];
      seed_[k][i] = seed_[k][0];
    }
    uint64_t h[8];
#ifdef SS_HAVE_AVX512_PATH
    leaves8_avx512_len(src_[k], seed_[k], len_[k], h);
#else
    for (int i = 0; i < n; ++i) h[i] = h64(src_[k][i], len_[k], seed_[k][i]);
#endif
    for (int i = 0; i < n; ++i) store_u64(dst_[k][i], h[i]);
  }
  bool simd_;
  int n_[kSlots] = {};
  uint64_t len_[kSlots] = {};
  const uint8_t* src_[kSlots][8];
  uint64_t seed_[kSlots][8];
  uint8_t* dst_[kSlots][8];
};

SS_INLINE uint64_t leaf_count(uint64_t len) { return len == 0 ? 1 : (len + kLeafBytes - 1) / kLeafBytes; }

}  // namespace

// tree64 of many buffers (ss2_tree64_many). Tasks of about kGroupLeaves leaves: runs of whole small buffers (their
// leaf hashes stay on the stack and their top level is hashed in the same task), or a range of leaves of one large
// buffer (its leaf hashes go to a shared array; its top level is hashed after all tasks). Leaves of one length are
// hashed 8 at a time, across buffers.
int tree64_batch(const uint64_t* ptrs, const uint64_t* lens, int64_t count, uint64_t* out, int nthreads) {
  if (count < 0 || (count > 0 && (!ptrs || !lens || !out))) return SS_EARG;
  if (count == 0) return SS_OK;
  constexpr uint64_t kGroupLeaves = 64;
  struct Task {
    int64_t b, e;        // buffers [b, e) whole, or (e < 0) leaves [lb, le) of buffer b
    uint64_t lb, le;
    uint8_t* leaves;     // large buffer: its leaf hashes
  };
  std::vector<Task> tasks;
  std::vector<int64_t> large;  // the large buffers, for the top level
  std::vector<uint64_t> large_base;
  uint64_t bytes = 0, nleaves_total = 0, large_leaves = 0;
  {
    uint64_t gl = 0;  // leaves in the last group
    for (int64_t i = 0; i < count; ++i) {
      if (lens[i] && !ptrs[i]) return SS_EARG;
      const uint64_t nl = leaf_count(lens[i]);
      bytes += lens[i];
      nleaves_total += nl;
      if (nl > kGroupLeaves) {
        large.push_back(i);
        large_base.push_back(large_leaves);
        large_leaves += nl;
        continue;
      }
      if (!tasks.empty() && tasks.back().e == i && gl + nl <= kGroupLeaves) {
        tasks.back().e = i + 1;
        gl += nl;
      } else {
        tasks.push_back({i, i + 1, 0, 0, nullptr});
        gl = nl;
      }
    }
  }
  std::vector<uint8_t> big((size_t)(large_leaves * 8));
  for (size_t j = 0; j < large.size(); ++j) {
    const uint64_t nl = leaf_count(lens[large[j]]);
    for (uint64_t lb = 0; lb < nl; lb += kGroupLeaves)
      tasks.push_back({large[j], -1, lb, std::min(nl, lb + kGroupLeaves), big.data() + large_base[j] * 8});
  }
  const int64_t ntasks = (int64_t)tasks.size();
  const int nt = plan_threads(nthreads, ntasks, (int64_t)bytes + (int64_t)nleaves_total * 64, 1 << 20);
  const bool simd = simd_level() >= 1;
  parallel_for(ntasks, nt, [&](int64_t t, int) {
    const Task& k = tasks[(size_t)t];
    LeafBatcher lb(simd);
    if (k.e < 0) {
      const uint8_t* data = (const uint8_t*)(uintptr_t)ptrs[k.b];
      const uint64_t len = lens[k.b];
      for (uint64_t l = k.lb; l < k.le; ++l) {
        const uint64_t off = l * kLeafBytes;
        lb.add(data + off, std::min<uint64_t>(kLeafBytes, len - off), l, k.leaves + l * 8);
      }
      lb.flush();
      return;
    }
    alignas(64) uint8_t leaves[kGroupLeaves * 8];
    uint64_t at = 0;
    for (int64_t i = k.b; i < k.e; ++i) {
      const uint8_t* data = (const uint8_t*)(uintptr_t)ptrs[i];
      const uint64_t len = lens[i], nl = leaf_count(len);
      for (uint64_t l = 0; l < nl; ++l) {
        const uint64_t off = l * kLeafBytes;
        lb.add(len ? data + off : data, len ? std::min<uint64_t>(kLeafBytes, len - off) : 0, l,
               leaves + (at + l) * 8);
      }
      at += nl;
    }
    lb.flush();
    at = 0;
    for (int64_t i = k.b; i < k.e; ++i) {
      const uint64_t nl = leaf_count(lens[i]);
      out[i] = tree64_top(leaves + at * 8, nl, lens[i]);
      at += nl;
    }
  });
  for (size_t j = 0; j < large.size(); ++j)
    out[large[j]] = tree64_top(big.data() + large_base[j] * 8, leaf_count(lens[large[j]]), lens[large[j]]);
  return SS_OK;
}

uint64_t tree64(const uint8_t* data, uint64_t len, int nthreads) {
  uint64_t nleaves = len == 0 ? 1 : (len + kLeafBytes - 1) / kLeafBytes;
  std::vector<uint8_t> leaves((size_t)(nleaves * 8));
  uint8_t* out = leaves.data();
  // Tasks of 64 leaves (256 KiB).
  const int64_t per_task = 64;
  int64_t ntasks = (int64_t)((nleaves + per_task - 1) / per_task);
  int nt = plan_threads(nthreads, ntasks, (int64_t)len, 1 << 20);
  parallel_for(ntasks, nt, [&](int64_t t, int) {
    uint64_t b = (uint64_t)t * per_task, e = std::min<uint64_t>(nleaves, b + per_task);
    hash_leaves(data, len, b, e, out);
  });
  return h64(out, nleaves * 8, len ^ kTreeSeed);
}

uint64_t tree64_top(const uint8_t* leaves, uint64_t nleaves, uint64_t len) {
  return h64(leaves, nleaves * 8, len ^ kTreeSeed);
}

int simd(int max_level) {
  if (max_level >= 0) g_simd_cap.store(max_level);
  return simd_level();
}

// Streaming single-thread tree64 that needs no heap memory (fallback).
uint64_t tree64_serial(const uint8_t* data, uint64_t len) {
  uint64_t nleaves = len == 0 ? 1 : (len + kLeafBytes - 1) / kLeafBytes;
  uint64_t seed = len ^ kTreeSeed;
  uint64_t a[4] = {seed + 1 * K0, seed + 2 * K0, seed + 3 * K0, seed + 4 * K0};
  uint64_t buf[4];
  int fill = 0;
  for (uint64_t i = 0; i < nleaves; ++i) {
    uint64_t off = i * kLeafBytes;
    uint64_t l = std::min<uint64_t>(kLeafBytes, len - off);
    buf[fill++] = h64(data + off, l, i);
    if (fill == 4) {
      for (int j = 0; j < 4; ++j) a[j] = round1(a[j], buf[j]);
      fill = 0;
    }
  }
  if (fill) {
    for (int j = fill; j < 4; ++j) buf[j] = 0;
    for (int j = 0; j < 4; ++j) a[j] = round1(a[j], buf[j]);
  }
  uint64_t h = seed ^ ((nleaves * 8) * K0);
  for (int j = 0; j < 4; ++j) h = mix(h ^ a[j]);
  return h;
}

int resolve_threads(int nthreads) {
  if (nthreads > 0) return std::min(nthreads, 1024);
  unsigned hc = std::thread::hardware_concurrency();
  return hc ? (int)std::min(hc, 1024u) : 1;
}

}  // namespace ss

SS_EXPORT int ss_abi_version(void) { return SS_ABI_VERSION; }

SS_EXPORT int ss_simd(int max_level) { return ss::simd(max_level); }

SS_EXPORT uint64_t ss_h64(const uint8_t* data, uint64_t len, uint64_t seed) {
  if (!data && len) return 0;
  return ss::h64(data, len, seed);
}

SS_EXPORT uint64_t ss_tree64(const uint8_t* data, uint64_t len, int nthreads) {
  if (!data && len) return 0;
  try {
    return ss::tree64(data, len, nthreads);
  } catch (...) {
    return ss::tree64_serial(data, len);  // no memory for the leaf array: stream it (no allocation)
  }
}

#ifndef SPARSESYNC_WITH_CUDA
SS_EXPORT int ss_cuda_compiled(void) { return 0; }
SS_EXPORT int ss_cuda_archs(int* out, int cap) {
  (void)out;
  (void)cap;
  return 0;
}
#endif
