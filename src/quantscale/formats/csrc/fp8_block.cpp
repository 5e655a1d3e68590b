// FP8 E4M3 block quantization on CPU in one pass over each group of tiles: per-tile amax,
// scale = amax / qmax (1 for all-zero tiles; rounded up to a power of two for ue8m0),
// q = e4m3(clamp(w / scale, -qmax, qmax)) rounded to nearest even. Bit for bit what
// quantscale.formats.fp8.quantize_fp8_block computes (tests/test_fp8_fast.py checks it).
// Groups of tiles are handed out to at::parallel_for's threads one at a time, so a thread
// that the OS preempts does not hold up the others. Output buffers come from a small pool
// that keeps freed buffers with their pages faulted in (fresh pages cost more than the math).
// Also NVFP4 quantize + pack (nvfp4_quantize, below), bit for bit formats/fp4.py's reference.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <torch/library.h>

#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <vector>

#if defined(__AVX512F__)
#define QS_LANES 16
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__F16C__)
#define QS_LANES 8
#include <immintrin.h>
#else
#define QS_LANES 1
#endif

namespace {

inline float as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t as_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

constexpr uint32_t MIN_NORMAL = 121u << 23;  // 2^-6, the smallest normal e4m3 magnitude
constexpr uint32_t REBIAS = 0x7ffffu - (120u << 23);  // exponent 127 -> 7, plus rounding
constexpr uint32_t SUB_MAGIC = 141u << 23;  // 2^14: its float32 ulp is 2^-9, e4m3's subnormal step

// float32 -> e4m3fn code, round to nearest even; |y| <= 448 or NaN (NaN keeps its sign).
inline uint8_t e4m3_code(float y) {
  uint32_t u = as_bits(y);
  const uint32_t sign = (u >> 24) & 0x80u;
  u &= 0x7fffffffu;
  const uint32_t normal = (u + REBIAS + ((u >> 20) & 1u)) >> 20;
  const uint32_t sub = as_bits(as_float(u) + as_float(SUB_MAGIC)) - SUB_MAGIC;
  const uint32_t code = u > 0x7f800000u ? 0x7fu : (u < MIN_NORMAL ? sub : normal);
  return static_cast<uint8_t>(code | sign);
}

// Element access per input dtype: bits with the sign cleared (ordered like |x|, NaN largest)
// and the exact float32 value.
struct BF16 {
  using bits_t = uint16_t;
  static constexpr bits_t abs_mask = 0x7fff;
  static float value(bits_t b) { return as_float(static_cast<uint32_t>(b) << 16); }
#if QS_LANES == 16
  static __m512 load(const bits_t* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
#elif QS_LANES == 8
  static __m256 load(const bits_t* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
#endif
};

struct F16 {
  using bits_t = uint16_t;
  static constexpr bits_t abs_mask = 0x7fff;
  static float value(bits_t b) {
    _Float16 h;
    std::memcpy(&h, &b, sizeof h);
    return static_cast<float>(h);
  }
#if QS_LANES == 16
  static __m512 load(const bits_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
#elif QS_LANES == 8
  static __m256 load(const bits_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
#endif
};

struct F32 {
  using bits_t = uint32_t;
  static constexpr bits_t abs_mask = 0x7fffffffu;
  static float value(bits_t b) { return as_float(b); }
#if QS_LANES == 16
  static __m512 load(const bits_t* p) { return _mm512_loadu_ps(p); }
#elif QS_LANES == 8
  static __m256 load(const bits_t* p) { return _mm256_loadu_ps(reinterpret_cast<const float*>(p)); }
#endif
};

// Smallest power of two >= s (s > 0); s itself when it is one, inf or NaN.
inline float pow2_ceil(float s) {
  const uint32_t u = as_bits(s);
  if (u >= 0x7f800000u || (u >= 0x00800000u && (u & 0x7fffffu) == 0)) return s;
  if (u < 0x00800000u) {  // subnormal: the next power of two of the bit pattern
    uint32_t p = 1;
    while (p < u) p <<= 1;
    return as_float(p);
  }
  return as_float((u & 0x7f800000u) + 0x00800000u);
}

inline float scale_of(float amax, float qmax, bool ue8m0) {
  const float scale = amax > 0.0f ? amax / qmax : 1.0f;
  return ue8m0 ? pow2_ceil(scale) : scale;
}

template <typename T>
void quant_row_scalar(const typename T::bits_t* src, uint8_t* dst, int64_t n, float scale,
                      float qmax) {
  for (int64_t c = 0; c < n; ++c) {
    float y = T::value(src[c]) / scale;
    y = y > qmax ? qmax : (y < -qmax ? -qmax : y);
    dst[c] = e4m3_code(y);
  }
}

#if QS_LANES == 16
// 16 lanes of e4m3_code(clamp(y)); lanes below 2^-6 or NaN take a rarely used slower path.
template <bool CLAMP>
inline __m128i e4m3_code16(__m512 y, __m512 lo, __m512 hi) {
  if (CLAMP) y = _mm512_min_ps(hi, _mm512_max_ps(lo, y));  // NaN passes (second operand)
  const __m512i u = _mm512_castps_si512(y);
  const __m512i a = _mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff));
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(a, 20), _mm512_set1_epi32(1));
  __m512i code = _mm512_add_epi32(_mm512_add_epi32(a, _mm512_set1_epi32(REBIAS)), odd);
  code = _mm512_srli_epi32(code, 20);
  const __m512i span = _mm512_set1_epi32(0x7f800000u - MIN_NORMAL);
  const __mmask16 special =
      _mm512_cmpgt_epu32_mask(_mm512_sub_epi32(a, _mm512_set1_epi32(MIN_NORMAL)), span);
  if (__builtin_expect(special != 0, 0)) {
    const __m512 sum = _mm512_add_ps(_mm512_castsi512_ps(a), _mm512_set1_ps(as_float(SUB_MAGIC)));
    const __m512i sub = _mm512_sub_epi32(_mm512_castps_si512(sum), _mm512_set1_epi32(SUB_MAGIC));
    const __mmask16 small = _mm512_cmplt_epu32_mask(a, _mm512_set1_epi32(MIN_NORMAL));
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(a, _mm512_set1_epi32(0x7f800000u));
    code = _mm512_mask_mov_epi32(code, small, sub);
    code = _mm512_mask_mov_epi32(code, nan, _mm512_set1_epi32(0x7f));
  }
  // code | ((u >> 24) & 0x80)
  code = _mm512_ternarylogic_epi32(code, _mm512_srli_epi32(u, 24), _mm512_set1_epi32(0x80), 0xf8);
  return _mm512_cvtepi32_epi8(code);
}

template <typename T, bool CLAMP>
void quant_row_simd(const typename T::bits_t* src, uint8_t* dst, int64_t n, float scale,
                    float qmax) {
  const __m512 s = _mm512_set1_ps(scale), hi = _mm512_set1_ps(qmax), lo = _mm512_set1_ps(-qmax);
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) {
    const __m512 y = _mm512_div_ps(T::load(src + c), s);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + c), e4m3_code16<CLAMP>(y, lo, hi));
  }
  quant_row_scalar<T>(src + c, dst + c, n - c, scale, qmax);
}

template <typename T>
void quant_row(const typename T::bits_t* src, uint8_t* dst, int64_t n, float scale, float qmax,
               bool clamp) {
  if (clamp) {
    quant_row_simd<T, true>(src, dst, n, scale, qmax);
  } else {
    quant_row_simd<T, false>(src, dst, n, scale, qmax);
  }
}
#elif QS_LANES == 8
// 8 lanes of e4m3_code(clamp(y)) in the low 8 bytes (AVX2: no unsigned compares, no masks).
inline __m128i e4m3_code8(__m256 y, __m256 lo, __m256 hi) {
  y = _mm256_min_ps(hi, _mm256_max_ps(lo, y));  // a NaN y passes through (second operand)
  const __m256i u = _mm256_castps_si256(y);
  const __m256i a = _mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff));
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(a, 20), _mm256_set1_epi32(1));
  __m256i code = _mm256_add_epi32(_mm256_add_epi32(a, _mm256_set1_epi32(REBIAS)), odd);
  code = _mm256_srli_epi32(code, 20);
  // a >= 0 as int32, so signed compares order it
  const __m256i small = _mm256_cmpgt_epi32(_mm256_set1_epi32(MIN_NORMAL), a);
  const __m256i nan = _mm256_cmpgt_epi32(a, _mm256_set1_epi32(0x7f800000));
  const __m256i special = _mm256_or_si256(small, nan);
  if (__builtin_expect(!_mm256_testz_si256(special, special), 0)) {
    const __m256 sum = _mm256_add_ps(_mm256_castsi256_ps(a), _mm256_set1_ps(as_float(SUB_MAGIC)));
    const __m256i sub = _mm256_sub_epi32(_mm256_castps_si256(sum), _mm256_set1_epi32(SUB_MAGIC));
    code = _mm256_blendv_epi8(code, sub, small);
    code = _mm256_blendv_epi8(code, _mm256_set1_epi32(0x7f), nan);
  }
  const __m256i sign = _mm256_and_si256(_mm256_srli_epi32(u, 24), _mm256_set1_epi32(0x80));
  code = _mm256_or_si256(code, sign);
  // low byte of each 32-bit lane: 4 bytes per 128-bit half, then the halves side by side
  const __m256i bytes = _mm256_shuffle_epi8(
      code, _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                             0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1));
  return _mm_unpacklo_epi32(_mm256_castsi256_si128(bytes), _mm256_extracti128_si256(bytes, 1));
}

template <typename T>
void quant_row(const typename T::bits_t* src, uint8_t* dst, int64_t n, float scale, float qmax,
               bool) {
  const __m256 s = _mm256_set1_ps(scale), hi = _mm256_set1_ps(qmax), lo = _mm256_set1_ps(-qmax);
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    const __m256 y = _mm256_div_ps(T::load(src + c), s);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + c), e4m3_code8(y, lo, hi));
  }
  quant_row_scalar<T>(src + c, dst + c, n - c, scale, qmax);
}
#else
template <typename T>
void quant_row(const typename T::bits_t* src, uint8_t* dst, int64_t n, float scale, float qmax,
               bool) {
  quant_row_scalar<T>(src, dst, n, scale, qmax);
}
#endif

constexpr int64_t GROUP_BYTES = 4 << 20;  // input bytes of a band's tiles done together
constexpr int64_t MAX_BANDS_PER_UNIT = 8;  // consecutive bands one thread takes at a time
// Inputs below this run on the calling thread: streaming conversion quantizes 4 MB bands, and
// on 2 loaded cores waiting for a second thread cost more than it saved (1 GB: 0.09 s of
// quantization on one thread, 0.15-0.20 s on two).
constexpr int64_t SERIAL_BELOW_BYTES = 16 << 20;
// E4M3: every |y| in [448, 464] rounds to the 448 code, so tiles whose amax / scale stays
// below this need no clamp (the clamp then changes nothing).
constexpr float E4M3_NO_CLAMP = 456.0f;

struct Layout {
  int64_t rows, cols, bh, bw, grid_c, group;  // group: tiles of one band done together
  float qmax;
  bool ue8m0, given;
};

// Rows [r_begin, r_end) of one band's `count` tiles from tile column `tc0`.
struct Span {
  int64_t band, tc0, count;
  int64_t r0(const Layout& l) const { return band * l.bh; }
  int64_t height(const Layout& l) const { return std::min(l.bh, l.rows - r0(l)); }
  int64_t c0(const Layout& l) const { return tc0 * l.bw; }
  int64_t width(const Layout& l) const { return std::min(count * l.bw, l.cols - c0(l)); }
};

// Per tile of `sp`, fold the |x| bits of rows [r_begin, r_end) into m[t].
template <typename T>
void amax_rows(const typename T::bits_t* w, const Layout& l, const Span& sp, int64_t r_begin,
               int64_t r_end, typename T::bits_t* m) {
  using bits_t = typename T::bits_t;
  const int64_t width = sp.width(l);
  r_end = std::min(r_end, sp.height(l));
  for (int64_t r = r_begin; r < r_end; ++r) {
    const bits_t* row = w + (sp.r0(l) + r) * l.cols + sp.c0(l);
    for (int64_t t = 0; t < sp.count; ++t) {
      const int64_t end = std::min((t + 1) * l.bw, width);
      bits_t mt = m[t];
      for (int64_t c = t * l.bw; c < end; ++c) mt = std::max<bits_t>(mt, row[c] & T::abs_mask);
      m[t] = mt;
    }
  }
}

// Scales of `sp`'s tiles from their amax bits (unless given), and whether each needs a clamp.
template <typename T>
void finish_scales(const typename T::bits_t* m, const Layout& l, const Span& sp, float* scale,
                   uint8_t* clamp) {
  float* s = scale + sp.band * l.grid_c + sp.tc0;
  for (int64_t t = 0; t < sp.count; ++t) {
    if (l.given) {
      clamp[t] = 1;
      continue;
    }
    const float amax = T::value(m[t]);
    s[t] = scale_of(amax, l.qmax, l.ue8m0);
    clamp[t] = !(l.qmax == 448.0f && amax / s[t] <= E4M3_NO_CLAMP);  // NaN: clamp
  }
}

template <typename T>
void quant_rows(const typename T::bits_t* w, uint8_t* q, const Layout& l, const Span& sp,
                int64_t r_begin, int64_t r_end, const float* scale, const uint8_t* clamp) {
  const float* s = scale + sp.band * l.grid_c + sp.tc0;
  const int64_t width = sp.width(l);
  r_end = std::min(r_end, sp.height(l));
  for (int64_t r = r_begin; r < r_end; ++r) {
    const int64_t at = (sp.r0(l) + r) * l.cols + sp.c0(l);
    for (int64_t t = 0; t < sp.count; ++t) {
      const int64_t begin = t * l.bw, n = std::min(l.bw, width - begin);
      quant_row<T>(w + at + begin, q + at + begin, n, s[t], l.qmax, clamp[t]);
    }
  }
}

// Bands [b0, b1) of the tiles from column `tc0`: while band b is quantized (its rows come
// from cache), the rows of band b + 1 stream in from memory for their amax.
template <typename T>
void quant_unit(const typename T::bits_t* w, uint8_t* q, float* scale, const Layout& l,
                int64_t b0, int64_t b1, int64_t tc0, int64_t count) {
  std::vector<typename T::bits_t> m_cur(count, 0), m_next(count, 0);
  std::vector<uint8_t> clamp_cur(count), clamp_next(count);
  Span cur{b0, tc0, count};
  if (!l.given) amax_rows<T>(w, l, cur, 0, l.bh, m_cur.data());
  finish_scales<T>(m_cur.data(), l, cur, scale, clamp_cur.data());
  for (int64_t b = b0; b < b1; ++b) {
    cur.band = b;
    const Span next{b + 1, tc0, count};
    const bool ahead = !l.given && b + 1 < b1;
    std::fill(m_next.begin(), m_next.end(), 0);
    for (int64_t r = 0; r < l.bh; ++r) {
      if (ahead) amax_rows<T>(w, l, next, r, r + 1, m_next.data());
      quant_rows<T>(w, q, l, cur, r, r + 1, scale, clamp_cur.data());
    }
    if (b + 1 < b1) {
      finish_scales<T>(m_next.data(), l, next, scale, clamp_next.data());
      std::swap(clamp_cur, clamp_next);
    }
  }
}

template <typename T>
void quantize(const at::Tensor& w, at::Tensor& q, at::Tensor& scale, const Layout& l) {
  const auto* src = reinterpret_cast<const typename T::bits_t*>(w.const_data_ptr());
  uint8_t* dst = q.mutable_data_ptr<uint8_t>();
  float* s = scale.mutable_data_ptr<float>();
  const bool serial = w.nbytes() < SERIAL_BELOW_BYTES;
  const int64_t threads = serial ? 1 : at::get_num_threads(), grid_r = scale.size(0);
  const int64_t per_band = (l.grid_c + l.group - 1) / l.group;
  // enough units (4 per thread) for a preempted thread's share to move to the others
  const int64_t bands = std::clamp<int64_t>(grid_r * per_band / (4 * threads), 1,
                                            MAX_BANDS_PER_UNIT);
  const int64_t chunks = (grid_r + bands - 1) / bands, units = chunks * per_band;
  auto run = [&](int64_t i) {
    const int64_t b0 = (i / per_band) * bands, tc0 = (i % per_band) * l.group;
    quant_unit<T>(src, dst, s, l, b0, std::min(b0 + bands, grid_r), tc0,
                  std::min(l.group, l.grid_c - tc0));
  };
  if (serial) {
    for (int64_t i = 0; i < units; ++i) run(i);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(units, threads), 1, [&](int64_t, int64_t) {
    for (int64_t i = next++; i < units; i = next++) run(i);
  });
}

// Freed output buffers kept for reuse (their pages stay mapped); large ones ask for huge pages.
class BufferPool {
 public:
  void* take(size_t nbytes, size_t* capacity) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto best = free_.end();
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (it->second >= nbytes && it->second <= 2 * nbytes + 4096 &&
            (best == free_.end() || it->second < best->second)) {
          best = it;
        }
      }
      if (best != free_.end()) {
        void* p = best->first;
        *capacity = best->second;
        kept_ -= best->second;
        free_.erase(best);
        return p;
      }
    }
    *capacity = std::max<size_t>(nbytes, 64);
    void* p = std::aligned_alloc(HUGE, (*capacity + HUGE - 1) / HUGE * HUGE);
    TORCH_CHECK(p != nullptr, "fp8_block_quantize: out of memory for ", nbytes, " bytes");
    if (*capacity >= HUGE) madvise(p, (*capacity + HUGE - 1) / HUGE * HUGE, MADV_HUGEPAGE);
    return p;
  }

  void give(void* p, size_t capacity) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (capacity < MIN_KEEP) {
      std::free(p);
      return;
    }
    free_.emplace_back(p, capacity);
    kept_ += capacity;
    while (free_.size() > KEEP || (kept_ > KEEP_BYTES && free_.size() > 1)) {  // drop the oldest
      kept_ -= free_.front().second;
      std::free(free_.front().first);
      free_.erase(free_.begin());
    }
  }

 private:
  // A checkpoint's weights come in a few shapes: 8 buffers cover one decoder layer's. Small
  // ones are kept too: SmolLM2's (110-884 KB) refaulted fresh pages on every call (first
  // conversion in a process: 0.077 s of kernel time instead of 0.025 s).
  static constexpr size_t HUGE = 2 << 20, MIN_KEEP = 64 << 10, KEEP = 8;
  static constexpr size_t KEEP_BYTES = size_t{1} << 30;
  std::mutex mutex_;
  size_t kept_ = 0;
  std::vector<std::pair<void*, size_t>> free_;
};

BufferPool& pool() {
  static auto* p = new BufferPool();  // never destroyed: tensors may outlive static teardown
  return *p;
}

at::Tensor pooled_codes(at::IntArrayRef sizes) {
  size_t nbytes = 1, capacity = 0;
  for (auto d : sizes) nbytes *= static_cast<size_t>(d);
  void* p = pool().take(nbytes, &capacity);
  return at::from_blob(
      p, sizes, [capacity](void* ptr) { pool().give(ptr, capacity); },
      at::TensorOptions().dtype(at::kByte));
}

// The uint8 e4m3 codes of `w` (same shape); fills `scale` (float32 [ceil(rows/bh),
// ceil(cols/bw)]). scale_mode: 0 amax/qmax, 1 the same rounded up to a power of two (ue8m0),
// 2 `scale` holds the scales to use. `group`: tiles of a band quantized together (0: as many
// as fit in GROUP_BYTES; a whole band streams best).
at::Tensor fp8_block_quantize(const at::Tensor& w, at::Tensor& scale, int64_t bh, int64_t bw,
                              double qmax, int64_t scale_mode, int64_t group) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.device().is_cpu(),
              "fp8_block_quantize: needs a contiguous 2-D CPU tensor");
  TORCH_CHECK(bh > 0 && bw > 0 && group >= 0, "fp8_block_quantize: block sizes must be positive");
  const int64_t grid_r = (w.size(0) + bh - 1) / bh, grid_c = (w.size(1) + bw - 1) / bw;
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.dim() == 2 &&
                  scale.size(0) == grid_r && scale.size(1) == grid_c,
              "fp8_block_quantize: scale must be contiguous float32 [", grid_r, ", ", grid_c, "]");
  at::Tensor q = pooled_codes(w.sizes());
  if (w.numel() == 0) return q;
  if (group == 0) group = std::max<int64_t>(1, GROUP_BYTES / (bh * bw * w.element_size()));
  const Layout l{w.size(0),
                 w.size(1),
                 bh,
                 bw,
                 grid_c,
                 std::clamp<int64_t>(group, 1, grid_c),
                 static_cast<float>(qmax),
                 scale_mode == 1,
                 scale_mode == 2};
  switch (w.scalar_type()) {
    case at::kBFloat16:
      quantize<BF16>(w, q, scale, l);
      break;
    case at::kHalf:
      quantize<F16>(w, q, scale, l);
      break;
    case at::kFloat:
      quantize<F32>(w, q, scale, l);
      break;
    default:
      TORCH_CHECK(false, "fp8_block_quantize: expected bf16, fp16 or fp32, got ",
                  w.scalar_type());
  }
  return q;
}

// ---- NVFP4 (E2M1 codes, E4M3 block scales per 16, a float32 per-tensor scale_2), packed.
// Bit for bit quantscale.formats.fp4.quantize_nvfp4 + pack_fp4: block scale
// e4m3(max(amax / (6 * scale_2), 2^-9)), y = x / (block_scale * scale_2), code = E2M1 index
// of |y| (ties to the even index) | sign << 3, element 2k in the low nibble.

inline float e4m3_value(uint8_t code) {
  const uint32_t e = (code >> 3) & 0xf, m = code & 7;
  float v;
  if ((code & 0x7f) == 0x7f) {
    v = std::numeric_limits<float>::quiet_NaN();
  } else if (e == 0) {
    v = std::ldexp(static_cast<float>(m), -9);
  } else {
    v = std::ldexp(1.0f + static_cast<float>(m) / 8.0f, static_cast<int>(e) - 7);
  }
  return (code & 0x80) ? -v : v;
}

// E2M1 index of |y|: how many rounding boundaries it passes (a tie passes a boundary whose
// upper neighbour has the even index: 0.75, 1.75, 3.5). NaN passes none.
inline uint8_t e2m1_index(float a) {
  return static_cast<uint8_t>((a > 0.25f) + (a >= 0.75f) + (a > 1.25f) + (a >= 1.75f) +
                              (a > 2.5f) + (a >= 3.5f) + (a > 5.0f));
}

template <typename T>
void nvfp4_rows(const typename T::bits_t* w, uint8_t* packed, uint8_t* scales, int64_t r0,
                int64_t r1, int64_t cols, float scale_2) {
  const float denom = 6.0f * scale_2;
  for (int64_t r = r0; r < r1; ++r) {
    const typename T::bits_t* row = w + r * cols;
    for (int64_t g = 0; g < cols / 16; ++g) {
      float x[16], amax = 0.0f;
      bool nan = false;
      for (int i = 0; i < 16; ++i) {
        x[i] = T::value(row[g * 16 + i]);
        const float a = std::fabs(x[i]);
        nan |= a != a;
        amax = a > amax ? a : amax;
      }
      float raw = nan ? std::numeric_limits<float>::quiet_NaN() : amax / denom;
      raw = raw < 0x1p-9f ? 0x1p-9f : raw;  // NaN stays NaN
      raw = raw > 448.0f ? 448.0f : raw;
      const uint8_t code = e4m3_code(raw);
      scales[r * (cols / 16) + g] = code;
      const float div = e4m3_value(code) * scale_2;
      uint8_t nib[16];
      for (int i = 0; i < 16; ++i) {
        const float y = x[i] / div;
        nib[i] = static_cast<uint8_t>(e2m1_index(std::fabs(y)) | (std::signbit(y) ? 8 : 0));
      }
      uint8_t* out = packed + r * (cols / 2) + g * 8;
      for (int i = 0; i < 8; ++i) out[i] = static_cast<uint8_t>(nib[2 * i] | (nib[2 * i + 1] << 4));
    }
  }
}

// Packed E2M1 codes uint8 [rows, cols/2] of 2-D `w` (cols % 16 == 0); fills `scales` (uint8
// E4M3 codes [rows, cols/16]).
at::Tensor nvfp4_quantize(const at::Tensor& w, at::Tensor& scales, double scale_2) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.device().is_cpu() && w.size(1) % 16 == 0,
              "nvfp4_quantize: needs a contiguous 2-D CPU tensor with columns in 16s");
  const int64_t rows = w.size(0), cols = w.size(1);
  TORCH_CHECK(scales.scalar_type() == at::kByte && scales.is_contiguous() &&
                  scales.numel() == rows * (cols / 16),
              "nvfp4_quantize: scales must be contiguous uint8 [", rows, ", ", cols / 16, "]");
  at::Tensor packed = at::empty({rows, cols / 2}, at::TensorOptions().dtype(at::kByte));
  uint8_t* p = packed.mutable_data_ptr<uint8_t>();
  uint8_t* s = scales.mutable_data_ptr<uint8_t>();
  const float s2 = static_cast<float>(scale_2);
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    switch (w.scalar_type()) {
      case at::kBFloat16:
        nvfp4_rows<BF16>(reinterpret_cast<const uint16_t*>(w.const_data_ptr()), p, s, r0, r1,
                         cols, s2);
        break;
      case at::kHalf:
        nvfp4_rows<F16>(reinterpret_cast<const uint16_t*>(w.const_data_ptr()), p, s, r0, r1,
                        cols, s2);
        break;
      default:
        nvfp4_rows<F32>(reinterpret_cast<const uint32_t*>(w.const_data_ptr()), p, s, r0, r1,
                        cols, s2);
    }
  });
  return packed;
}

}  // namespace

// Floats per SIMD step this build uses (16 AVX-512, 8 AVX2, 1 plain C++).
int64_t simd_lanes() { return QS_LANES; }

TORCH_LIBRARY(quantscale_fp8, m) {
  m.def("block_quantize(Tensor w, Tensor(a!) scale, int bh, int bw, float qmax, "
        "int scale_mode, int group) -> Tensor");
  m.impl("block_quantize", c10::DispatchKey::CPU, &fp8_block_quantize);
  m.def("simd_lanes() -> int", &simd_lanes);
  m.def("nvfp4_quantize(Tensor w, Tensor(a!) scales, float scale_2) -> Tensor");
  m.impl("nvfp4_quantize", c10::DispatchKey::CPU, &nvfp4_quantize);
}
